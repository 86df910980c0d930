"""Who may do what, endpoint by endpoint: anonymous, owner, member, other user, staff."""

import hashlib

import pytest
from django.core.files.base import ContentFile

from tests.conftest import client_for
from tests.factories import (
    CheckpointFactory,
    ClientUpdateFactory,
    DatasetFactory,
    ExperimentFactory,
    RoundFactory,
    SiteFactory,
    UserFactory,
)
from training.models import ExperimentStatus

pytestmark = pytest.mark.django_db

ROLES = ["anonymous", "owner", "member", "other", "staff"]


@pytest.fixture
def world():
    """One experiment with its ledger, seen from each role."""
    owner = UserFactory(username="owner")
    member = UserFactory(username="member")
    experiment = ExperimentFactory(owner=owner, members=[member])
    first_round = RoundFactory(experiment=experiment, number=1)
    update = ClientUpdateFactory(round=first_round, site=experiment.sites.first())
    weights = b"safetensors bytes"
    checkpoint = CheckpointFactory(
        experiment=experiment,
        round=first_round,
        file=ContentFile(weights, name="round-1.safetensors"),
        sha256=hashlib.sha256(weights).hexdigest(),
    )
    users = {
        "anonymous": None,
        "owner": owner,
        "member": member,
        "other": UserFactory(username="other"),
        "staff": UserFactory(username="staff", is_staff=True),
    }
    return {
        "users": users,
        "experiment": experiment,
        "round": first_round,
        "update": update,
        "checkpoint": checkpoint,
        "weights": weights,
    }


def by_role(*statuses):
    return list(zip(ROLES, statuses, strict=True))


def expect(role, matrix):
    return matrix[ROLES.index(role)]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    ("url", "matrix"),
    [
        #                                       anon owner member other staff
        ("/api/experiments/{experiment}/", (401, 200, 200, 404, 200)),
        ("/api/rounds/{round}/", (401, 200, 200, 404, 200)),
        ("/api/client-updates/{update}/", (401, 200, 200, 404, 200)),
        ("/api/checkpoints/{checkpoint}/", (401, 200, 200, 404, 200)),
        ("/api/checkpoints/{checkpoint}/download/", (401, 200, 200, 404, 200)),
        ("/api/datasets/{dataset}/", (401, 200, 404, 404, 200)),
        ("/api/sites/{site}/", (401, 200, 200, 200, 200)),
    ],
)
def test_reading_one_object(world, role, url, matrix):
    ids = {
        "experiment": world["experiment"].pk,
        "round": world["round"].pk,
        "update": world["update"].pk,
        "checkpoint": world["checkpoint"].pk,
        "dataset": world["experiment"].dataset_id,
        "site": world["update"].site_id,
    }

    response = client_for(world["users"][role]).get(url.format(**ids))

    assert response.status_code == expect(role, matrix)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    ("url", "visible"),
    [
        #                                anon  owner member other staff
        ("/api/experiments/", (None, 1, 1, 0, 1)),
        ("/api/rounds/", (None, 1, 1, 0, 1)),
        ("/api/client-updates/", (None, 1, 1, 0, 1)),
        ("/api/checkpoints/", (None, 1, 1, 0, 1)),
        ("/api/datasets/", (None, 1, 0, 0, 1)),
    ],
)
def test_lists_show_only_what_the_user_may_see(world, role, url, visible):
    ExperimentFactory()  # someone else's, seen by staff only

    response = client_for(world["users"][role]).get(url)

    if role == "anonymous":
        assert response.status_code == 401
        return
    assert response.status_code == 200
    ids = {row["id"] for row in response.json()["results"]}
    own_ids = {
        "/api/experiments/": world["experiment"].pk,
        "/api/rounds/": world["round"].pk,
        "/api/client-updates/": world["update"].pk,
        "/api/checkpoints/": world["checkpoint"].pk,
        "/api/datasets/": world["experiment"].dataset_id,
    }
    assert (own_ids[url] in ids) == bool(expect(role, visible))
    if role == "staff":
        model = response.renderer_context["view"].get_queryset().model
        assert ids == set(model.objects.values_list("pk", flat=True))
    else:
        assert len(ids) == expect(role, visible)


@pytest.mark.parametrize(("role", "expected"), by_role(401, 200, 403, 404, 200))
def test_editing_an_experiment(world, role, expected):
    response = client_for(world["users"][role]).patch(
        f"/api/experiments/{world['experiment'].pk}/", {"description": "new"}
    )

    assert response.status_code == expected


@pytest.mark.parametrize(("role", "expected"), by_role(401, 204, 403, 404, 204))
def test_deleting_an_experiment(world, role, expected):
    response = client_for(world["users"][role]).delete(
        f"/api/experiments/{world['experiment'].pk}/"
    )

    assert response.status_code == expected


@pytest.mark.parametrize(("role", "expected"), by_role(401, 200, 403, 404, 200))
def test_starting_an_experiment(world, role, expected):
    world["experiment"].rounds.all().delete()

    response = client_for(world["users"][role]).post(
        f"/api/experiments/{world['experiment'].pk}/start/"
    )

    assert response.status_code == expected
    world["experiment"].refresh_from_db()
    started = world["experiment"].status == ExperimentStatus.RUNNING
    assert started == (expected == 200)


@pytest.mark.parametrize(("role", "expected"), by_role(401, 200, 403, 404, 200))
def test_stopping_an_experiment(world, role, expected):
    world["experiment"].transition_to(ExperimentStatus.RUNNING)

    response = client_for(world["users"][role]).post(
        f"/api/experiments/{world['experiment'].pk}/stop/"
    )

    assert response.status_code == expected
    world["experiment"].refresh_from_db()
    assert (world["experiment"].status == ExperimentStatus.STOPPED) == (expected == 200)


@pytest.mark.parametrize(("role", "expected"), by_role(401, 403, 403, 403, 201))
def test_only_staff_create_sites(world, role, expected):
    response = client_for(world["users"][role]).post(
        "/api/sites/", {"name": "St Elsewhere", "slug": "st-elsewhere"}
    )

    assert response.status_code == expected


@pytest.mark.parametrize(("role", "expected"), by_role(401, 403, 403, 403, 200))
def test_only_staff_change_sites(world, role, expected):
    site = SiteFactory()

    response = client_for(world["users"][role]).patch(
        f"/api/sites/{site.pk}/", {"is_active": False}
    )

    assert response.status_code == expected


@pytest.mark.parametrize(("role", "expected"), by_role(401, 200, 404, 404, 200))
def test_changing_a_dataset(world, role, expected):
    response = client_for(world["users"][role]).patch(
        f"/api/datasets/{world['experiment'].dataset_id}/", {"description": "CT scans"}
    )

    assert response.status_code == expected


@pytest.mark.parametrize("url", ["/api/rounds/", "/api/client-updates/", "/api/checkpoints/"])
def test_the_ledger_cannot_be_written_through_the_api(world, url):
    response = client_for(world["users"]["staff"]).post(url, {})

    assert response.status_code == 405


def test_download_returns_the_stored_weights_with_their_hash(world):
    response = client_for(world["users"]["member"]).get(
        f"/api/checkpoints/{world['checkpoint'].pk}/download/"
    )

    assert b"".join(response.streaming_content) == world["weights"]
    assert response["X-Checksum-SHA256"] == hashlib.sha256(world["weights"]).hexdigest()
    assert "attachment" in response["Content-Disposition"]


def test_new_experiments_belong_to_their_creator(world, dataset_root):
    other = world["users"]["other"]
    dataset = DatasetFactory(owner=other, path=str(dataset_root))
    site_a, site_b = SiteFactory(), SiteFactory()

    response = client_for(other).post(
        "/api/experiments/",
        {"name": "mine", "dataset": dataset.pk, "sites": [site_a.slug, site_b.slug]},
    )

    assert response.status_code == 201, response.json()
    assert response.json()["owner"] == "other"
    assert response.json()["status"] == "draft"


def test_schema_and_docs_need_a_login(world):
    assert client_for(None).get("/api/schema/").status_code == 401
    assert client_for(world["users"]["other"]).get("/api/schema/").status_code == 200
    assert client_for(world["users"]["other"]).get("/api/docs/").status_code == 200
