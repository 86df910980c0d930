"""The dataset and experiment commands refuse bad input with a sentence that says why."""

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.factories import UserFactory
from training.fl.data import generate_synthetic_dataset
from training.models import Dataset, Experiment

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_user():
    return UserFactory(username="admin", is_superuser=True, is_staff=True)


def test_register_dataset_reads_shape_classes_and_spacing_from_the_data(admin_user, dataset_root):
    path = generate_synthetic_dataset(dataset_root / "set", sites=2, per_site=6, size=32)

    call_command("register_dataset", "--name", "set", "--path", str(path),
                 "--class-names", "normal,lesion", "--modality", "MR")  # fmt: skip

    dataset = Dataset.objects.get(name="set")
    assert (dataset.num_classes, dataset.channels, dataset.image_shape) == (2, 1, [32, 32])
    assert dataset.class_names == ["normal", "lesion"]
    assert len(dataset.spacing) == 2 and all(step > 0 for step in dataset.spacing)
    assert dataset.owner == admin_user


def test_register_dataset_refuses_a_path_outside_the_dataset_roots(admin_user, tmp_path):
    path = generate_synthetic_dataset(tmp_path / "set", sites=1, per_site=4, size=32)

    with pytest.raises(CommandError, match="FEDLENS_DATASET_ROOTS"):
        call_command("register_dataset", "--name", "set", "--path", str(path))
    assert not Dataset.objects.exists()


def test_register_dataset_says_what_is_wrong_with_a_folder(admin_user, dataset_root):
    (dataset_root / "empty").mkdir()

    with pytest.raises(CommandError, match=r"expected a folder containing labels\.csv"):
        call_command("register_dataset", "--name", "x", "--path", str(dataset_root / "empty"))


def test_run_experiment_names_the_missing_dataset(admin_user):
    with pytest.raises(CommandError, match="No dataset named 'absent'; register it first"):
        call_command("run_experiment", "--dataset", "absent")


def test_run_experiment_refuses_bad_settings_before_storing_anything(admin_user, dataset_root):
    path = generate_synthetic_dataset(dataset_root / "set", sites=1, per_site=4, size=32)
    call_command("register_dataset", "--name", "set", "--path", str(path))

    with pytest.raises(CommandError, match=r"partition: .*accepted forms"):
        call_command("run_experiment", "--dataset", "set", "--partition", "zipf")
    assert not Experiment.objects.exists()
