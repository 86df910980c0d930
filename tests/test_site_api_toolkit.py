"""The Site API's part in the research toolkit: the strategy's payload for a round, the
models of a cross-site evaluation, and a site's evaluation reported with its result; each
reachable with the site's own credential, for its own running task only."""

# The fixtures of tests/test_site_api.py are imported, and pytest passes them by name.
# ruff: noqa: F811

import hashlib

import pytest
import torch
from rest_framework.test import APIClient

from tests.test_site_api import (  # noqa: F401
    admin_user,
    claim,
    federation_round,
    sites_configured,
    trained_weights,
    upload,
)
from training import federation, modelstore
from training.fl.weights import load_weights, weights_to_bytes
from training.models import ClientUpdate, ClientUpdateStatus, Round, RoundKind, RoundStatus

pytestmark = pytest.mark.django_db

EVALUATION = {"loss": 0.4, "accuracy": 0.75, "num_samples": 6}


def body_of(response) -> bytes:
    return b"".join(response.streaming_content)


@pytest.fixture
def round_payload(federation_round):
    """Round 1's payload, stored beside its starting checkpoint as aggregation stores it."""
    _, experiment, _ = federation_round
    payload = {"0.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    checkpoint, _ = federation.starting_checkpoint(experiment.pk, 1)
    modelstore.save_strategy_files(checkpoint, state={}, payload=payload)
    return payload


def test_a_site_fetches_its_rounds_payload_named_by_the_tasks_hash(federation_round, round_payload):
    agents, _, updates = federation_round
    task = claim(agents["a"], updates["a"])

    response = agents["a"].get(f"/api/site/tasks/{updates['a'].pk}/payload/")

    body = body_of(response)
    assert response.status_code == 200
    assert hashlib.sha256(body).hexdigest() == task["payload_sha256"] != ""
    assert response["ETag"] == f'"{task["payload_sha256"]}"'
    assert load_weights(body).keys() == round_payload.keys()
    assert torch.equal(load_weights(body)["0.weight"], round_payload["0.weight"])


def test_the_payload_needs_the_sites_credential_and_its_own_running_task(
    federation_round, round_payload
):
    agents, _, updates = federation_round
    url = f"/api/site/tasks/{updates['b'].pk}/payload/"

    unclaimed = agents["b"].get(url)
    claim(agents["b"], updates["b"])
    anonymous = APIClient().get(url)
    wrong_key = APIClient(HTTP_AUTHORIZATION="Site not-a-credential").get(url)
    other_site = agents["a"].get(url)

    assert unclaimed.status_code == 409 and "claim it first" in unclaimed.json()["detail"]
    assert anonymous.status_code in (401, 403)
    assert wrong_key.status_code == 401 and "unknown or revoked" in wrong_key.json()["detail"]
    assert other_site.status_code == 403 and "another site" in other_site.json()["detail"]


def test_a_round_without_payload_answers_404_and_its_task_names_none(federation_round):
    agents, _, updates = federation_round
    task = claim(agents["a"], updates["a"])

    response = agents["a"].get(f"/api/site/tasks/{updates['a'].pk}/payload/")

    assert task["payload_sha256"] == ""
    assert response.status_code == 404
    assert response.json() == {"detail": "The strategy sends no payload in this round."}


def test_a_train_tasks_evaluation_is_stored_with_its_result(federation_round):
    agents, _, updates = federation_round
    agent, update = agents["a"], updates["a"]
    claim(agent, update)
    upload(agent, update, weights_to_bytes(trained_weights(agent, update)))

    reported = agent.post(
        f"/api/site/tasks/{update.pk}/result/",
        {"num_samples": 24, "metrics": {"loss": 0.5}, "evaluation": EVALUATION},
        format="json",
    )

    assert reported.json() == {"recorded": True}
    stored = ClientUpdate.objects.get(pk=update.pk)
    assert stored.status == ClientUpdateStatus.SUCCEEDED
    assert stored.evaluation == EVALUATION


def test_an_evaluation_that_is_not_json_numbers_is_refused(federation_round):
    agents, _, updates = federation_round
    agent, update = agents["a"], updates["a"]
    claim(agent, update)
    upload(agent, update, weights_to_bytes(trained_weights(agent, update)))

    response = agent.post(
        f"/api/site/tasks/{update.pk}/result/",
        {"num_samples": 24, "metrics": {"loss": 0.5}, "evaluation": ["not", "a", "dict"]},
        format="json",
    )

    assert response.status_code == 400 and "evaluation" in response.json()
    assert ClientUpdate.objects.get(pk=update.pk).status == ClientUpdateStatus.RUNNING


# --- the cross-site round ----------------------------------------------------------------------


@pytest.fixture
def evaluate_round(federation_round):
    """Round 1 trained by both sites, then the cross-site round opened over it: each site's
    task names the global model and both sites' last updates."""
    agents, experiment, updates = federation_round
    trained = {}
    for slug, agent in agents.items():
        claim(agent, updates[slug])
        trained[slug] = weights_to_bytes(trained_weights(agent, updates[slug]))
        upload(agent, updates[slug], trained[slug])
        agent.post(
            f"/api/site/tasks/{updates[slug].pk}/result/",
            {"num_samples": 24, "metrics": {"loss": 0.5}},
            format="json",
        )
    first = experiment.rounds.get(number=1)
    final = modelstore.save_weights(
        modelstore.global_weights_name(experiment.pk, 1), load_weights(trained["a"])
    )
    experiment.checkpoints.create(
        round=first, file=final.name, sha256=final.sha256, size_bytes=final.size_bytes,
        num_parameters=final.num_parameters, metrics={},
    )  # fmt: skip
    Round.objects.filter(pk=first.pk).update(status=RoundStatus.CLOSED)
    # The experiment ends after this round: the cross-site round comes next.
    experiment.num_rounds = 1
    experiment.save(update_fields=["num_rounds"])
    cross_site = Round.objects.create(
        experiment=experiment, number=experiment.num_rounds + 1, kind=RoundKind.EVALUATE,
        deadline=first.deadline, metrics={"models": ["global", "a", "b"]},
    )  # fmt: skip
    tasks = {
        slug: ClientUpdate.objects.select_related("round", "site").create(
            round=cross_site, site=agent.site
        )
        for slug, agent in agents.items()
    }
    return agents, tasks, trained, final


def test_an_evaluate_task_names_its_models_and_serves_each_with_its_hash(evaluate_round):
    agents, tasks, trained, final = evaluate_round
    agent, task = agents["b"], tasks["b"]

    described = claim(agent, task)
    served = {
        label: agent.get(f"/api/site/tasks/{task.pk}/models/{label}/")
        for label in ("global", "a", "b")
    }

    assert described["kind"] == "evaluate"
    assert described["options"]["models"] == ["global", "a", "b"]
    assert hashlib.sha256(body_of(served["global"])).hexdigest() == final.sha256
    for slug in ("a", "b"):
        body = body_of(served[slug])
        assert body == trained[slug]
        assert served[slug]["X-Content-SHA256"] == hashlib.sha256(body).hexdigest()


def test_evaluate_models_are_only_for_the_site_that_holds_the_evaluate_task(
    evaluate_round, federation_round
):
    agents, tasks, _, _ = evaluate_round
    _, _, train_updates = federation_round
    claim(agents["a"], tasks["a"])

    other_site = agents["b"].get(f"/api/site/tasks/{tasks['a'].pk}/models/global/")
    not_named = agents["a"].get(f"/api/site/tasks/{tasks['a'].pk}/models/c/")
    training_task = agents["a"].get(f"/api/site/tasks/{train_updates['a'].pk}/models/global/")
    anonymous = APIClient().get(f"/api/site/tasks/{tasks['a'].pk}/models/global/")

    assert other_site.status_code == 403 and "another site" in other_site.json()["detail"]
    assert not_named.status_code == 404
    assert "names no model 'c'" in not_named.json()["detail"]
    # The training task finished: nothing more to fetch for it.
    assert training_task.status_code == 409
    assert anonymous.status_code in (401, 403)


def test_an_evaluate_task_reports_without_weights_and_its_evaluation_is_stored(evaluate_round):
    agents, tasks, _, _ = evaluate_round
    agent, task = agents["a"], tasks["a"]
    claim(agent, task)
    evaluation = {"global": EVALUATION, "a": EVALUATION, "b": {**EVALUATION, "accuracy": 0.5}}

    refused_upload = upload(agent, task, b"weights")
    missing = agent.post(
        f"/api/site/tasks/{task.pk}/result/",
        {"num_samples": 6, "metrics": {"evaluate_seconds": 0.1}},
        format="json",
    )
    reported = agent.post(
        f"/api/site/tasks/{task.pk}/result/",
        {"num_samples": 6, "metrics": {"evaluate_seconds": 0.1}, "evaluation": evaluation},
        format="json",
    )

    assert refused_upload.status_code == 409
    assert "sends no weights" in refused_upload.json()["detail"]
    assert missing.status_code == 400 and "evaluation" in missing.json()
    assert reported.json() == {"recorded": True}
    stored = ClientUpdate.objects.get(pk=task.pk)
    assert stored.status == ClientUpdateStatus.SUCCEEDED
    assert stored.evaluation == evaluation and not stored.update_file


def test_the_new_site_endpoints_are_in_the_openapi_schema_with_the_site_credential(admin_user):
    client = APIClient()
    client.force_authenticate(admin_user)

    schema = client.get("/api/schema/", HTTP_ACCEPT="application/json").json()

    for path in (
        "/api/site/tasks/{client_update_id}/payload/",
        "/api/site/tasks/{client_update_id}/models/{label}/",
    ):
        operation = schema["paths"][path]["get"]
        assert operation["security"] == [{"siteCredential": []}]
        assert "application/octet-stream" in operation["responses"]["200"]["content"]
    result = schema["components"]["schemas"]["ClientReportRequest"]["properties"]
    assert "evaluation" in result
