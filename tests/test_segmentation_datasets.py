"""Registering segmentation datasets (Decathlon folders and mask folders) through
`register_dataset` and the API: the task, classes and geometry read from the data, and
bad data refused with a message naming the file (a 400 through the API, never a 500)."""

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.conftest import client_for
from tests.factories import UserFactory
from tests.segmentation_data import replace_mask, volume, write_mask_folder, write_msd
from training.fl.data import generate_synthetic_dataset
from training.fl.data.datasets import load_dataset
from training.models import Dataset, Task
from visualization.viewer.images import catalog_for, read_raw_pair
from workers.site.describe import dataset_metadata

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner():
    return UserFactory(username="owner")


@pytest.fixture
def admin_user():
    return UserFactory(username="admin", is_superuser=True, is_staff=True)


def register(owner, path, **fields):
    payload = {"name": "seg", "path": str(path), **fields}
    return client_for(owner).post("/api/datasets/", payload, format="json")


def test_register_dataset_reads_a_decathlon_folder_s_task_classes_and_geometry(
    admin_user, dataset_root
):
    root = write_msd(dataset_root / "msd", shape=(6, 10, 8), spacing=(0.8, 0.8, 2.5))

    call_command("register_dataset", "--name", "msd", "--path", str(root))

    dataset = Dataset.objects.get(name="msd")
    assert dataset.task == Task.SEGMENTATION
    assert dataset.storage_format == "msd"
    assert dataset.num_classes == 3
    assert dataset.class_names == ["background", "organ", "lesion"]
    assert dataset.image_shape == [6, 10, 8]
    assert dataset.spacing == pytest.approx([2.5, 0.8, 0.8])


def test_register_dataset_takes_a_mask_folder_s_class_names(admin_user, dataset_root):
    root = write_mask_folder(dataset_root / "masks")

    call_command("register_dataset", "--name", "masks", "--path", str(root),
                 "--class-names", "background,kidney,cyst")  # fmt: skip

    dataset = Dataset.objects.get(name="masks")
    assert (dataset.task, dataset.storage_format) == (Task.SEGMENTATION, "maskfolder")
    assert dataset.class_names == ["background", "kidney", "cyst"]
    assert dataset.num_classes == 3


def test_a_classification_folder_is_registered_for_classification(admin_user, dataset_root):
    root = generate_synthetic_dataset(dataset_root / "lesions", sites=1, per_site=4, size=32)

    call_command("register_dataset", "--name", "lesions", "--path", str(root))

    assert Dataset.objects.get(name="lesions").task == Task.CLASSIFICATION


def test_register_dataset_refuses_a_label_outside_the_classes_naming_the_mask(
    admin_user, dataset_root
):
    root = write_mask_folder(dataset_root / "masks")

    with pytest.raises(CommandError, match=r"masks/0\.nii\.gz: label value\(s\) 2 outside"):
        call_command("register_dataset", "--name", "masks", "--path", str(root),
                     "--class-names", "background,kidney")  # fmt: skip
    assert not Dataset.objects.exists()


def test_the_api_registers_a_decathlon_folder_from_its_data(owner, dataset_root):
    root = write_msd(dataset_root / "msd", sites=["a", "b"])

    response = register(owner, root, storage_format="msd")

    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["task"] == "segmentation"
    assert (body["num_classes"], body["class_names"]) == (3, ["background", "organ", "lesion"])
    assert body["image_shape"] == [6, 10, 8]
    assert Dataset.objects.get().task == Task.SEGMENTATION


def test_the_api_takes_a_mask_folder_s_class_names(owner, dataset_root):
    root = write_mask_folder(dataset_root / "masks")

    response = register(
        owner, root, storage_format="maskfolder", class_names=["background", "organ", "lesion"]
    )

    assert response.status_code == 201, response.json()
    assert response.json()["class_names"] == ["background", "organ", "lesion"]
    assert response.json()["num_classes"] == 3


def test_the_api_still_requires_num_classes_for_classification(owner, dataset_root):
    root = generate_synthetic_dataset(dataset_root / "lesions", sites=1, per_site=4, size=32)

    response = register(owner, root, storage_format="folder")

    assert response.status_code == 400
    assert "num_classes" in response.json()


def bad_mask_shape(root):
    _, small = volume((6, 10, 7), (0.8, 0.8, 2.5), seed=0)
    replace_mask(root, "labelsTr/case_001.nii.gz", small)
    return "labelsTr/case_001.nii.gz: mask shape"


def bad_mask_spacing(root):
    _, coarse = volume((6, 10, 8), (0.8, 0.8, 3.0), seed=0)
    replace_mask(root, "labelsTr/case_002.nii.gz", coarse)
    return "labelsTr/case_002.nii.gz: mask spacing"


def undeclared_label(root):
    (root / "dataset.json").write_text(
        (root / "dataset.json").read_text().replace(', "2": "lesion"', "")
    )
    return "labelsTr/case_000.nii.gz: label value(s) 2 outside the declared classes"


@pytest.mark.parametrize("spoil", [bad_mask_shape, bad_mask_spacing, undeclared_label])
def test_the_api_refuses_bad_masks_with_a_400_naming_the_file(owner, dataset_root, spoil):
    root = write_msd(dataset_root / "msd", shape=(6, 10, 8), spacing=(0.8, 0.8, 2.5))
    expected = spoil(root)

    response = register(owner, root, storage_format="msd")

    assert response.status_code == 400
    assert expected in response.json()["path"][0]
    assert not Dataset.objects.exists()


def test_the_api_refuses_a_volume_too_large_for_memory(owner, dataset_root, settings):
    settings.FEDLENS_MAX_VOLUME_VOXELS = 400
    root = write_msd(dataset_root / "msd", shape=(6, 10, 8))

    response = register(owner, root, storage_format="msd")

    assert response.status_code == 400
    message = response.json()["path"][0]
    assert "case_000.nii.gz: the image has 480 voxels" in message
    assert "FEDLENS_MAX_VOLUME_VOXELS" in message


def test_a_site_declares_each_class_s_volume(dataset_root):
    root = write_msd(dataset_root / "msd", cases=2, shape=(6, 10, 8), spacing=(0.5, 0.5, 2.0))

    metadata = dataset_metadata(load_dataset(root))

    assert metadata["storage_format"] == "msd"
    assert metadata["class_names"] == ["background", "organ", "lesion"]
    volumes = metadata["statistics"]["class_volumes"]
    assert [entry["name"] for entry in volumes] == ["background", "organ", "lesion"]
    # Each case: a 4x6x4 organ box holding a 2x2x2 lesion in 480 voxels of 0.5 mm³.
    assert [entry["voxels"] for entry in volumes] == [2 * (480 - 96), 2 * (96 - 8), 2 * 8]
    assert [entry["mm3"] for entry in volumes] == pytest.approx([384.0, 88.0, 8.0])
    assert volumes[2]["mean_mm3"] == pytest.approx(4.0)


def test_the_viewer_lists_each_image_with_its_mask_and_counts_class_volumes_per_site(
    owner, dataset_root
):
    root = write_msd(dataset_root / "msd", cases=4, sites=["a", "b"], spacing=(0.5, 0.5, 2.0))
    dataset = Dataset.objects.get(pk=register(owner, root, storage_format="msd").json()["id"])

    records = catalog_for(dataset).records
    image, mask = read_raw_pair(dataset, records[0])
    statistics = client_for(owner).get(f"/api/datasets/{dataset.pk}/statistics/").json()

    assert [record.relative_path for record in records][:2] == [
        "imagesTr/case_000.nii.gz",
        "imagesTr/case_001.nii.gz",
    ]
    assert records[0].mask_file == root.resolve() / "labelsTr/case_000.nii.gz"
    assert mask is not None and mask.array.shape == image.array.shape
    by_site = {site["site"]: site["class_volumes"] for site in statistics["sites"]}
    assert set(by_site) == {"a", "b"}
    # Two cases per site, each with a 2x2x2 lesion of 0.5 mm³ voxels.
    assert by_site["a"][2] == {"label": 2, "name": "lesion", "voxels": 16, "mm3": 8.0}
