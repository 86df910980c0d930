"""Kubernetes-style probes: /healthz says the process answers, whatever its dependencies;
/readyz says it can serve (database, broker, migrations) and names what is missing."""

import pytest
from django.db import OperationalError, connection
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.recorder import MigrationRecorder


@pytest.fixture
def database_down(monkeypatch):
    """PostgreSQL stops answering: new connections go to a closed port. The in-memory SQLite
    database of an embedded run would be lost with its connection, so there every query fails."""
    if connection.vendor == "sqlite":

        def unreachable(*args, **kwargs):
            raise OperationalError("unable to open database file")

        monkeypatch.setattr(connection, "cursor", unreachable)
        yield
        return
    connection.close()
    monkeypatch.setitem(connection.settings_dict, "PORT", "1")
    yield
    connection.close()


@pytest.mark.django_db(transaction=True)
def test_healthz_is_200_even_with_the_database_down(client, database_down):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.django_db
def test_readyz_is_200_when_database_broker_and_migrations_are_fine(client):
    response = client.get("/readyz")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "broker", "migrations"}
    assert body["checks"]["migrations"]["unapplied"] == 0


@pytest.mark.django_db(transaction=True)
def test_readyz_is_503_naming_the_database_when_it_is_down(client, database_down):
    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["failed"] == ["database"]


@pytest.mark.django_db
def test_readyz_is_503_naming_the_broker_when_it_is_unreachable(client, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["failed"] == ["broker"]


@pytest.mark.django_db
def test_readyz_is_503_naming_migrations_when_one_is_unapplied(client):
    # As after deploying code with a new migration before `migrate` ran; the test's
    # transaction puts the record back.
    (latest,) = MigrationLoader(connection).graph.leaf_nodes("training")
    MigrationRecorder(connection).record_unapplied(*latest)

    response = client.get("/readyz")

    assert response.status_code == 503
    body = response.json()
    assert body["failed"] == ["migrations"]
    assert body["checks"]["migrations"]["unapplied"] == 1


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/health"])
def test_probes_answer_a_host_that_allowed_hosts_does_not_list(client, path):
    """Kubernetes probes send the pod's IP address as Host."""
    response = client.get(path, HTTP_HOST="10.42.0.17:8000")

    assert response.status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/health", "/metrics"])
def test_probes_and_metrics_are_not_redirected_to_https(client, settings, path):
    settings.SECURE_SSL_REDIRECT = True

    response = client.get(path)

    assert response.status_code == 200
