"""Bad input gets 400 with a message per field, conflicts 409, and nothing stored changes."""

import pytest

from tests.conftest import client_for
from tests.factories import DatasetFactory, ExperimentFactory, SiteFactory, UserFactory
from training.models import Dataset, Experiment, ExperimentStatus

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner():
    return UserFactory(username="owner")


@pytest.fixture
def experiment_payload(owner, dataset_root):
    dataset = DatasetFactory(owner=owner, path=str(dataset_root))
    sites = SiteFactory.create_batch(3)
    return {
        "name": "lesions",
        "dataset": dataset.pk,
        "sites": [site.slug for site in sites],
        "num_rounds": 5,
        "clients_per_round": 3,
        "min_clients": 2,
        "learning_rate": 0.05,
        "strategy": "fedavg",
    }


def test_a_valid_experiment_is_created_as_a_draft(owner, experiment_payload):
    response = client_for(owner).post("/api/experiments/", experiment_payload)

    assert response.status_code == 201, response.json()
    assert response.json()["status"] == "draft"
    assert response.json()["sites"] == sorted(experiment_payload["sites"])


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"min_clients": 4}, "min_clients", "Must not exceed clients_per_round (3)"),
        ({"clients_per_round": 5, "min_clients": 1}, "sites", "Choose at least clients_per_round"),
        ({"strategy": "fedmagic"}, "strategy", "not a valid choice"),
        ({"network": "gpt-5"}, "network", "not a valid choice"),
        ({"strategy_params": {"unknown": 1}}, "strategy_params", "unknown"),
        ({"partition": "dirichlet:-1"}, "partition", "alpha must be a positive number"),
        ({"partition": "zipf"}, "partition", "accepted forms"),
        ({"partition": "file:/etc/passwd"}, "partition", "FEDLENS_DATASET_ROOTS"),
        ({"learning_rate": 0}, "learning_rate", "greater than or equal to"),
        ({"num_rounds": 0}, "num_rounds", "greater than or equal to 1"),
        ({"sites": ["nowhere"]}, "sites", "does not exist"),
        ({"optimizer": "lbfgs"}, "optimizer", "not a valid choice"),
        ({"name": ""}, "name", "may not be blank"),
    ],
)
def test_invalid_experiment_is_refused_with_a_message_on_the_field(
    owner, experiment_payload, change, field, message
):
    response = client_for(owner).post("/api/experiments/", {**experiment_payload, **change})

    assert response.status_code == 400
    assert message in " ".join(map(str, response.json()[field]))
    assert not Experiment.objects.exists()


def test_someone_elses_dataset_cannot_be_used(owner, experiment_payload):
    foreign = DatasetFactory()

    response = client_for(owner).post(
        "/api/experiments/", {**experiment_payload, "dataset": foreign.pk}
    )

    assert response.status_code == 400
    assert "does not exist" in response.json()["dataset"][0]


def test_starting_a_completed_experiment_is_a_conflict(owner):
    experiment = ExperimentFactory(owner=owner, status=ExperimentStatus.COMPLETED)

    response = client_for(owner).post(f"/api/experiments/{experiment.pk}/start/")

    assert response.status_code == 409
    assert "only a draft can be started" in response.json()["detail"]
    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.COMPLETED


def test_stopping_a_draft_is_a_conflict(owner):
    experiment = ExperimentFactory(owner=owner)

    response = client_for(owner).post(f"/api/experiments/{experiment.pk}/stop/")

    assert response.status_code == 409
    assert "only a queued or running experiment can be stopped" in response.json()["detail"]


def test_a_running_experiment_cannot_be_edited(owner):
    experiment = ExperimentFactory(owner=owner, status=ExperimentStatus.RUNNING, num_rounds=3)

    response = client_for(owner).patch(f"/api/experiments/{experiment.pk}/", {"num_rounds": 9})

    assert response.status_code == 409
    experiment.refresh_from_db()
    assert experiment.num_rounds == 3


def test_a_running_experiment_cannot_be_deleted(owner):
    experiment = ExperimentFactory(owner=owner, status=ExperimentStatus.RUNNING)

    response = client_for(owner).delete(f"/api/experiments/{experiment.pk}/")

    assert response.status_code == 409
    assert "stop it before deleting" in response.json()["detail"]
    assert Experiment.objects.filter(pk=experiment.pk).exists()


def test_a_dataset_in_use_cannot_be_deleted(owner):
    experiment = ExperimentFactory(owner=owner)

    response = client_for(owner).delete(f"/api/datasets/{experiment.dataset_id}/")

    assert response.status_code == 409
    assert "Still in use by experiment" in response.json()["detail"]
    assert Dataset.objects.filter(pk=experiment.dataset_id).exists()


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"path": "relative/path"}, "path", "absolute path"),
        ({"path": "/etc"}, "path", "FEDLENS_DATASET_ROOTS"),
        ({"path": ""}, "path", "declared by their site agents"),
        ({"storage_format": ""}, "storage_format", "one of folder, npz, msd, maskfolder"),
        ({"class_names": ["a", "b", "c"]}, "class_names", "exactly num_classes (2)"),
        ({"class_names": ["a", "a"]}, "class_names", "unique"),
        ({"image_shape": [64]}, "image_shape", "2 or 3 positive whole numbers"),
        ({"spacing": [1.0, 1.0, 2.0]}, "spacing", "one spacing per image dimension"),
        ({"spacing": [1.0, -1.0]}, "spacing", "positive numbers"),
        ({"num_classes": 1}, "num_classes", "greater than or equal to 2"),
        ({"modality": "PET"}, "modality", "not a valid choice"),
    ],
)
def test_invalid_dataset_is_refused_with_a_message_on_the_field(
    owner, dataset_root, change, field, message
):
    payload = {
        "name": "ct",
        "storage_format": "folder",
        "modality": "CT",
        "num_classes": 2,
        "class_names": ["normal", "lesion"],
        "image_shape": [64, 64],
        "spacing": [0.8, 0.8],
        "path": str(dataset_root),
    }

    response = client_for(owner).post("/api/datasets/", {**payload, **change}, format="json")

    assert response.status_code == 400
    assert message in " ".join(map(str, response.json()[field]))
    assert not Dataset.objects.exists()


def test_a_missing_dataset_folder_is_refused(owner, dataset_root):
    response = client_for(owner).post(
        "/api/datasets/",
        {
            "name": "ct",
            "storage_format": "folder",
            "num_classes": 2,
            "path": str(dataset_root / "absent"),
        },
        format="json",
    )

    assert response.status_code == 400
    assert "Nothing exists at" in response.json()["path"][0]


def test_a_valid_dataset_is_registered_to_its_creator(owner, dataset_root):
    response = client_for(owner).post(
        "/api/datasets/",
        {
            "name": "ct",
            "storage_format": "folder",
            "modality": "CT",
            "num_classes": 2,
            "path": str(dataset_root),
            "is_federated": True,
        },
        format="json",
    )

    assert response.status_code == 201, response.json()
    assert response.json()["owner"] == "owner"
    # Only sites' agents make federated datasets, by declaring them.
    assert Dataset.objects.get().is_federated is False
