"""The Site API: enrolment, a site's credential and what it may reach, declared datasets,
approvals, and a task's claim, weights, upload and report, with bad input refused."""

import hashlib
from datetime import timedelta

import pytest
import torch
from django.core.cache import cache
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from tests.factories import SiteFactory, UserFactory
from training import services, sites
from training.fl.weights import load_weights, weights_to_bytes
from training.models import (
    ApprovalStatus,
    ClientUpdate,
    ClientUpdateStatus,
    Dataset,
    EnrolmentToken,
    Experiment,
    ExperimentStatus,
    RoundStatus,
    SiteCredential,
    SiteDataset,
)

pytestmark = pytest.mark.django_db

CLASSES = ["normal", "lesion"]


@pytest.fixture(autouse=True)
def sites_configured(settings):
    settings.FEDLENS_SITE_BROKER_URL = "rediss://broker.example.org:6380/0"
    settings.REDIS_URL = settings.REDIS_URL or "redis://127.0.0.1:6379/11"
    cache.clear()  # the enrolment throttle counts in the cache


@pytest.fixture
def admin_user():
    return UserFactory(username="admin", is_staff=True, is_superuser=True)


def agent_state(**extra) -> dict:
    return {"agent_version": "0.1.0", "devices": [{"kind": "cpu", "name": "x86"}], **extra}


def enrol(slug: str, admin_user) -> APIClient:
    """A site enrolled through the API; returns the client holding its credential."""
    site = SiteFactory(slug=slug, name=slug)
    token = sites.issue_enrolment_token(site, created_by=admin_user)
    response = APIClient().post("/api/site/enrol/", {"token": token, **agent_state()})
    assert response.status_code == 201, response.json()
    agent = APIClient()
    agent.credentials(HTTP_AUTHORIZATION=f"Site {response.json()['credential']}")
    agent.site = site
    agent.enrolment = response.json()
    return agent


def declaration(**change) -> dict:
    return {
        "num_classes": 2, "class_names": CLASSES, "channels": 1, "storage_format": "folder",
        "num_samples": 30, "counts_per_class": [20, 10], "image_shape": [32, 32],
        "spacing": [1.0, 1.0], "statistics": {"intensity_mean": 0.4}, **change,
    }  # fmt: skip


@pytest.fixture
def federation_round(admin_user):
    """Sites a and b enrolled, both declared `lesions`; an experiment over them is running
    round 1, each site's client pending."""
    agents = {slug: enrol(slug, admin_user) for slug in ("a", "b")}
    for agent in agents.values():
        response = agent.put("/api/site/datasets/lesions/", declaration(), format="json")
        assert response.status_code in (200, 201), response.json()
    experiment = Experiment.objects.create(
        owner=admin_user, name="two sites", dataset=Dataset.objects.get(name="lesions"),
        clients_per_round=2, min_clients=2, num_rounds=2, batch_size=8, seed=0,
    )  # fmt: skip
    experiment.sites.set([agent.site for agent in agents.values()])
    services.start_experiment(experiment.pk)
    updates = {u.site.slug: u for u in ClientUpdate.objects.select_related("site", "round")}
    return agents, experiment, updates


def claim(agent, update) -> dict:
    response = agent.post(
        f"/api/site/tasks/{update.pk}/claim/", {"round": update.round_id, "worker": "gpu0@a"}
    )
    assert response.status_code == 200, response.json()
    return response.json()


def upload(agent, update, body: bytes, *, sha256: str | None = None):
    return agent.put(
        f"/api/site/tasks/{update.pk}/update/",
        data=body,
        content_type="application/octet-stream",
        HTTP_X_CONTENT_SHA256=sha256 or hashlib.sha256(body).hexdigest(),
    )


def trained_weights(agent, update) -> dict[str, torch.Tensor]:
    response = agent.get(f"/api/site/tasks/{update.pk}/weights/")
    weights = load_weights(b"".join(response.streaming_content))
    return {name: tensor + 0.01 if tensor.is_floating_point() else tensor
            for name, tensor in weights.items()}  # fmt: skip


# --- Enrolment ---------------------------------------------------------------------------


def test_an_enrolment_token_gives_the_site_a_credential_and_its_own_broker_user(admin_user):
    agent = enrol("st-mary", admin_user)

    assert agent.enrolment["site"] == {"slug": "st-mary", "name": "st-mary"}
    assert agent.enrolment["queue"] == "site.st-mary"
    assert agent.enrolment["broker_url"].startswith("rediss://site.st-mary:")
    assert agent.enrolment["broker_url"].endswith("@broker.example.org:6380/0")
    assert agent.get("/api/site/me/").json()["slug"] == "st-mary"
    credential = SiteCredential.objects.get()
    # Only hashes are kept: neither secret is in the database.
    assert agent.enrolment["credential"] not in (credential.key_sha256, credential.key_prefix)
    assert (
        credential.key_sha256 == hashlib.sha256(agent.enrolment["credential"].encode()).hexdigest()
    )


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        ("unknown", "not valid"),
        ("reused", "already been used"),
        ("expired", "expired at"),
    ],
)
def test_a_bad_enrolment_token_is_refused_and_creates_nothing(admin_user, spoil, message):
    site = SiteFactory(slug="st-mary")
    token = sites.issue_enrolment_token(site, created_by=admin_user)
    if spoil == "unknown":
        token = token[:-2] + "xx"
    elif spoil == "reused":
        assert (
            APIClient().post("/api/site/enrol/", {"token": token, **agent_state()}).status_code
            == 201
        )
    else:
        EnrolmentToken.objects.update(expires_at=timezone.now() - timedelta(minutes=1))
    credentials_before = SiteCredential.objects.count()

    response = APIClient().post("/api/site/enrol/", {"token": token, **agent_state()})

    assert response.status_code == 400
    assert message in response.json()["token"][0]
    assert SiteCredential.objects.count() == credentials_before


def test_guessing_enrolment_tokens_is_throttled():
    answers = [
        APIClient().post("/api/site/enrol/", {"token": f"guess-{n}", **agent_state()}).status_code
        for n in range(31)
    ]

    assert answers[:30] == [400] * 30
    assert answers[30] == 429


def test_a_server_without_a_site_broker_cannot_issue_enrolment_tokens(settings):
    settings.FEDLENS_SITE_BROKER_URL = ""

    with pytest.raises(sites.SitesNotConfigured, match="FEDLENS_SITE_BROKER_URL"):
        sites.issue_enrolment_token(SiteFactory())

    assert not EnrolmentToken.objects.exists()


def test_the_enrol_site_command_prints_a_token_that_enrols_once(admin_user, capsys):
    call_command("enrol_site", "--slug", "st-anne", "--name", "St Anne", "--expires-hours", "2")
    token = capsys.readouterr().out.strip()

    first = APIClient().post("/api/site/enrol/", {"token": token, **agent_state()})
    second = APIClient().post("/api/site/enrol/", {"token": token, **agent_state()})

    assert first.status_code == 201
    assert first.json()["site"]["name"] == "St Anne"
    assert second.status_code == 400


# --- Credentials ---------------------------------------------------------------------------


def test_a_wrong_site_credential_is_refused():
    agent = APIClient()
    agent.credentials(HTTP_AUTHORIZATION="Site 0123456789ab.not-the-secret")

    response = agent.get("/api/site/me/")

    assert response.status_code == 401
    assert "unknown or revoked" in response.json()["detail"]


def test_a_revoked_site_is_refused(admin_user):
    agent = enrol("st-mary", admin_user)

    call_command("revoke_site", "--slug", "st-mary")

    assert agent.get("/api/site/me/").status_code == 401
    agent.site.refresh_from_db()
    assert agent.site.is_active is False


def test_a_rotated_credential_replaces_the_old_one_at_once(admin_user):
    agent = enrol("st-mary", admin_user)

    rotated = agent.post("/api/site/credentials/rotate/")

    assert rotated.status_code == 200
    assert agent.get("/api/site/me/").status_code == 401
    agent.credentials(HTTP_AUTHORIZATION=f"Site {rotated.json()['credential']}")
    assert agent.get("/api/site/me/").status_code == 200


def test_a_user_token_does_not_open_the_site_api_nor_a_site_credential_the_user_api(
    admin_user,
):
    agent = enrol("st-mary", admin_user)
    user = APIClient()
    user.force_authenticate(admin_user)

    assert user.get("/api/site/me/").status_code in (401, 403)
    assert agent.get("/api/experiments/").status_code == 401


def test_a_heartbeat_records_the_agent_and_its_devices(admin_user):
    agent = enrol("st-mary", admin_user)
    devices = [{"kind": "cuda", "name": "NVIDIA H200", "memory_mb": 143_000}]

    response = agent.post(
        "/api/site/heartbeat/",
        {"agent_version": "0.2.0", "devices": devices, "requires_approval": True},
        format="json",
    )

    assert response.status_code == 200
    agent.site.refresh_from_db()
    assert (agent.site.agent_version, agent.site.requires_approval) == ("0.2.0", True)
    assert agent.site.devices[0]["name"] == "NVIDIA H200"
    assert agent.site.is_connected


# --- Datasets ------------------------------------------------------------------------------


def test_declared_datasets_make_one_federated_dataset_without_any_path(admin_user):
    first, second = enrol("a", admin_user), enrol("b", admin_user)

    assert first.put("/api/site/datasets/lesions/", declaration(), format="json").status_code == 201
    assert (
        second.put("/api/site/datasets/lesions/", declaration(), format="json").status_code == 201
    )

    dataset = Dataset.objects.get(name="lesions")
    assert dataset.is_federated and dataset.path == ""
    assert dataset.owner == admin_user
    assert sorted(dataset.declarations.values_list("site__slug", flat=True)) == ["a", "b"]


def test_a_declaration_with_other_classes_is_refused_and_changes_nothing(admin_user):
    first, second = enrol("a", admin_user), enrol("b", admin_user)
    first.put("/api/site/datasets/lesions/", declaration(), format="json")

    response = second.put(
        "/api/site/datasets/lesions/",
        declaration(num_classes=3, class_names=["a", "b", "c"], counts_per_class=[10, 10, 10]),
        format="json",
    )

    assert response.status_code == 409
    assert "2 classes" in response.json()["detail"]
    assert not SiteDataset.objects.filter(site=second.site).exists()
    assert Dataset.objects.get(name="lesions").num_classes == 2


def test_a_declaration_whose_counts_do_not_add_up_is_refused(admin_user):
    agent = enrol("a", admin_user)

    response = agent.put(
        "/api/site/datasets/lesions/", declaration(counts_per_class=[1, 1]), format="json"
    )

    assert response.status_code == 400
    assert "add up to num_samples" in response.json()["counts_per_class"][0]
    assert not Dataset.objects.exists()


# --- Approvals -----------------------------------------------------------------------------


def test_an_experiment_waits_for_the_approval_of_a_site_that_requires_it(admin_user):
    agents = {slug: enrol(slug, admin_user) for slug in ("a", "b")}
    for agent in agents.values():
        agent.put("/api/site/datasets/lesions/", declaration(), format="json")
    agents["b"].post("/api/site/heartbeat/", agent_state(requires_approval=True), format="json")
    experiment = Experiment.objects.create(
        owner=admin_user, name="needs b", dataset=Dataset.objects.get(name="lesions"),
        clients_per_round=2, min_clients=2, batch_size=8,
    )  # fmt: skip
    experiment.sites.set([agent.site for agent in agents.values()])

    services.start_experiment(experiment.pk)
    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.QUEUED
    assert agents["b"].get("/api/site/approvals/").json()[0]["status"] == "pending"

    decided = agents["b"].post(f"/api/site/approvals/{experiment.pk}/", {"decision": "approve"})

    assert decided.status_code == 200
    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.RUNNING
    assert experiment.approvals.get().status == ApprovalStatus.APPROVED


def test_a_refusal_that_leaves_too_few_sites_fails_the_experiment_with_the_reason(admin_user):
    agents = {slug: enrol(slug, admin_user) for slug in ("a", "b")}
    for agent in agents.values():
        agent.put("/api/site/datasets/lesions/", declaration(), format="json")
        agent.post("/api/site/heartbeat/", agent_state(requires_approval=True), format="json")
    experiment = Experiment.objects.create(
        owner=admin_user, name="refused", dataset=Dataset.objects.get(name="lesions"),
        clients_per_round=2, min_clients=2, batch_size=8,
    )  # fmt: skip
    experiment.sites.set([agent.site for agent in agents.values()])
    services.start_experiment(experiment.pk)

    agents["a"].post(f"/api/site/approvals/{experiment.pk}/", {"decision": "approve"})
    refusal_without_reason = agents["b"].post(
        f"/api/site/approvals/{experiment.pk}/", {"decision": "refuse"}
    )
    agents["b"].post(
        f"/api/site/approvals/{experiment.pk}/",
        {"decision": "refuse", "reason": "Not covered by our ethics approval."},
    )

    assert refusal_without_reason.status_code == 400
    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.FAILED
    assert "Too few sites approved" in experiment.failure_reason


# --- Tasks ---------------------------------------------------------------------------------


def test_a_site_trains_through_the_api_and_the_round_closes_once_both_report(federation_round):
    agents, experiment, updates = federation_round

    for slug, agent in agents.items():
        task = claim(agent, updates[slug])
        assert task["site"] == slug and task["kind"] == "train"
        assert task["data"]["name"] == "lesions"
        body = weights_to_bytes(trained_weights(agent, updates[slug]))
        assert upload(agent, updates[slug], body).status_code == 201
        reported = agent.post(
            f"/api/site/tasks/{updates[slug].pk}/result/",
            {"num_samples": 30, "metrics": {"loss": 0.5, "accuracy": 0.8, "device": "cpu"}},
            format="json",
        )
        assert reported.json() == {"recorded": True}

    statuses = set(ClientUpdate.objects.values_list("status", flat=True))
    assert statuses == {ClientUpdateStatus.SUCCEEDED}
    assert experiment.rounds.get(number=1).status == RoundStatus.AGGREGATING


def test_a_site_credential_gets_403_on_another_sites_task_and_weights(federation_round):
    agents, _, updates = federation_round
    claim(agents["b"], updates["b"])

    claimed = agents["a"].post(
        f"/api/site/tasks/{updates['b'].pk}/claim/", {"round": updates["b"].round_id}
    )
    weights = agents["a"].get(f"/api/site/tasks/{updates['b'].pk}/weights/")
    uploaded = upload(agents["a"], updates["b"], b"anything")

    assert (claimed.status_code, weights.status_code, uploaded.status_code) == (403, 403, 403)
    assert "another site" in claimed.json()["detail"]
    assert ClientUpdate.objects.get(pk=updates["b"].pk).status == ClientUpdateStatus.RUNNING


def test_the_weights_come_with_their_hash_as_etag_and_resume_from_a_range(federation_round):
    agents, _, updates = federation_round
    agent, update = agents["a"], updates["a"]
    task = claim(agent, update)
    url = f"/api/site/tasks/{update.pk}/weights/"

    whole = agent.get(url)
    body = b"".join(whole.streaming_content)
    tail = agent.get(url, HTTP_RANGE="bytes=100-")
    unchanged = agent.get(url, HTTP_IF_NONE_MATCH=whole["ETag"])
    outside = agent.get(url, HTTP_RANGE=f"bytes={len(body) + 5}-")

    assert whole["ETag"] == f'"{task["weights_sha256"]}"'
    assert hashlib.sha256(body).hexdigest() == task["weights_sha256"]
    assert tail.status_code == 206
    assert tail["Content-Range"] == f"bytes 100-{len(body) - 1}/{len(body)}"
    assert b"".join(tail.streaming_content) == body[100:]
    assert unchanged.status_code == 304
    assert outside.status_code == 416


@pytest.mark.parametrize(
    ("spoil", "status", "message"),
    [
        ("tampered", 400, "SHA-256"),
        ("shapes", 400, "the network's is"),
        ("not-safetensors", 400, "not a valid safetensors file"),
        ("too-large", 413, "produces at most"),
        ("non-finite", 400, "NaN or infinite"),
    ],
)
def test_a_bad_upload_is_refused_and_the_client_recorded_as_failed(
    federation_round, spoil, status, message
):
    agents, _, updates = federation_round
    agent, update = agents["a"], updates["a"]
    claim(agent, update)
    weights = trained_weights(agent, update)
    body = weights_to_bytes(weights)
    sha256 = None
    if spoil == "tampered":
        sha256 = hashlib.sha256(body).hexdigest()
        body = body[:-4] + b"\x00\x00\x80\x7f"  # the last value changed after hashing
    elif spoil == "shapes":
        name = next(n for n, t in weights.items() if t.is_floating_point())
        weights[name] = torch.zeros(3, 3)
        body = weights_to_bytes(weights)
    elif spoil == "not-safetensors":
        body = b"\x80\x04\x95" + b"pickle" * 50
    elif spoil == "too-large":
        body = weights_to_bytes({**weights, "extra": torch.zeros(1_000_000)})
    else:
        name = next(n for n, t in weights.items() if t.is_floating_point())
        weights[name] = torch.full_like(weights[name], float("nan"))
        body = weights_to_bytes(weights)

    response = upload(agent, update, body, sha256=sha256)

    assert response.status_code == status
    assert message in response.json()["detail"]
    refused = ClientUpdate.objects.get(pk=update.pk)
    assert refused.status == ClientUpdateStatus.FAILED
    assert "Update refused" in refused.error
    assert not refused.update_file


def test_a_report_without_an_upload_or_with_more_samples_than_declared_is_refused(
    federation_round,
):
    agents, _, updates = federation_round
    agent, update = agents["a"], updates["a"]
    claim(agent, update)
    url = f"/api/site/tasks/{update.pk}/result/"

    early = agent.post(url, {"num_samples": 30, "metrics": {"loss": 0.1}}, format="json")
    upload(agent, update, weights_to_bytes(trained_weights(agent, update)))
    inflated = agent.post(url, {"num_samples": 31, "metrics": {"loss": 0.1}}, format="json")
    bad_metric = agent.post(url, {"num_samples": 3, "metrics": {"loss": [1]}}, format="json")

    assert early.status_code == 400 and "Upload the trained weights first" in early.json()["detail"]
    assert inflated.status_code == 400 and "exceeds the 30 samples" in str(inflated.json())
    assert bad_metric.status_code == 400
    assert ClientUpdate.objects.get(pk=update.pk).status == ClientUpdateStatus.RUNNING


def test_a_site_reports_its_failure_and_a_second_report_is_not_counted(federation_round):
    agents, _, updates = federation_round
    agent, update = agents["a"], updates["a"]
    claim(agent, update)
    url = f"/api/site/tasks/{update.pk}/failure/"

    first = agent.post(url, {"error": "CUDA out of memory"})
    second = agent.post(url, {"error": "again"})

    assert first.json() == {"recorded": True}
    assert second.status_code == 409
    failed = ClientUpdate.objects.get(pk=update.pk)
    assert failed.status == ClientUpdateStatus.FAILED
    assert failed.error == "Reported by the site: CUDA out of memory"


def test_a_claim_of_a_finished_task_answers_409(federation_round):
    agents, experiment, updates = federation_round
    services.stop_experiment(experiment.pk)

    response = agents["a"].post(
        f"/api/site/tasks/{updates['a'].pk}/claim/", {"round": updates["a"].round_id}
    )

    assert response.status_code == 409
    assert "needs no work" in response.json()["detail"]
