"""The format registry and segmentation datasets: detection, class names, masks resampled
by nearest neighbour, per-class volumes, and bad input refused naming the file."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.segmentation_data import replace_mask, volume, write_mask_folder, write_msd
from training.fl.data import ImageArray, Preprocessor, write_image
from training.fl.data.datasets import (
    DatasetFormatError,
    ImageFolderDataset,
    NpzDataset,
    SegmentationDataset,
    load_dataset,
)
from training.fl.data.formats import FORMAT_NAMES, detect_format, get_format
from training.fl.data.statistics import measure_image, summarise_site


def write_classification_folder(root: Path) -> Path:
    image, _ = volume((8, 8), (1.0, 1.0), seed=0)
    write_image(image, root / "a.nii.gz")
    (root / "labels.csv").write_text("path,label\na.nii.gz,1\n")
    return root


def test_each_format_is_detected_from_its_layout(tmp_path):
    folder = write_classification_folder(tmp_path / "folder")
    npz = tmp_path / "set.npz"
    np.savez(npz, train_images=np.zeros((2, 4, 4)), train_labels=np.array([0, 1]))
    msd = write_msd(tmp_path / "msd")
    masks = write_mask_folder(tmp_path / "masks")

    detected = {path.name: detect_format(path).name for path in (folder, npz, msd, masks)}

    assert detected == {"folder": "folder", "set.npz": "npz", "msd": "msd", "masks": "maskfolder"}
    assert set(FORMAT_NAMES) == {"folder", "npz", "msd", "maskfolder"}
    assert {get_format(name).task for name in ("msd", "maskfolder")} == {"segmentation"}
    assert {get_format(name).task for name in ("folder", "npz")} == {"classification"}


def test_an_unknown_layout_is_refused_listing_the_formats(tmp_path):
    (tmp_path / "plain").mkdir()

    with pytest.raises(DatasetFormatError) as refused:
        detect_format(tmp_path / "plain")

    for name in FORMAT_NAMES:
        assert f"{name}:" in str(refused.value)
    with pytest.raises(DatasetFormatError, match="unknown dataset format 'hdf5'"):
        get_format("hdf5")


def test_load_dataset_opens_the_class_of_each_format(tmp_path):
    folder = write_classification_folder(tmp_path / "folder")
    npz = tmp_path / "set.npz"
    np.savez(npz, train_images=np.zeros((2, 4, 4)), train_labels=np.array([0, 1]))

    assert isinstance(load_dataset(folder), ImageFolderDataset)
    assert isinstance(load_dataset(npz), NpzDataset)
    assert load_dataset(folder).task == "classification"
    for root in (write_msd(tmp_path / "msd"), write_mask_folder(tmp_path / "masks")):
        dataset = load_dataset(root)
        assert isinstance(dataset, SegmentationDataset)
        assert dataset.task == "segmentation"


def test_msd_class_names_come_from_dataset_json_and_sites_from_its_pairs(tmp_path):
    root = write_msd(tmp_path / "msd", sites=["north", "south"])

    dataset = load_dataset(root)

    assert dataset.class_names == ["background", "organ", "lesion"]
    assert dataset.num_classes == 3
    assert dataset.sites == ["north", "south", "north", "south"]
    assert dataset.storage_format == "msd"


def test_given_class_names_replace_dataset_json_s(tmp_path):
    root = write_msd(tmp_path / "msd")

    dataset = load_dataset(root, class_names=["bg", "liver", "tumour"])

    assert dataset.class_names == ["bg", "liver", "tumour"]


def test_a_mask_folder_without_class_names_has_classes_up_to_its_largest_label(tmp_path):
    root = write_mask_folder(tmp_path / "masks")

    description = get_format("maskfolder").describe(root)

    assert description.num_classes == 3
    assert description.class_names == ["background", "class 1", "class 2"]
    assert description.task == "segmentation"
    assert description.image_shape == [12, 10]
    assert description.spacing == [0.5, 0.5]


def test_msd_has_no_labelled_test_split(tmp_path):
    root = write_msd(tmp_path / "msd")

    with pytest.raises(DatasetFormatError, match=r"test images .* have no labels"):
        load_dataset(root, split="test")
    assert get_format("msd").evaluation_split is None
    assert get_format("npz").evaluation_split == "test"


def test_a_sample_is_an_image_and_an_int64_mask_on_the_same_grid(tmp_path):
    root = write_msd(tmp_path / "msd", shape=(6, 10, 8))

    image, mask = load_dataset(root)[0]

    assert image.dtype == torch.float32 and image.shape == (1, 6, 10, 8)
    assert mask.dtype == torch.int64 and mask.shape == (1, 6, 10, 8)
    assert set(mask.unique().tolist()) == {0, 1, 2}


def test_masks_resampled_by_nearest_neighbour_keep_their_label_values(tmp_path):
    root = write_msd(tmp_path / "msd", shape=(6, 10, 8))
    # An odd grid: linear interpolation would make values between 0, 1 and 2.
    dataset = load_dataset(root, preprocessor=Preprocessor(size=(13, 7, 11)))

    image, mask = dataset[0]

    assert mask.shape == (1, 11, 7, 13) and image.shape == (1, 11, 7, 13)
    assert set(mask.unique().tolist()) == {0, 1, 2}
    # The image keeps its linear interpolation: new values between the stored ones.
    raw, _ = dataset.raw_sample(0)
    assert not np.isin(image.numpy(), raw.array).all()


def test_spacing_after_resampling_is_in_array_order(tmp_path):
    root = write_msd(tmp_path / "msd", shape=(6, 10, 8), spacing=(0.8, 0.8, 2.5))

    stored = load_dataset(root).spacing(0)
    resized = load_dataset(root, preprocessor=Preprocessor(size=(16, 20, 12))).spacing(0)

    assert stored == pytest.approx((2.5, 0.8, 0.8))
    assert resized == pytest.approx((2.5 * 6 / 12, 0.8 * 10 / 20, 0.8 * 8 / 16))


def test_labels_are_each_sample_s_largest_foreground_class(tmp_path):
    root = write_msd(tmp_path / "msd", cases=2)
    _, mask = volume((6, 10, 8), (0.8, 0.8, 2.5), seed=0)
    empty = ImageArray(
        array=mask.array * 0, spacing=mask.spacing, origin=mask.origin, direction=mask.direction
    )
    replace_mask(root, "labelsTr/case_001.nii.gz", empty)

    assert load_dataset(root).labels.tolist() == [1, 0]


def test_entries_list_each_image_with_its_mask_and_read_entry_gives_both(tmp_path):
    root = write_mask_folder(tmp_path / "masks", sites=["a", "b"])
    data_format = get_format("maskfolder")

    entries = data_format.entries(root)
    image, mask = data_format.read_entry(root, entries[1])

    assert (entries[1].image, entries[1].mask, entries[1].site) == (
        "images/1.nii.gz",
        "masks/1.nii.gz",
        "b",
    )
    assert mask is not None and mask.array.shape == image.array.shape == (12, 10)
    assert mask.spacing == pytest.approx((0.5, 0.5))
    assert set(np.unique(mask.array).tolist()) == {0.0, 1.0, 2.0}


def test_a_mask_whose_shape_differs_from_its_image_is_refused_naming_it(tmp_path):
    root = write_msd(tmp_path / "msd", shape=(6, 10, 8))
    _, small = volume((6, 10, 7), (0.8, 0.8, 2.5), seed=0)
    replace_mask(root, "labelsTr/case_002.nii.gz", small)

    with pytest.raises(DatasetFormatError, match=r"case_002\.nii\.gz: mask shape"):
        get_format("msd").describe(root)


def test_a_mask_whose_spacing_differs_from_its_image_is_refused_naming_it(tmp_path):
    root = write_mask_folder(tmp_path / "masks", spacing=(0.5, 0.5))
    _, coarse = volume((12, 10), (0.7, 0.5), seed=0)
    replace_mask(root, "masks/3.nii.gz", coarse)

    with pytest.raises(DatasetFormatError, match=r"masks/3\.nii\.gz: mask spacing"):
        get_format("maskfolder").describe(root)


def test_a_label_outside_the_declared_classes_is_refused_naming_the_mask(tmp_path):
    root = write_msd(tmp_path / "msd", labels={"0": "background", "1": "organ"})

    with pytest.raises(DatasetFormatError) as refused:
        load_dataset(root).labels  # noqa: B018

    assert "labelsTr/case_000.nii.gz" in str(refused.value)
    assert "label value(s) 2 outside the declared classes" in str(refused.value)


def test_a_mask_folder_with_too_few_class_names_is_refused(tmp_path):
    root = write_mask_folder(tmp_path / "masks")

    with pytest.raises(DatasetFormatError, match=r"label value.* 2 outside"):
        get_format("maskfolder").describe(root, class_names=["background", "organ"])


def test_a_volume_too_large_for_memory_is_refused_naming_the_file(tmp_path):
    root = write_msd(tmp_path / "msd", shape=(6, 10, 8))

    with pytest.raises(DatasetFormatError, match=r"case_000\.nii\.gz: the image has 480 voxels"):
        get_format("msd").describe(root, max_voxels=400)
    dataset = load_dataset(root, max_voxels=400)
    with pytest.raises(DatasetFormatError, match="more than the 400 allowed"):
        dataset[0]


def test_dataset_json_labels_must_number_the_classes_without_gaps(tmp_path):
    root = write_msd(tmp_path / "msd", labels={"0": "background", "2": "lesion"})

    with pytest.raises(DatasetFormatError, match=r"dataset\.json.*without gaps"):
        load_dataset(root)


def test_a_missing_mask_is_refused_naming_the_labels_file(tmp_path):
    root = write_mask_folder(tmp_path / "masks")
    (root / "masks" / "2.nii.gz").unlink()

    with pytest.raises(DatasetFormatError, match=r"labels\.csv:4: masks/2\.nii\.gz not found"):
        load_dataset(root)


def test_site_statistics_count_each_class_s_volume_in_voxels_and_mm3(tmp_path):
    image, mask = volume((6, 10, 8), (0.5, 0.5, 2.0), seed=0)
    rng = np.random.default_rng(0)
    expected = np.bincount(mask.array.astype(int).ravel(), minlength=3)

    measurement = measure_image(image, rng, mask, num_classes=3)
    summary = summarise_site("a", [0, 2, 0], [measurement, measurement])

    assert measurement.class_voxels == tuple(expected.tolist())
    assert summary.class_voxels == (2 * expected).tolist()
    assert summary.class_mm3 == pytest.approx((2 * expected * 0.5 * 0.5 * 2.0).tolist())


def test_dataset_json_without_a_training_list_pairs_files_by_name(tmp_path):
    root = write_msd(tmp_path / "msd", cases=3)
    manifest = json.loads((root / "dataset.json").read_text())
    del manifest["training"]
    (root / "dataset.json").write_text(json.dumps(manifest))

    entries = get_format("msd").entries(root)

    assert [(e.image, e.mask) for e in entries] == [
        (f"imagesTr/case_{i:03d}.nii.gz", f"labelsTr/case_{i:03d}.nii.gz") for i in range(3)
    ]
