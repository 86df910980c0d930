"""A newcomer's first experiment: the form as it first shows works when submitted as it is,
and settings that cannot work (the site partition with the wrong number of sites) are
refused up front by the form, the API and the command line, with the numbers."""

import uuid
from html.parser import HTMLParser

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from tests.conftest import client_for
from tests.factories import SiteFactory, UserFactory
from training.fl.data.synthetic import generate_segmentation_dataset, generate_synthetic_dataset
from training.models import Dataset, Experiment, ExperimentStatus, StorageFormat, Task

pytestmark = pytest.mark.django_db


class FormValues(HTMLParser):
    """The values a browser submits for a form as it was served: inputs' values, checked
    boxes, each select's selected options."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[tuple[str, str]] = []
        self.select: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        name = attributes.get("name")
        if tag == "input" and name:
            kind = attributes.get("type", "text")
            if kind in ("checkbox", "radio") and "checked" not in attributes:
                return
            self.values.append((name, attributes.get("value") or ""))
        elif tag == "select":
            self.select = name
        elif tag == "option" and self.select and "selected" in attributes:
            self.values.append((self.select, attributes.get("value", "")))

    def handle_endtag(self, tag):
        if tag == "select":
            self.select = None


def served_form(client, page="new-experiment") -> dict[str, list[str]]:
    parser = FormValues()
    parser.feed(client.get(reverse(page)).content.decode())
    submitted: dict[str, list[str]] = {}
    for name, value in parser.values:
        submitted.setdefault(name, []).append(value)
    return submitted


def site_dataset(root, owner, *, sites=3, name=None) -> Dataset:
    """A synthetic image folder whose labels.csv has a site column of `sites` sites."""
    path = generate_synthetic_dataset(root / uuid.uuid4().hex, sites=sites, per_site=6, size=32)
    return Dataset.objects.create(
        name=name or f"lesions-{uuid.uuid4().hex[:6]}", owner=owner, storage_format="folder",
        num_classes=2, channels=1, image_shape=[32, 32], path=str(path),
    )  # fmt: skip


def test_the_form_as_first_served_creates_and_starts_an_experiment(client, dataset_root):
    # Given a user with an older and a newer dataset (the older first by name), and 3 sites
    owner = UserFactory()
    site_dataset(dataset_root, owner, name="aaa-older")
    newest = site_dataset(dataset_root, owner, name="zzz-newest")
    SiteFactory.create_batch(3)
    client.force_login(owner)
    # When the form is submitted exactly as it was served (with a name typed in)
    submitted = served_form(client)
    submitted["name"] = ["first try"]
    response = client.post(reverse("new-experiment"), submitted)
    # Then the experiment exists, on the newest dataset, with the sites chosen, and runs
    assert response.status_code == 302, response.content.decode()[-2000:]
    experiment = Experiment.objects.get(name="first try")
    assert experiment.dataset == newest
    assert experiment.sites.count() == 3
    assert experiment.min_clients <= experiment.clients_per_round == 3
    assert experiment.status == ExperimentStatus.RUNNING


def test_the_form_as_first_served_trains_a_segmentation_dataset_with_a_segmentation_network(
    client, dataset_root
):
    # Given a user whose newest dataset is a 3D segmentation set (the alphabetically first
    # network, basicunet, and strategy, fedadagrad, are not what a first try wants)
    owner = UserFactory()
    site_dataset(dataset_root, owner)
    path = generate_segmentation_dataset(
        dataset_root / "organs", dims=3, sites=2, per_site=2, size=32, depth=16, seed=0
    )
    organs = Dataset.objects.create(
        name="organs", owner=owner, task=Task.SEGMENTATION, storage_format=StorageFormat.MSD,
        num_classes=3, channels=1, image_shape=[16, 32, 32], path=str(path),
    )  # fmt: skip
    SiteFactory.create_batch(2)
    client.force_login(owner)
    # When the form is submitted as it was served
    submitted = served_form(client)
    assert submitted["network"] == ["unet"] and submitted["strategy"] == ["fedavg"]
    submitted["name"] = ["first segmentation"]
    response = client.post(reverse("new-experiment"), submitted)
    # Then the experiment is created on the segmentation set with the suggested network
    assert response.status_code == 302, response.content.decode()[-2000:]
    experiment = Experiment.objects.get(name="first segmentation")
    assert (experiment.dataset, experiment.network, experiment.strategy) == (
        organs,
        "unet",
        "fedavg",
    )


def test_the_sweep_form_as_first_served_queues_a_sweep(client, dataset_root):
    owner = UserFactory()
    newest = site_dataset(dataset_root, owner)
    SiteFactory.create_batch(2)
    client.force_login(owner)
    submitted = served_form(client, "new-sweep")
    assert submitted["network"] == ["cnn-small"] and submitted["dataset"] == [str(newest.pk)]
    submitted["name"] = ["first sweep"]
    submitted["seeds"] = ["0, 1"]
    response = client.post(reverse("new-sweep"), submitted)
    assert response.status_code == 302, response.content.decode()[-2000:]
    assert Experiment.objects.filter(dataset=newest, network="cnn-small").count() == 2


def test_the_form_prefers_the_users_own_dataset_to_a_newer_one_they_only_see(client, dataset_root):
    # Given a staff user (who sees every dataset) and a colleague's dataset newer than theirs
    owner, colleague = UserFactory(is_staff=True), UserFactory()
    mine = site_dataset(dataset_root, owner)
    site_dataset(dataset_root, colleague)
    client.force_login(owner)

    assert served_form(client)["dataset"] == [str(mine.pk)]


def site_partition_payload(dataset, count):
    return {
        "name": "by site", "dataset": dataset.pk, "partition": "site",
        "sites": [site.slug for site in SiteFactory.create_batch(count)],
        "clients_per_round": count, "min_clients": 1, "num_rounds": 1,
    }  # fmt: skip


def test_the_api_refuses_the_site_partition_with_more_sites_than_the_data_has(dataset_root):
    owner = UserFactory()
    dataset = site_dataset(dataset_root, owner, sites=3)

    response = client_for(owner).post(
        "/api/experiments/", site_partition_payload(dataset, 4), format="json"
    )

    assert response.status_code == 400
    message = " ".join(response.json()["partition"])
    assert "has 3 sites (site-1, site-2, site-3), but 4 sites were chosen" in message
    assert not Experiment.objects.exists()


def test_the_api_accepts_the_site_partition_with_as_many_sites_as_the_data(dataset_root):
    owner = UserFactory()
    dataset = site_dataset(dataset_root, owner, sites=3)

    response = client_for(owner).post(
        "/api/experiments/", site_partition_payload(dataset, 3), format="json"
    )

    assert response.status_code == 201, response.json()


def test_the_form_refuses_the_site_partition_with_more_sites_than_the_data_has(
    client, dataset_root
):
    owner = UserFactory()
    dataset = site_dataset(dataset_root, owner, sites=2)
    client.force_login(owner)

    response = client.post(reverse("new-experiment"), site_partition_payload(dataset, 4))

    assert response.status_code == 200
    assert "has 2 sites (site-1, site-2), but 4 sites were chosen" in response.content.decode()
    assert not Experiment.objects.exists()


def test_the_command_line_refuses_the_site_partition_with_more_clients_than_sites(dataset_root):
    owner = UserFactory(username="admin", is_superuser=True, is_staff=True)
    dataset = site_dataset(dataset_root, owner, sites=2)

    with pytest.raises(CommandError, match=r"has 2 sites .* but 4 sites were chosen.*--clients 2"):
        call_command(
            "run_experiment", "--dataset", dataset.name, "--partition", "site", "--clients", "4"
        )

    assert not Experiment.objects.exists()
