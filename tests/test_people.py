"""Roles (accounts/rules.py): what an admin, a researcher, a viewer and a site operator may do
to experiments, datasets and sites; and a dataset folder that belongs to one owner only."""

import pytest
from django.contrib.auth.models import Group

from accounts.models import SiteOperator
from accounts.rules import ADMIN, RESEARCHER, ROLES, SITE_OPERATOR, VIEWER
from tests.conftest import client_for
from tests.factories import DatasetFactory, ExperimentFactory, SiteFactory, UserFactory
from training.models import (
    ApprovalStatus,
    Dataset,
    Experiment,
    ExperimentApproval,
    ExperimentStatus,
)

pytestmark = pytest.mark.django_db


def user_with_role(username: str, role: str | None):
    user = UserFactory(username=username)
    if role is not None:
        user.groups.add(Group.objects.get(name=role))
    return user


@pytest.fixture
def people():
    """Who is who around one experiment and one dataset of the researcher `owner`."""
    owner = user_with_role("owner", RESEARCHER)
    viewer = user_with_role("viewer", VIEWER)
    experiment = ExperimentFactory(owner=owner, members=[viewer])
    return {
        "experiment": experiment,
        "dataset": experiment.dataset,
        "users": {
            "admin": user_with_role("admin", ADMIN),
            "owner": owner,
            "researcher": user_with_role("researcher", RESEARCHER),
            "viewer": viewer,
            "outsider": user_with_role("outsider", VIEWER),
            "operator": user_with_role("operator", SITE_OPERATOR),
        },
    }


def test_the_migration_makes_one_group_per_role():
    assert set(Group.objects.values_list("name", flat=True)) >= set(ROLES)


def test_joining_the_admin_group_makes_a_user_staff_and_leaving_it_ends_that():
    user = user_with_role("ana", ADMIN)
    user.refresh_from_db()
    assert user.is_staff

    user.groups.remove(Group.objects.get(name=ADMIN))

    user.refresh_from_db()
    assert not user.is_staff


def test_a_user_in_no_role_group_has_the_default_role(settings, dataset_root):
    plain = UserFactory(username="plain")
    payload = {"name": "mine", "path": str(dataset_root), "storage_format": "folder",
               "num_classes": 2}  # fmt: skip
    assert client_for(plain).post("/api/datasets/", payload).status_code == 201

    settings.FEDLENS_DEFAULT_ROLE = VIEWER
    plain = type(plain).objects.get(pk=plain.pk)  # roles are read once per user object
    response = client_for(plain).post("/api/datasets/", {**payload, "name": "again"})

    assert response.status_code == 403
    assert "researcher role" in response.json()["detail"]


# --- The matrix: each role x each action, on experiments -----------------------------------

#                                  admin owner researcher viewer outsider operator
EXPERIMENT_MATRIX = {
    "read": (200, 200, 404, 200, 404, 404),
    "change": (200, 200, 404, 403, 404, 404),
    "start": (200, 200, 404, 403, 404, 404),
    "stop": (200, 200, 404, 403, 404, 404),
    "delete": (204, 204, 404, 403, 404, 404),
}
WHO = ["admin", "owner", "researcher", "viewer", "outsider", "operator"]


def act_on_experiment(client, experiment: Experiment, action: str):
    url = f"/api/experiments/{experiment.pk}/"
    if action == "read":
        return client.get(url)
    if action == "change":
        return client.patch(url, {"description": "changed"})
    if action == "start":
        return client.post(f"{url}start/")
    if action == "stop":
        experiment.transition_to(ExperimentStatus.RUNNING)
        return client.post(f"{url}stop/")
    return client.delete(url)


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("action", list(EXPERIMENT_MATRIX))
def test_who_may_act_on_an_experiment(people, who, action):
    experiment = people["experiment"]

    response = act_on_experiment(client_for(people["users"][who]), experiment, action)

    expected = EXPERIMENT_MATRIX[action][WHO.index(who)]
    assert response.status_code == expected, response.content
    if action == "delete":
        assert Experiment.objects.filter(pk=experiment.pk).exists() == (expected != 204)
    if action in ("start", "stop") and expected != 200:
        before = ExperimentStatus.DRAFT if action == "start" else ExperimentStatus.RUNNING
        assert Experiment.objects.get(pk=experiment.pk).status == before


@pytest.mark.parametrize(
    ("who", "expected"), list(zip(WHO, (201, 201, 201, 403, 403, 403), strict=True))
)
def test_who_may_create_an_experiment(people, who, expected):
    user = people["users"][who]
    dataset = DatasetFactory(owner=user)

    response = client_for(user).post(
        "/api/experiments/",
        {"name": "new", "dataset": dataset.pk, "sites": [people["experiment"].sites.first().slug],
         "clients_per_round": 1, "num_rounds": 1},
    )  # fmt: skip

    assert response.status_code == expected, response.content


@pytest.mark.parametrize(
    ("who", "expected"), list(zip(WHO, (201, 201, 201, 403, 403, 403), strict=True))
)
def test_who_may_clone_an_experiment(people, who, expected):
    """Cloning creates an experiment: a viewer who sees it still may not."""
    experiment = people["experiment"]
    experiment.members.add(people["users"][who])

    response = client_for(people["users"][who]).post(f"/api/experiments/{experiment.pk}/clone/")

    assert response.status_code == expected, response.content


# --- ... on datasets ----------------------------------------------------------------------

#                                  admin owner researcher viewer outsider operator
DATASET_MATRIX = {
    "read": (200, 200, 404, 404, 404, 404),
    "change": (200, 200, 404, 404, 404, 404),
    "delete": (204, 204, 404, 404, 404, 404),
}


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("action", list(DATASET_MATRIX))
def test_who_may_act_on_a_dataset(people, who, action):
    dataset = DatasetFactory(owner=people["users"]["owner"])
    client, url = client_for(people["users"][who]), f"/api/datasets/{dataset.pk}/"

    if action == "read":
        response = client.get(url)
    elif action == "change":
        response = client.patch(url, {"description": "changed"})
    else:
        response = client.delete(url)

    expected = DATASET_MATRIX[action][WHO.index(who)]
    assert response.status_code == expected, response.content
    if action == "delete":
        assert Dataset.objects.filter(pk=dataset.pk).exists() == (expected != 204)


def test_an_owner_who_became_a_viewer_may_no_longer_change_their_dataset(people):
    owner = people["users"]["owner"]
    dataset = DatasetFactory(owner=owner)
    owner.groups.set([Group.objects.get(name=VIEWER)])

    response = client_for(owner).patch(f"/api/datasets/{dataset.pk}/", {"description": "x"})

    assert response.status_code == 403
    assert "its owner" in response.json()["detail"]


@pytest.mark.parametrize(
    ("who", "expected"), list(zip(WHO, (201, 201, 201, 403, 403, 403), strict=True))
)
def test_who_may_register_a_dataset(people, who, expected, dataset_root):
    folder = dataset_root / who
    folder.mkdir()

    response = client_for(people["users"][who]).post(
        "/api/datasets/",
        {"name": f"{who}-data", "path": str(folder), "storage_format": "folder", "num_classes": 2},
    )

    assert response.status_code == expected, response.content


def test_a_viewer_may_not_upload_a_dataset(people):
    response = client_for(people["users"]["viewer"]).post(
        "/api/datasets/upload/", {"name": "x"}, format="multipart"
    )

    assert response.status_code == 403


# --- Site operators -----------------------------------------------------------------------


@pytest.fixture
def operated():
    """An operator of `own`; `other` is someone else's site."""
    operator = user_with_role("operator", SITE_OPERATOR)
    own, other = SiteFactory(slug="own"), SiteFactory(slug="other")
    SiteOperator.objects.create(user=operator, site=own)
    return operator, own, other


def test_an_operator_changes_their_site_and_not_another(operated):
    operator, own, other = operated
    client = client_for(operator)

    assert client.patch(f"/api/sites/{own.pk}/", {"description": "ours"}).status_code == 200
    refused = client.patch(f"/api/sites/{other.pk}/", {"description": "mine now"})

    assert refused.status_code == 403
    other.refresh_from_db()
    assert other.description == ""


def test_an_operator_may_neither_create_nor_delete_sites(operated):
    operator, own, _ = operated
    client = client_for(operator)

    assert client.post("/api/sites/", {"name": "New", "slug": "new"}).status_code == 403
    assert client.delete(f"/api/sites/{own.pk}/").status_code == 403


def test_an_operator_assigned_a_site_without_the_role_may_not_change_it(operated):
    operator, own, _ = operated
    operator.groups.set([Group.objects.get(name=RESEARCHER)])

    assert client_for(operator).patch(f"/api/sites/{own.pk}/", {}).status_code == 403


def test_an_operator_issues_enrolment_tokens_for_their_site_only(operated, settings):
    settings.FEDLENS_SITE_BROKER_URL = "rediss://broker.example.org:6380/0"
    settings.REDIS_URL = settings.REDIS_URL or "redis://127.0.0.1:6379/12"
    operator, own, other = operated
    client = client_for(operator)

    issued = client.post(f"/api/sites/{own.pk}/enrolment-token/")
    refused = client.post(f"/api/sites/{other.pk}/enrolment-token/")

    assert issued.status_code == 201
    assert len(issued.json()["token"]) > 30
    assert own.enrolment_tokens.count() == 1
    assert refused.status_code == 403
    assert other.enrolment_tokens.count() == 0


def test_an_operator_decides_the_approvals_of_their_site_only(operated):
    operator, own, other = operated
    experiment = ExperimentFactory(sites=[own, other], status=ExperimentStatus.QUEUED)
    for site in (own, other):
        ExperimentApproval.objects.create(experiment=experiment, site=site)
    client = client_for(operator)

    listed = client.get(f"/api/sites/{own.pk}/approvals/")
    refused = client.post(f"/api/sites/{other.pk}/approvals/{experiment.pk}/",
                          {"decision": "approve"})  # fmt: skip
    decided = client.post(f"/api/sites/{own.pk}/approvals/{experiment.pk}/",
                          {"decision": "refuse", "reason": "not our protocol"})  # fmt: skip

    assert [row["experiment"] for row in listed.json()] == [experiment.pk]
    assert refused.status_code == 403
    assert decided.status_code == 200, decided.content
    statuses = dict(experiment.approvals.values_list("site__slug", "status"))
    assert statuses == {"own": ApprovalStatus.REFUSED, "other": ApprovalStatus.PENDING}


# --- A folder belongs to one owner ----------------------------------------------------------


@pytest.fixture
def someone_elses_folder(dataset_root):
    """`dataset_root/hers` is registered as Hanna's dataset `secret-cohort-7`."""
    folder = dataset_root / "hers"
    (folder / "inner").mkdir(parents=True)
    hanna = UserFactory(username="hanna-k")
    DatasetFactory(owner=hanna, name="secret-cohort-7", path=str(folder))
    return folder


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_a_folder_of_another_owners_dataset_cannot_be_registered(someone_elses_folder, where):
    path = {
        "same": someone_elses_folder,
        "inside": someone_elses_folder / "inner",
        "containing": someone_elses_folder.parent,
    }[where]
    intruder = UserFactory(username="intruder")

    response = client_for(intruder).post(
        "/api/datasets/",
        {"name": "mine", "path": str(path), "storage_format": "folder", "num_classes": 2},
    )

    assert response.status_code == 400
    message = str(response.json())
    assert "another user" in message
    assert "secret-cohort-7" not in message and "hanna" not in message
    assert not Dataset.objects.filter(owner=intruder).exists()


def test_a_dataset_cannot_be_moved_onto_another_owners_folder(someone_elses_folder, dataset_root):
    own_folder = dataset_root / "mine"
    own_folder.mkdir()
    mine = DatasetFactory(owner=UserFactory(username="me"), path=str(own_folder))

    response = client_for(mine.owner).patch(
        f"/api/datasets/{mine.pk}/", {"path": str(someone_elses_folder / "inner")}
    )

    assert response.status_code == 400
    assert "secret-cohort-7" not in str(response.json())
    mine.refresh_from_db()
    assert mine.path == str(own_folder)


def test_an_owner_may_register_their_own_folder_again(someone_elses_folder):
    hanna = Dataset.objects.get(name="secret-cohort-7").owner

    response = client_for(hanna).post(
        "/api/datasets/",
        {"name": "second-look", "path": str(someone_elses_folder / "inner"),
         "storage_format": "folder", "num_classes": 2},
    )  # fmt: skip

    assert response.status_code == 201, response.content


def test_a_sibling_folder_with_a_common_prefix_is_not_someone_elses(someone_elses_folder):
    sibling = someone_elses_folder.parent / "hers-too"  # "hers" is a prefix of its name
    sibling.mkdir()

    response = client_for(UserFactory()).post(
        "/api/datasets/",
        {"name": "sibling", "path": str(sibling), "storage_format": "folder", "num_classes": 2},
    )

    assert response.status_code == 201, response.content


def test_refusals_name_no_other_users_dataset_nor_username(someone_elses_folder):
    """Every way a stranger can refer to the dataset answers without its name or owner."""
    hidden = Dataset.objects.get(name="secret-cohort-7")
    stranger = client_for(UserFactory(username="stranger"))
    answers = [
        stranger.get(f"/api/datasets/{hidden.pk}/"),
        stranger.patch(f"/api/datasets/{hidden.pk}/", {"description": "x"}),
        stranger.post("/api/experiments/", {"name": "e", "dataset": hidden.pk}),
        stranger.get(f"/api/datasets/{hidden.pk}/images/"),
    ]

    for answer in answers:
        assert 400 <= answer.status_code < 500
        text = answer.content.decode()
        assert "secret-cohort-7" not in text and "hanna" not in text, text


@pytest.mark.parametrize("page", ["/experiments/new/", "/sweeps/new/"])
def test_a_viewer_is_refused_the_pages_that_create(people, client, page):
    client.force_login(people["users"]["viewer"])

    response = client.get(page)

    assert response.status_code == 403
    assert "researcher role" in response.content.decode()
    client.force_login(people["users"]["owner"])
    assert client.get(page).status_code == 200
