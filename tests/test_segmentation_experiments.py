"""A segmentation experiment is checked against its dataset's task: the network learns that
task, the patch fits the images and the network's downsampling, and what cannot train a
segmentation network is refused with 400 naming the field and the fix."""

import pytest
from django.core.management import CommandError, call_command

from tests.conftest import client_for
from tests.factories import DatasetFactory, SiteFactory, UserFactory
from training.models import Experiment, StorageFormat, Task

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner():
    return UserFactory(username="owner")


@pytest.fixture
def volumes(owner):
    return DatasetFactory(
        owner=owner,
        task=Task.SEGMENTATION,
        storage_format=StorageFormat.MSD,
        num_classes=3,
        class_names=["background", "organ", "lesion"],
        image_shape=[32, 64, 64],
        spacing=[2.0, 1.0, 1.0],
    )


@pytest.fixture
def payload(volumes):
    sites = SiteFactory.create_batch(2)
    return {
        "name": "organs",
        "dataset": volumes.pk,
        "sites": [site.slug for site in sites],
        "num_rounds": 2,
        "clients_per_round": 2,
        "min_clients": 2,
        "network": "unet",
        "patch_size": [16, 32, 32],
    }


def test_a_segmentation_experiment_with_a_fitting_patch_is_created(owner, payload):
    response = client_for(owner).post("/api/experiments/", payload)

    assert response.status_code == 201, response.json()
    experiment = Experiment.objects.get()
    assert experiment.patch_size == [16, 32, 32]
    assert experiment.task == Task.SEGMENTATION


def test_a_segmentation_experiment_without_a_network_gets_a_unet(owner, payload):
    del payload["network"]

    response = client_for(owner).post("/api/experiments/", payload)

    assert response.status_code == 201, response.json()
    assert response.json()["network"] == "unet"


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"network": "cnn3d-small"}, "network", "classification network but dataset"),
        ({"network": "densenet121"}, "network", "choose one of basicunet, segresnet, unet"),
        ({"patch_size": [32, 32]}, "patch_size", "Give 3 sizes, one per spatial axis"),
        ({"patch_size": [16, 64, 128]}, "patch_size", "larger than the images [32, 64, 64]"),
        ({"patch_size": [12, 32, 32]}, "patch_size", "multiple of 8"),
        (
            {"network": "basicunet", "patch_size": [16, 16, 16]},
            "patch_size",
            "single voxel; make one size at least 32",
        ),
        (
            {
                "network_params": {"strides": [2, 2, 2, 2], "channels": [8, 8, 8, 8, 8]},
                "patch_size": [24, 32, 32],
            },
            "patch_size",
            "multiple of 16",
        ),
        ({"patch_size": [16, 0, 32]}, "patch_size", "list of positive sizes"),
        ({"patch_size": "16,32,32"}, "patch_size", "list of positive sizes"),
        (
            {"local_dp_noise": 1.0, "local_dp_clip": 1.0},
            "local_dp_noise",
            "use client-level DP",
        ),
    ],
)
def test_a_segmentation_experiment_that_cannot_train_is_refused_on_its_field(
    owner, payload, change, field, message
):
    response = client_for(owner).post("/api/experiments/", {**payload, **change})

    assert response.status_code == 400
    assert message in " ".join(map(str, response.json()[field])), response.json()
    assert not Experiment.objects.exists()


def test_a_classification_dataset_refuses_segmentation_networks_and_patches(owner):
    # Given a 2D classification dataset of 28-pixel images
    dataset = DatasetFactory(owner=owner, image_shape=[28, 28])
    sites = SiteFactory.create_batch(2)
    base = {"name": "x", "dataset": dataset.pk, "sites": [s.slug for s in sites]}
    client = client_for(owner)

    # When a segmentation network, a patch, or a network needing larger images is asked for
    unet = client.post("/api/experiments/", {**base, "network": "unet"})
    patch = client.post("/api/experiments/", {**base, "patch_size": [16, 16]})
    densenet = client.post("/api/experiments/", {**base, "network": "densenet121"})

    # Then each is refused naming what to do instead
    assert unet.status_code == 400
    assert "choose a classification network" in unet.json()["network"][0]
    assert patch.status_code == 400
    assert "leave patch_size empty" in patch.json()["patch_size"][0]
    assert densenet.status_code == 400
    assert "at least 32" in densenet.json()["network"][0]
    assert not Experiment.objects.exists()


def test_local_dp_sgd_with_a_network_opacus_cannot_train_is_refused_up_front(owner):
    # Given a classification dataset and a network with batch normalization
    dataset = DatasetFactory(owner=owner, image_shape=[32, 32])
    sites = SiteFactory.create_batch(2)
    base = {"name": "x", "dataset": dataset.pk, "sites": [s.slug for s in sites],
            "local_dp_noise": 1.0, "local_dp_clip": 1.0}  # fmt: skip
    client = client_for(owner)

    # When local DP-SGD is asked for with it, and with cnn-small
    refused = client.post("/api/experiments/", {**base, "network": "densenet121"})
    accepted = client.post("/api/experiments/", {**base, "network": "cnn-small"})

    # Then the first is refused on local_dp_noise naming a network that works
    assert refused.status_code == 400
    assert (
        "choose a network without batch normalization, such as cnn-small"
        in (refused.json()["local_dp_noise"][0])
    )
    assert accepted.status_code == 201, accepted.json()


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("12,32,32", r"patch_size: .*multiple of 8"),
        ("16,32", r"patch_size: Give 3 sizes"),
        ("16,x,32", r"--patch-size: give positive sizes separated by commas"),
    ],
)
def test_run_experiment_refuses_a_patch_size_that_does_not_fit(volumes, admin_user, given, message):
    with pytest.raises(CommandError, match=message):
        call_command("run_experiment", "--dataset", volumes.name, "--patch-size", given)
    assert not Experiment.objects.exists()


def test_fedbn_needs_a_network_with_batch_norm_layers(owner, payload):
    client = client_for(owner)

    instance_norm = client.post("/api/experiments/", {**payload, "strategy": "fedbn"})
    batch_norm = client.post(
        "/api/experiments/",
        {**payload, "strategy": "fedbn", "network_params": {"norm": "batch"}},
    )

    assert instance_norm.status_code == 400
    assert 'unet with network_params {"norm": "batch"}' in instance_norm.json()["strategy"][0]
    assert batch_norm.status_code == 201, batch_norm.json()
