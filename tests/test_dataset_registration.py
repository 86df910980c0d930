"""Registering a dataset as researchers set it up: channels, normalization and the share
kept for federated evaluation, through the API and `register_dataset`."""

import zipfile
from pathlib import Path

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.forms import modelform_factory

from tests.conftest import client_for
from tests.factories import DatasetFactory, UserFactory
from training.admin import DatasetAdminForm
from training.fl.data import generate_synthetic_dataset
from training.models import Dataset

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner():
    return UserFactory(username="owner")


def write_medmnist(path: Path, *, colour: bool, count: int = 6) -> Path:
    """A MedMNIST-style file: uint8 images, (N, 1) labels, train/val/test splits."""
    shape = (count, 8, 8, 3) if colour else (count, 8, 8)
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 2).reshape(-1, 1)
    np.savez(path, **arrays)
    return path


def register(owner, path: Path, **fields):
    payload = {"name": "set", "storage_format": "npz", "num_classes": 2, "path": str(path)}
    return client_for(owner).post("/api/datasets/", {**payload, **fields}, format="json")


def test_the_api_keeps_the_channels_it_is_given(owner, dataset_root):
    path = write_medmnist(dataset_root / "grey.npz", colour=False)

    response = register(owner, path, channels=3)

    assert response.status_code == 201, response.json()
    assert response.json()["channels"] == 3
    assert Dataset.objects.get().channels == 3


@pytest.mark.parametrize(("colour", "channels"), [(True, 3), (False, 1)])
def test_the_api_reads_the_channels_from_the_data_when_not_given(
    owner, dataset_root, colour, channels
):
    path = write_medmnist(dataset_root / "set.npz", colour=colour)

    response = register(owner, path)

    assert response.status_code == 201, response.json()
    assert Dataset.objects.get().channels == channels


def test_the_api_reads_the_channels_of_an_image_folder(owner, dataset_root):
    path = generate_synthetic_dataset(dataset_root / "lesions", sites=1, per_site=4, size=32)

    response = register(owner, path, storage_format="folder")

    assert response.status_code == 201, response.json()
    assert Dataset.objects.get().channels == 1


def test_normalization_is_stored_in_its_canonical_form(owner, dataset_root):
    path = write_medmnist(dataset_root / "rgb.npz", colour=True)

    response = register(
        owner, path, normalization="Mean-Std: 0.485, 0.456, 0.406 / 0.229, 0.224, 0.225"
    )

    assert response.status_code == 201, response.json()
    stored = "mean-std:0.485,0.456,0.406/0.229,0.224,0.225"
    assert response.json()["normalization"] == stored
    assert Dataset.objects.get().normalization == stored


def test_a_blank_normalization_stays_blank_for_the_formats_default(owner, dataset_root):
    response = register(owner, write_medmnist(dataset_root / "set.npz", colour=False))

    assert response.status_code == 201, response.json()
    assert response.json()["normalization"] == ""


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"channels": 2}, "channels", "Give 1 (grey) or 3 (colour)"),
        ({"normalization": "histogram"}, "normalization", "unknown normalization 'histogram'"),
        ({"normalization": "ct-window:40"}, "normalization", "takes a level and a width"),
        ({"normalization": "mean-std:0.5,0"}, "normalization", "must be positive"),
        ({"normalization": "x" * 101}, "normalization", "no more than 100 characters"),
        (
            {"normalization": "mean-std:0.1,0.2,0.3/0.5"},
            "normalization",
            "gives 3 means but the images have 1 channel(s)",
        ),
        (
            {"normalization": "mean-std:0.1,0.2/0.5", "channels": 3},
            "normalization",
            "gives 2 means but the images have 3 channel(s)",
        ),
        ({"validation_fraction": 0.95}, "validation_fraction", "from 0 to 0.9"),
        ({"validation_fraction": -0.1}, "validation_fraction", "from 0 to 0.9"),
        ({"validation_fraction": "most"}, "validation_fraction", "valid number"),
    ],
)
def test_bad_settings_are_refused_with_a_message_on_the_field(
    owner, dataset_root, fields, field, message
):
    path = write_medmnist(dataset_root / "grey.npz", colour=False)

    response = register(owner, path, **fields)

    assert response.status_code == 400
    assert message in " ".join(map(str, response.json()[field]))
    assert not Dataset.objects.exists()


def test_the_validation_fraction_is_stored(owner, dataset_root):
    path = write_medmnist(dataset_root / "set.npz", colour=False)

    response = register(owner, path, validation_fraction=0.3)

    assert response.status_code == 201, response.json()
    assert Dataset.objects.get().validation_fraction == pytest.approx(0.3)


def test_a_normalization_change_is_checked_against_the_stored_channels(owner, dataset_root):
    path = write_medmnist(dataset_root / "set.npz", colour=True)
    dataset_id = register(owner, path).json()["id"]

    refused = client_for(owner).patch(
        f"/api/datasets/{dataset_id}/", {"normalization": "mean-std:0.1,0.2/1"}, format="json"
    )
    accepted = client_for(owner).patch(
        f"/api/datasets/{dataset_id}/", {"normalization": "ct-window:0.5,0.5"}, format="json"
    )

    assert refused.status_code == 400
    assert "2 means but the images have 3 channel(s)" in refused.json()["normalization"][0]
    assert accepted.status_code == 200, accepted.json()
    assert Dataset.objects.get().normalization == "ct-window:0.5,0.5"


@pytest.fixture
def admin_user():
    return UserFactory(username="admin", is_superuser=True, is_staff=True)


def test_register_dataset_takes_a_normalization_channels_and_validation_share(
    admin_user, dataset_root
):
    path = write_medmnist(dataset_root / "rgb.npz", colour=True)

    call_command("register_dataset", "--name", "rgb", "--path", str(path),
                 "--normalization", "mean-std:0.5,0.5,0.5/0.25", "--channels", "3",
                 "--validation-fraction", "0.1")  # fmt: skip

    dataset = Dataset.objects.get(name="rgb")
    assert dataset.channels == 3
    assert dataset.normalization == "mean-std:0.5,0.5,0.5/0.25"
    assert dataset.validation_fraction == pytest.approx(0.1)


def test_register_dataset_reads_colour_channels_from_an_npz(admin_user, dataset_root):
    path = write_medmnist(dataset_root / "rgb.npz", colour=True)

    call_command("register_dataset", "--name", "rgb", "--path", str(path))

    dataset = Dataset.objects.get(name="rgb")
    assert (dataset.channels, dataset.normalization) == (3, "")


def test_register_dataset_refuses_a_bad_normalization_saying_what_to_write(
    admin_user, dataset_root
):
    path = write_medmnist(dataset_root / "grey.npz", colour=False)

    with pytest.raises(CommandError, match=r"normalization: mean-std takes a mean and a standard"):
        call_command(
            "register_dataset", "--name", "grey", "--path", str(path), "--normalization",
            "mean-std:0.5",
        )  # fmt: skip
    assert not Dataset.objects.exists()


@pytest.mark.parametrize(
    ("spec", "channels", "stored", "error"),
    [
        (" ZSCORE ", 1, "zscore", None),
        ("mean-std:0.5/0.25,0.5,0.5", 3, "mean-std:0.5/0.25,0.5,0.5", None),
        ("", 3, "", None),
        ("mean-std:0.5/0.25,0.5,0.5", 1, None, "gives 3 standard deviations"),
        ("ct-window:40,0", 1, None, "the width must be positive"),
    ],
)
def test_the_admin_checks_the_normalization_as_the_api_does(spec, channels, stored, error):
    dataset = DatasetFactory()
    form_class = modelform_factory(
        Dataset, form=DatasetAdminForm, fields=["name", "channels", "normalization"]
    )
    form = form_class(
        {"name": dataset.name, "channels": channels, "normalization": spec}, instance=dataset
    )

    if error is None:
        assert form.is_valid(), form.errors
        form.save()
        dataset.refresh_from_db()
        assert (dataset.normalization, dataset.channels) == (stored, channels)
    else:
        assert not form.is_valid()
        assert error in " ".join(form.errors["normalization"])


def zipped_folder(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    return target


def upload(user, archive: Path, **fields):
    with archive.open("rb") as handle:
        return client_for(user).post(
            "/api/datasets/upload/",
            {"name": "uploaded", "archive": handle, **fields},
            format="multipart",
        )


@pytest.fixture
def lesions_zip(settings, dataset_root, tmp_path):
    settings.FEDLENS_UPLOADS_DIR = dataset_root / "uploads"
    folder = generate_synthetic_dataset(tmp_path / "lesions", sites=1, per_site=4, size=32)
    return zipped_folder(folder, tmp_path / "lesions.zip")


def test_an_upload_takes_a_normalization_and_a_validation_share(owner, lesions_zip):
    response = upload(owner, lesions_zip, normalization="CT-Window:40,400", validation_fraction=0.3)

    assert response.status_code == 201, response.json()
    dataset = Dataset.objects.get()
    assert (dataset.normalization, dataset.channels) == ("ct-window:40,400", 1)
    assert dataset.validation_fraction == pytest.approx(0.3)


def test_an_upload_left_blank_keeps_the_format_default_and_the_default_share(owner, lesions_zip):
    response = upload(owner, lesions_zip, normalization="", validation_fraction="")

    assert response.status_code == 201, response.json()
    dataset = Dataset.objects.get()
    assert (dataset.normalization, dataset.validation_fraction) == ("", 0.2)


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"normalization": "zscore:2"}, "normalization", "zscore takes no values"),
        ({"normalization": "mean-std:0.1,0.2,0.3/1"}, "normalization", "3 means but the images"),
        ({"validation_fraction": 1.5}, "validation_fraction", "from 0 to 0.9"),
    ],
)
def test_an_upload_with_bad_settings_is_refused_keeping_nothing(
    owner, lesions_zip, settings, fields, field, message
):
    response = upload(owner, lesions_zip, **fields)

    assert response.status_code == 400
    assert message in " ".join(map(str, response.json()[field]))
    assert not Dataset.objects.exists()
    uploads = Path(settings.FEDLENS_UPLOADS_DIR)
    assert not uploads.exists() or not any(path.is_file() for path in uploads.rglob("*"))
