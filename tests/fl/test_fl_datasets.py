"""Datasets: image folders with labels.csv, MedMNIST-style .npz, and format detection."""

from pathlib import Path

import numpy as np
import pytest
import torch

from training.fl.data.datasets import (
    DatasetFormatError,
    ImageFolderDataset,
    NpzDataset,
    load_dataset,
)
from training.fl.data.preprocess import Preprocessor
from training.fl.data.readers import ImageArray, write_image


def write_folder(root: Path, rows: list[str], header: str = "path,label,site") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for index in range(3):
        write_image(
            ImageArray(
                array=np.full((10, 12), index, np.float32),
                spacing=(1.0, 1.0),
                origin=(0.0, 0.0),
                direction=(1.0, 0.0, 0.0, 1.0),
            ),
            root / "images" / f"{index}.nii.gz",
        )
    (root / "labels.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return root


def test_image_folder_reads_labels_sites_and_preprocessed_images(tmp_path: Path) -> None:
    # Given a folder of three images listed with labels and sites
    root = write_folder(
        tmp_path / "set", ["images/0.nii.gz,0,a", "images/1.nii.gz,1,b", "images/2.nii.gz,1,a"]
    )
    # When it is opened with a resampling preprocessor
    dataset = ImageFolderDataset(root, preprocessor=Preprocessor(size=(8, 8), normalization="none"))
    # Then labels, sites and C x H x W tensors come from the folder
    assert len(dataset) == 3
    assert dataset.labels.tolist() == [0, 1, 1]
    assert dataset.sites == ["a", "b", "a"]
    image, label = dataset[1]
    assert image.shape == (1, 8, 8)
    assert label == 1
    assert torch.allclose(image, torch.ones(1, 8, 8))
    assert (dataset.num_classes, dataset.in_channels, dataset.spatial_dims) == (2, 1, 2)


def test_image_folder_caches_preprocessed_tensors(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "set", ["images/0.nii.gz,0", "images/1.nii.gz,1"], "path,label")
    dataset = ImageFolderDataset(root)
    assert dataset.sites is None
    assert dataset[0][0] is dataset[0][0]


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        (["images/0.nii.gz,0"], "file,label", "needs columns path,label"),
        (["images/9.nii.gz,0"], "path,label", r"labels\.csv:2: images/9\.nii\.gz not found"),
        (["../outside.nii.gz,0"], "path,label", "must lie in the folder"),
        (["images/0.nii.gz,benign"], "path,label", "is not an integer"),
        (["images/0.nii.gz,-1"], "path,label", "non-negative"),
        ([], "path,label", "no samples"),
    ],
)
def test_image_folder_rejects_a_bad_labels_file(
    tmp_path: Path, rows: list[str], header: str, message: str
) -> None:
    (tmp_path / "outside.nii.gz").write_bytes(b"")
    root = write_folder(tmp_path / "set", rows, header)
    with pytest.raises(DatasetFormatError, match=message):
        ImageFolderDataset(root)


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_dataset_reads_a_medmnist_split_with_column_labels(tmp_path: Path) -> None:
    # Given a MedMNIST-style file with uint8 images and (N, 1) labels
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    path = write_npz(
        tmp_path / "set.npz",
        train_images=images,
        train_labels=np.array([[0], [1], [2], [1], [0], [2]]),
        val_images=images[:2],
        val_labels=np.array([[1], [0]]),
    )
    # When the train and val splits are opened
    train = NpzDataset(path, "train")
    val = NpzDataset(path, "val")
    # Then labels are flat, images are 1 x H x W scaled to [0, 1]
    assert train.labels.tolist() == [0, 1, 2, 1, 0, 2]
    assert val.labels.tolist() == [1, 0]
    image, label = train[3]
    assert image.shape == (1, 28, 28)
    assert label == 1
    assert torch.allclose(image[0], torch.from_numpy(images[3] / 255.0).float())
    assert train.num_classes == 3
    assert train.sites is None


def test_npz_dataset_puts_rgb_channels_first_and_keeps_volumes_3d(tmp_path: Path) -> None:
    rgb = write_npz(
        tmp_path / "rgb.npz",
        test_images=np.zeros((2, 28, 28, 3), np.uint8),
        test_labels=np.array([0, 1]),
    )
    volume = write_npz(
        tmp_path / "volume.npz",
        train_images=np.zeros((2, 28, 28, 28), np.uint8),
        train_labels=np.array([0, 1]),
        train_sites=np.array(["x", "y"]),
    )
    assert NpzDataset(rgb, "test")[0][0].shape == (3, 28, 28)
    volumes = NpzDataset(volume)
    assert volumes[0][0].shape == (1, 28, 28, 28)
    assert volumes.sites == ["x", "y"]


def test_npz_dataset_rejects_missing_splits_and_multilabel_targets(tmp_path: Path) -> None:
    path = write_npz(
        tmp_path / "set.npz",
        train_images=np.zeros((2, 8, 8), np.uint8),
        train_labels=np.array([[0, 1], [1, 0]]),
    )
    with pytest.raises(DatasetFormatError, match=r"missing arrays.*test_images"):
        NpzDataset(path, "test")
    with pytest.raises(DatasetFormatError, match="multi-label"):
        NpzDataset(path, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        NpzDataset(path, "holdout")


def test_load_dataset_detects_folder_and_npz_formats(tmp_path: Path) -> None:
    folder = write_folder(
        tmp_path / "set", ["images/0.nii.gz,0", "images/1.nii.gz,1"], "path,label"
    )
    npz = write_npz(
        tmp_path / "set.npz", train_images=np.zeros((2, 8, 8)), train_labels=np.array([0, 1])
    )
    assert isinstance(load_dataset(folder), ImageFolderDataset)
    assert isinstance(load_dataset(npz), NpzDataset)


def test_load_dataset_rejects_anything_else_with_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetFormatError, match=r"expected a folder containing labels\.csv"):
        load_dataset(tmp_path / "plain")
    with pytest.raises(ValueError, match="unknown dataset format"):
        load_dataset(tmp_path / "plain", fmt="hdf5")


def test_image_folder_accepts_a_spreadsheet_labels_file_with_byte_order_mark(
    tmp_path: Path,
) -> None:
    root = write_folder(tmp_path / "set", ["images/0.nii.gz, 1 ,x"])
    (root / "labels.csv").write_bytes(b"\xef\xbb\xbf" + (root / "labels.csv").read_bytes())
    dataset = ImageFolderDataset(root)
    assert dataset.labels.tolist() == [1]
    assert dataset.sites == ["x"]
