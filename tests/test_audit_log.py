"""The audit log: an entry with its actor for each thing people do, in the admin and in the
API (admins see all, others their own)."""

import pytest
from auditlog.models import LogEntry
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.urls import reverse

from accounts.models import SiteOperator
from accounts.rules import SITE_OPERATOR
from tests.conftest import client_for
from tests.factories import (
    DatasetFactory,
    ExperimentFactory,
    SiteFactory,
    UserFactory,
    api_token,
)
from tests.test_federation_e2e import embedded_project, manage  # noqa: F401 - a fixture
from training.models import ExperimentApproval, ExperimentStatus

pytestmark = pytest.mark.django_db
PASSWORD = "correct horse battery staple"


def entries(action: str, **where) -> list[LogEntry]:
    """The entries of one action ('create', 'start', 'login', ...), oldest first."""
    found = LogEntry.objects.filter(**where).order_by("timestamp", "pk")
    return [
        entry
        for entry in found
        if ((entry.additional_data or {}).get("verb") or entry.get_action_display()) == action
    ]


def one(action: str, target) -> LogEntry:
    found = entries(action, object_pk=str(target.pk), content_type__model=target._meta.model_name)
    assert len(found) == 1, [(e.action, e.additional_data) for e in LogEntry.objects.all()]
    return found[0]


@pytest.fixture
def researcher():
    return UserFactory(username="rosa")


@pytest.fixture
def token_client(api_client, researcher):
    """The API as a script uses it: with a token, which DRF reads only in the view."""
    api_client.credentials(HTTP_AUTHORIZATION=f"Token {api_token(researcher)}")
    return api_client


def test_an_experiments_life_is_recorded_with_its_actor(token_client, researcher):
    dataset = DatasetFactory(owner=researcher)
    site = SiteFactory()

    created = token_client.post(
        "/api/experiments/",
        {"name": "lungs", "dataset": dataset.pk, "sites": [site.slug], "clients_per_round": 1},
    )
    experiment_id = created.json()["id"]
    token_client.patch(f"/api/experiments/{experiment_id}/", {"description": "second try"})
    token_client.post(f"/api/experiments/{experiment_id}/start/")
    token_client.post(f"/api/experiments/{experiment_id}/stop/")
    token_client.delete(f"/api/experiments/{experiment_id}/")

    where = {"content_type__model": "experiment", "object_pk": str(experiment_id)}
    actions = [
        (entry.additional_data or {}).get("verb") or entry.get_action_display()
        for entry in LogEntry.objects.filter(**where).order_by("timestamp", "pk")
    ]
    # The sites are recorded as their own entry of the creation (a many-to-many field).
    assert [action for action in actions if action != "update"] == [
        "create", "start", "stop", "delete"
    ]  # fmt: skip
    assert all(entry.actor == researcher for entry in LogEntry.objects.filter(**where)), (
        "every entry names the token's user"
    )
    change = next(
        entry for entry in entries("update", **where) if "description" in entry.changes_dict
    )
    assert change.changes_dict["description"] == ["", "second try"]
    assert entries("start", **where)[0].changes_dict == {}
    assert entries("start", **where)[0].additional_data["status"] == ExperimentStatus.RUNNING


def test_the_workers_bookkeeping_is_not_recorded(researcher):
    experiment = ExperimentFactory(owner=researcher)
    before = LogEntry.objects.count()

    experiment.transition_to(ExperimentStatus.RUNNING)
    experiment.current_round = 3
    experiment.save(update_fields=["current_round"])

    assert LogEntry.objects.count() == before


def test_datasets_registered_and_deleted_are_recorded(token_client, researcher, dataset_root):
    created = token_client.post(
        "/api/datasets/",
        {"name": "scans", "path": str(dataset_root), "storage_format": "folder", "num_classes": 2},
    )
    dataset_id = created.json()["id"]
    token_client.delete(f"/api/datasets/{dataset_id}/")

    where = {"content_type__model": "dataset", "object_pk": str(dataset_id)}
    assert [entry.actor for entry in entries("create", **where)] == [researcher]
    assert [entry.actor for entry in entries("delete", **where)] == [researcher]
    assert entries("create", **where)[0].object_repr == "scans"


def test_sites_enrolment_tokens_and_approvals_are_recorded(settings):
    settings.FEDLENS_SITE_BROKER_URL = "rediss://broker.example.org:6380/0"
    settings.REDIS_URL = settings.REDIS_URL or "redis://127.0.0.1:6379/12"
    admin = UserFactory(username="root", is_staff=True)
    operator = UserFactory(username="olga")
    operator.groups.add(Group.objects.get(name=SITE_OPERATOR))

    site_id = client_for(admin).post("/api/sites/", {"name": "St Anne", "slug": "st-anne"})
    site = SiteOperator.objects.create(user=operator, site_id=site_id.json()["id"]).site
    client_for(operator).post(f"/api/sites/{site.pk}/enrolment-token/")
    experiment = ExperimentFactory(sites=[site], status=ExperimentStatus.QUEUED)
    ExperimentApproval.objects.create(experiment=experiment, site=site)
    client_for(operator).post(f"/api/sites/{site.pk}/approvals/{experiment.pk}/",
                              {"decision": "approve"})  # fmt: skip

    assert one("create", site).actor == admin
    token = site.enrolment_tokens.get()
    assert one("create", token).actor == operator
    assert "token_sha256" not in one("create", token).changes_dict
    assert one("approve", experiment).actor == operator
    assert one("approve", experiment).additional_data["site"] == "st-anne"


def test_enrolment_issues_a_credential_that_is_recorded_without_its_secrets(settings):
    settings.FEDLENS_SITE_BROKER_URL = "rediss://broker.example.org:6380/0"
    settings.REDIS_URL = settings.REDIS_URL or "redis://127.0.0.1:6379/12"
    site = SiteFactory(slug="st-mary")
    from training import sites

    token = sites.issue_enrolment_token(site)
    agent_state = {"agent_version": "0.1.0", "devices": []}
    response = client_for(None).post("/api/site/enrol/", {"token": token, **agent_state})
    assert response.status_code == 201, response.content

    credential = site.credentials.get()
    recorded = one("create", credential)
    assert set(recorded.changes_dict) & {"key_sha256", "broker_password_sha256"} == set()
    assert one("update", site.enrolment_tokens.get()).changes_dict["used_at"][0] == "None"


READ_START_ENTRIES = """
from auditlog.models import LogEntry
for entry in LogEntry.objects.filter(content_type__model="experiment", action=1):
    if (entry.additional_data or {}).get("verb") == "start":
        print(entry.actor.username, entry.additional_data["via"])
"""


def test_the_command_line_records_its_start_with_the_owner(embedded_project):  # noqa: F811
    """run_experiment --owner: the owner is the one acting."""
    env = embedded_project

    result = manage(
        "run_experiment", "--dataset", "lesions", "--clients", "2", "--rounds", "1",
        "--batch-size", "16", "--seed", "0", env=env,
    )  # fmt: skip
    shown = manage("shell", "--no-imports", "-c", READ_START_ENTRIES, env=env)

    assert result.returncode == 0, result.stderr
    assert shown.stdout.split("\n")[:-1] == ["admin manage.py run_experiment"], shown.stderr


def test_sign_ins_failed_sign_ins_sign_outs_and_tokens_are_recorded(client, api_client):
    ana = UserFactory(username="ana")

    client.post("/accounts/login/", {"username": "ana", "password": "wrong"})
    client.post("/accounts/login/", {"username": "ana", "password": PASSWORD})
    client.post("/accounts/logout/")
    token = api_client.post("/api/auth/token/", {"username": "ana", "password": PASSWORD})
    api_client.post("/api/auth/token/", {"username": "ghost", "password": "x"})

    assert [entry.actor for entry in entries("login", object_pk=str(ana.pk))] == [ana]
    assert [entry.actor for entry in entries("logout", object_pk=str(ana.pk))] == [ana]
    failed = entries("login-failed", object_pk=str(ana.pk))
    assert len(failed) == 1 and failed[0].actor is None
    assert failed[0].remote_addr == "127.0.0.1"
    issued = entries("token-issued", object_pk=str(ana.pk))
    assert len(issued) == 1 and issued[0].actor == ana
    assert token.json()["token"] not in str(issued[0].additional_data)  # only its prefix
    ghost = entries("login-failed", object_repr="ghost")
    assert len(ghost) == 1 and ghost[0].object_pk == ""


def test_a_password_change_is_recorded_with_the_tokens_it_ended():
    ana = UserFactory(username="ana")
    api_token(ana)

    ana.set_password("another long passphrase")
    ana.save()

    revoked = entries("tokens-revoked", object_pk=str(ana.pk))
    assert len(revoked) == 1
    assert revoked[0].additional_data["tokens"] == 1
    assert ana.password not in str(LogEntry.objects.filter(object_pk=str(ana.pk)).values())


def test_role_changes_are_recorded(client):
    admin = UserFactory(username="root", is_staff=True, is_superuser=True)
    ana = UserFactory(username="ana")
    client.force_login(admin)

    ana.groups.add(Group.objects.get(name="viewer"))

    changed = entries("update", object_pk=str(ana.pk), content_type__model="user")
    assert any("groups" in entry.changes_dict for entry in changed)


# --- Reading the log ----------------------------------------------------------------------


@pytest.fixture
def two_researchers_acted():
    rosa, tom = UserFactory(username="rosa"), UserFactory(username="tom")
    for user, name in ((rosa, "rosas"), (tom, "toms")):
        client_for(user).post(
            "/api/experiments/",
            {"name": name, "dataset": DatasetFactory(owner=user).pk,
             "sites": [SiteFactory().slug], "clients_per_round": 1},
        )  # fmt: skip
    return rosa, tom


def test_a_researcher_reads_their_own_actions_only(two_researchers_acted):
    rosa, _ = two_researchers_acted

    listed = client_for(rosa).get("/api/audit-log/").json()["results"]

    # Hers, and what happened to her account (made by no one: a factory).
    assert {row["actor"] for row in listed if row["model"] != "auth.user"} == {"rosa"}
    assert {row["object_id"] for row in listed if row["model"] == "auth.user"} == {str(rosa.pk)}
    assert "toms" not in str(listed)


def test_staff_read_every_entry_and_filter_them(two_researchers_acted):
    staff = client_for(UserFactory(username="root", is_staff=True))

    everything = staff.get("/api/audit-log/").json()
    toms = staff.get("/api/audit-log/", {"actor": "tom", "action": "create",
                                         "model": "training.experiment"}).json()  # fmt: skip

    assert {row["actor"] for row in everything["results"]} >= {"rosa", "tom"}
    assert [row["object_repr"] for row in toms["results"]] == ["toms"]
    assert toms["results"][0]["action"] == "create"
    assert toms["results"][0]["model"] == "training.experiment"


def test_a_user_sees_failed_sign_ins_on_their_account(client):
    ana = UserFactory(username="ana")
    client.post("/accounts/login/", {"username": "ana", "password": "wrong"})

    listed = client_for(ana).get("/api/audit-log/", {"action": "login-failed"}).json()

    assert [row["object_repr"] for row in listed["results"]] == ["ana"]


def test_the_log_is_in_the_admin_and_read_only_there(client, two_researchers_acted):
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))

    page = client.get(reverse("admin:auditlog_logentry_changelist"))

    assert page.status_code == 200
    assert "toms" in page.content.decode()
    assert client.get(reverse("admin:auditlog_logentry_add")).status_code == 403


def test_the_log_needs_a_login(api_client):
    assert api_client.get("/api/audit-log/").status_code == 401


def test_the_groups_exist_after_migrating_again():
    call_command("migrate", "accounts", "zero", verbosity=0)
    call_command("migrate", "accounts", verbosity=0)

    assert Group.objects.filter(name=SITE_OPERATOR).count() == 1
