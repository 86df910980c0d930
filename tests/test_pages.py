"""Dashboard pages: who sees what, and the create-and-start form."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from tests.factories import ExperimentFactory, RoundFactory, SiteFactory, UserFactory
from training.models import Experiment, ExperimentStatus

pytestmark = pytest.mark.django_db


def test_the_experiment_list_shows_progress_best_accuracy_and_trend(client):
    owner = UserFactory()
    experiment = ExperimentFactory(owner=owner, num_rounds=4, current_round=2, status="running")
    for number, accuracy in ((1, 0.6), (2, 0.8)):
        RoundFactory(experiment=experiment, number=number, status="closed",
                     metrics={"global": {"accuracy": accuracy}})  # fmt: skip
    ExperimentFactory(name="not-mine")
    client.force_login(owner)

    page = client.get(reverse("home")).content.decode()

    assert experiment.name in page and "not-mine" not in page
    assert 'style="width: 50%"' in page  # two of four rounds closed
    assert "<polyline" in page


@pytest.mark.parametrize("name", ["home", "new-experiment", "compare", "sites"])
def test_pages_need_a_login(client, name):
    response = client.get(reverse(name))

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_the_experiment_page_is_404_for_someone_it_is_not_shared_with(client):
    experiment = ExperimentFactory()
    client.force_login(UserFactory())

    assert client.get(reverse("experiment-page", args=[experiment.pk])).status_code == 404


def test_a_member_sees_the_page_without_the_stop_button(client):
    member = UserFactory()
    experiment = ExperimentFactory(members=[member])
    client.force_login(member)

    page = client.get(reverse("experiment-page", args=[experiment.pk])).content.decode()

    assert experiment.name in page
    assert 'id="stop"' not in page
    assert "vendor/chart.umd.min.js" in page


def test_the_owner_sees_the_stop_button(client):
    experiment = ExperimentFactory()
    client.force_login(experiment.owner)

    page = client.get(reverse("experiment-page", args=[experiment.pk])).content.decode()

    assert 'id="stop"' in page


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"partition": "zipf"}, "accepted forms"),
        ({"clients_per_round": "1", "min_clients": "5"}, "Must not exceed clients_per_round"),
    ],
)
def test_the_form_shows_what_is_wrong_and_stores_nothing(client, change, message):
    owner = UserFactory()
    client.force_login(owner)
    dataset = ExperimentFactory(owner=owner).dataset
    before = Experiment.objects.count()
    data = {"name": "bad", "dataset": dataset.pk, "sites": [SiteFactory().slug],
            "clients_per_round": "1", **change}  # fmt: skip

    response = client.post(reverse("new-experiment"), data)

    assert response.status_code == 200
    assert message in response.content.decode()
    assert Experiment.objects.count() == before


def test_the_form_creates_and_starts_an_experiment(client, dataset_root, settings):
    owner = UserFactory()
    client.force_login(owner)
    dataset = ExperimentFactory(owner=owner).dataset
    sites = SiteFactory.create_batch(2)

    response = client.post(reverse("new-experiment"), {
        "name": "from the form", "dataset": dataset.pk, "sites": [s.slug for s in sites],
        "clients_per_round": "2", "min_clients": "2", "num_rounds": "3", "start": "1",
    })  # fmt: skip

    experiment = Experiment.objects.get(name="from the form")
    assert response.status_code == 302
    assert response["Location"] == reverse("experiment-page", args=[experiment.pk])
    assert experiment.status == ExperimentStatus.RUNNING
    assert experiment.owner == owner


def test_compare_shows_only_experiments_the_user_may_see(client):
    owner = UserFactory()
    mine = ExperimentFactory(owner=owner, name="mine")
    hidden = ExperimentFactory(name="hidden")
    client.force_login(owner)

    page = client.get(reverse("compare"), {"experiment": [mine.pk, hidden.pk]}).content.decode()

    assert f'{{"id": {mine.pk}}}' in page
    assert f'{{"id": {hidden.pk}}}' not in page


def test_the_sites_page_tells_connected_offline_and_revoked_sites_apart(client):
    now = timezone.now()
    SiteFactory(
        slug="live",
        enrolled_at=now,
        last_seen=now,
        agent_version="0.1.0",
        devices=[{"kind": "cuda", "name": "NVIDIA H200", "memory_mb": 143000}],
    )
    SiteFactory(slug="silent", enrolled_at=now, last_seen=now - timedelta(minutes=5))
    SiteFactory(slug="gone", enrolled_at=now, is_active=False)
    client.force_login(UserFactory())

    page = client.get(reverse("sites")).content.decode()
    rows = {slug: page.split(f'data-site="{slug}"')[1].split("</tr>")[0]
            for slug in ("live", "silent", "gone")}  # fmt: skip

    assert "connected" in rows["live"] and "NVIDIA H200" in rows["live"]
    assert "offline" in rows["silent"]
    assert "revoked" in rows["gone"]
