"""Django admin: every model has a working page; the ledger is read-only; stop action."""

import pytest
from django.urls import reverse

from tests.factories import CheckpointFactory, ClientUpdateFactory, ExperimentFactory, UserFactory
from training.models import ExperimentStatus

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client):
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


@pytest.mark.parametrize(
    "model", ["site", "dataset", "experiment", "round", "clientupdate", "checkpoint"]
)
def test_each_model_has_a_changelist_with_search(admin_client, model):
    CheckpointFactory()
    ClientUpdateFactory()

    response = admin_client.get(reverse(f"admin:training_{model}_changelist"), {"q": "x"})

    assert response.status_code == 200


@pytest.mark.parametrize("model", ["round", "clientupdate", "checkpoint"])
def test_the_ledger_cannot_be_added_to_or_changed_in_the_admin(admin_client, model):
    assert admin_client.get(reverse(f"admin:training_{model}_add")).status_code == 403


def test_the_stop_action_stops_running_experiments_and_reports_the_others(admin_client):
    running = ExperimentFactory(status=ExperimentStatus.RUNNING)
    draft = ExperimentFactory()

    response = admin_client.post(
        reverse("admin:training_experiment_changelist"),
        {"action": "stop_experiments", "_selected_action": [running.pk, draft.pk]},
        follow=True,
    )

    running.refresh_from_db()
    draft.refresh_from_db()
    assert running.status == ExperimentStatus.STOPPED
    assert running.failure_reason == "Stopped by root."
    assert draft.status == ExperimentStatus.DRAFT
    messages = [str(message) for message in response.context["messages"]]
    assert "Stopped 1 experiment(s)." in messages
    assert any("only a queued or running experiment" in message for message in messages)
