"""Rough edges of the API found by hand: a dataset name taken by a concurrent request, a site
operator changing what only admins may, and name conflicts that would reveal other users."""

import threading
import time

import pytest
from django.conf import settings
from django.contrib.auth.models import Group
from django.db import connection, transaction

from accounts.models import SiteOperator
from accounts.rules import SITE_OPERATOR
from tests.conftest import client_for
from tests.factories import DatasetFactory, SiteFactory, UserFactory
from tests.test_dataset_upload import lesions_folder, upload, uploads_dir, zip_of  # noqa: F401
from training.models import Dataset, Site

on_postgres = pytest.mark.skipif(
    not settings.DATABASES["default"]["ENGINE"].endswith("postgresql"),
    reason="the race is decided by PostgreSQL's unique index (CI=true makes PostgreSQL required)",
)


# --- Two requests for one dataset name ------------------------------------------------------


def wait_for_a_request_blocked_on_a_lock(request: threading.Thread, timeout: float = 60) -> None:
    """Until another connection of this database waits for a row lock (the unique index)."""
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while time.monotonic() < deadline and request.is_alive():
            # Inside a transaction PostgreSQL keeps showing its first look at the activity.
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if cursor.fetchone()[0]:
                return
            time.sleep(0.05)
    raise AssertionError("the request never waited on the name's unique index")


def answer_while_the_name_is_being_taken(send) -> tuple:
    """`send()` runs while another transaction has inserted the same name, uncommitted: the
    request's uniqueness check sees no such name, its insert waits, then the other commits.
    This is what two simultaneous requests do, in an order that the test decides."""
    answers = []

    def request_in_its_own_connection():
        try:
            answers.append(send())
        finally:
            connection.close()

    request = threading.Thread(target=request_in_its_own_connection)
    with transaction.atomic():
        first = DatasetFactory(name="scans", owner=UserFactory(username="first-uploader"))
        request.start()
        wait_for_a_request_blocked_on_a_lock(request)
    request.join(120)
    assert not request.is_alive()
    return answers[0], first


@on_postgres
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_registering_a_name_taken_by_a_concurrent_request_is_a_400_not_a_500(dataset_root):
    folder = dataset_root / "second"
    folder.mkdir()
    second = UserFactory(username="second-uploader")

    response, first = answer_while_the_name_is_being_taken(
        lambda: client_for(second).post(
            "/api/datasets/",
            {"name": "scans", "path": str(folder), "storage_format": "folder", "num_classes": 2},
        )
    )

    assert response.status_code == 400, response.content
    assert response.json() == {"name": ["A dataset with this name already exists; choose "
                                        "another name."]}  # fmt: skip
    assert list(Dataset.objects.values_list("pk", flat=True)) == [first.pk]


@on_postgres
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_uploading_a_name_taken_by_a_concurrent_upload_is_a_400_and_leaves_no_files(
    uploads_dir,  # noqa: F811
    lesions_folder,  # noqa: F811
    tmp_path,
):
    archive = zip_of(lesions_folder, tmp_path / "scans.zip")
    second = UserFactory(username="second-uploader")

    response, first = answer_while_the_name_is_being_taken(
        lambda: upload(second, archive, name="scans")
    )

    assert response.status_code == 400, response.content
    assert "choose another name" in str(response.json()["name"])
    assert list(Dataset.objects.values_list("pk", flat=True)) == [first.pk]
    assert not list((uploads_dir / f"user-{second.pk}").glob("*"))


# --- Conflicts name nobody else -------------------------------------------------------------


@pytest.mark.django_db
def test_a_name_conflict_names_neither_the_other_owner_nor_their_other_datasets(
    dataset_root,
    uploads_dir,  # noqa: F811
    lesions_folder,  # noqa: F811
    tmp_path,
):
    hanna = UserFactory(username="hanna-k")
    DatasetFactory(owner=hanna, name="scans")
    DatasetFactory(owner=hanna, name="secret-cohort-7")
    folder = dataset_root / "mine"
    folder.mkdir()
    stranger = UserFactory(username="stranger")

    registered = client_for(stranger).post(
        "/api/datasets/",
        {"name": "scans", "path": str(folder), "storage_format": "folder", "num_classes": 2},
    )
    uploaded = upload(stranger, zip_of(lesions_folder, tmp_path / "scans.zip"), name="scans")

    for answer in (registered, uploaded):
        assert answer.status_code == 400
        assert "name" in answer.json(), answer.json()
        text = answer.content.decode()
        assert "hanna" not in text and "secret-cohort-7" not in text, text


# --- What a site operator may change --------------------------------------------------------


@pytest.fixture
def operator_of_own_site(db):
    operator = UserFactory(username="operator")
    operator.groups.add(Group.objects.get(name=SITE_OPERATOR))
    site = SiteFactory(slug="own", name="Own hospital")
    SiteOperator.objects.create(user=operator, site=site)
    return operator, site


@pytest.mark.parametrize("change", [{"slug": "renamed"}, {"is_active": False}])
def test_a_site_operator_may_not_change_their_sites_slug_or_activity(operator_of_own_site, change):
    operator, site = operator_of_own_site

    response = client_for(operator).patch(f"/api/sites/{site.pk}/", change, format="json")

    assert response.status_code == 403
    assert response["Content-Type"] == "application/json"
    assert next(iter(change)) in response.json()["detail"]
    site.refresh_from_db()
    assert (site.slug, site.is_active) == ("own", True)


def test_a_site_operator_changes_the_rest_and_may_resend_the_same_slug(operator_of_own_site):
    operator, site = operator_of_own_site

    response = client_for(operator).put(
        f"/api/sites/{site.pk}/",
        {"name": "Own hospital, north", "slug": "own", "is_active": True, "description": "x"},
        format="json",
    )

    assert response.status_code == 200, response.content
    assert Site.objects.get(pk=site.pk).name == "Own hospital, north"


def test_an_admin_changes_a_sites_slug_and_activity(operator_of_own_site):
    _, site = operator_of_own_site
    admin = UserFactory(username="admin", is_staff=True)

    response = client_for(admin).patch(
        f"/api/sites/{site.pk}/", {"slug": "renamed", "is_active": False}, format="json"
    )

    assert response.status_code == 200, response.content
    site.refresh_from_db()
    assert (site.slug, site.is_active) == ("renamed", False)
