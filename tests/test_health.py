"""/health answers 200 when every part works and 503 naming the part that does not."""

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from tests.factories import RoundFactory
from training.models import RoundStatus


@pytest.mark.django_db
def test_health_reports_every_part_ok(client, settings):
    response = client.get("/health")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["failed"] == []
    assert set(body["checks"]) == {"database", "broker", "disk", "memory", "rounds"}
    assert body["checks"]["rounds"] == {"ok": True, "degraded": False, "stuck": 0}
    assert body["checks"]["database"]["vendor"] == connection.vendor
    assert body["checks"]["disk"]["free_bytes"] > 0
    assert body["checks"]["memory"]["process_rss_bytes"] > 0
    assert body["mode"] == ("embedded" if settings.FEDLENS_EMBEDDED else "distributed")


@pytest.mark.django_db(transaction=True)
def test_health_is_503_when_the_database_is_unreachable(client, monkeypatch):
    connection.close()
    if connection.vendor == "sqlite":
        monkeypatch.setitem(connection.settings_dict, "NAME", "/nonexistent/folder/db.sqlite3")
    else:
        monkeypatch.setitem(connection.settings_dict, "PORT", "1")

    response = client.get("/health")
    connection.close()

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail"
    assert body["failed"] == ["database"]
    assert body["checks"]["database"]["error"] == "OperationalError"


@pytest.mark.django_db
def test_health_is_503_when_the_broker_is_unreachable(client, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"

    response = client.get("/health")

    assert response.status_code == 503
    assert response.json()["failed"] == ["broker"]


@pytest.mark.django_db
def test_health_is_503_when_the_disk_is_almost_full(client, monkeypatch):
    import flproject.health

    monkeypatch.setattr(flproject.health, "MIN_FREE_DISK_BYTES", 2**62)

    response = client.get("/health")

    assert response.status_code == 503
    assert response.json()["failed"] == ["disk"]


@pytest.mark.django_db
def test_health_says_degraded_while_a_round_is_stuck_past_its_aggregation_deadline(client):
    # given a round still aggregating an hour after its aggregation deadline
    RoundFactory(
        status=RoundStatus.AGGREGATING,
        aggregation_deadline=timezone.now() - timedelta(hours=1),
    )

    response = client.get("/health")

    # then the server still serves, and says which part is degraded
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["degraded"]) == ("degraded", ["rounds"])
    assert body["checks"]["rounds"]["stuck"] == 1
