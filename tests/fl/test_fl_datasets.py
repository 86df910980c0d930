"""Datasets: image folders with labels.csv, MedMNIST-style .npz, and format detection."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from training.fl.data.datasets import (
    DatasetFormatError,
    ImageFolderDataset,
    NpzDataset,
    load_dataset,
    native_channels,
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
    # Then labels are flat, images are 1 x H x W, normalised as MedMNIST does by default
    assert train.labels.tolist() == [0, 1, 2, 1, 0, 2]
    assert val.labels.tolist() == [1, 0]
    image, label = train[3]
    assert image.shape == (1, 28, 28)
    assert label == 1
    expected = torch.from_numpy((images[3] / 255.0 - 0.5) / 0.5).float()
    assert torch.allclose(image[0], expected, atol=1e-6)
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


def test_an_8_bit_npz_is_normalised_like_medmnist_by_default(tmp_path: Path) -> None:
    # Given uint8 pixels 0, 51, 255
    pixels = np.array([[[0, 51], [255, 255]]], np.uint8)
    path = write_npz(tmp_path / "set.npz", train_images=pixels, train_labels=np.array([0]))
    # When the file is opened without a normalization
    dataset = NpzDataset(path)
    # Then pixels are divided by 255, then by mean-std:0.5,0.5: 0 -> -1, 51 -> -0.6, 255 -> 1
    assert dataset.normalization == "mean-std:0.5,0.5"
    np.testing.assert_allclose(dataset[0][0][0].numpy(), [[-1.0, -0.6], [1.0, 1.0]], atol=1e-6)


def test_a_float_npz_is_used_as_stored_by_default(tmp_path: Path) -> None:
    pixels = np.array([[[-120.5, 3.25]]], np.float32)
    path = write_npz(tmp_path / "set.npz", train_images=pixels, train_labels=np.array([0]))
    dataset = NpzDataset(path)
    assert dataset.normalization == "none"
    np.testing.assert_array_equal(dataset[0][0].numpy(), pixels[:, np.newaxis][0])


def test_an_rgb_npz_takes_a_per_channel_mean_std(tmp_path: Path) -> None:
    # Given an RGB image whose channels hold 51, 102 and 204 everywhere
    rgb = np.empty((1, 4, 4, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 51, 102, 204
    path = write_npz(tmp_path / "rgb.npz", train_images=rgb, train_labels=np.array([1]))
    # When it is normalised per channel
    dataset = NpzDataset(path, normalization="mean-std:0.2,0.4,0.6/0.1,0.2,0.4")
    # Then channel c holds (value / 255 - mean[c]) / std[c]
    image = dataset[0][0]
    assert image.shape == (3, 4, 4)
    expected = [(51 / 255 - 0.2) / 0.1, (102 / 255 - 0.4) / 0.2, (204 / 255 - 0.6) / 0.4]
    np.testing.assert_allclose(image[:, 2, 1].numpy(), expected, atol=1e-5)


def test_an_npz_refuses_per_channel_values_for_grey_images(tmp_path: Path) -> None:
    path = write_npz(
        tmp_path / "grey.npz", train_images=np.zeros((1, 4, 4), np.uint8), train_labels=[0]
    )
    with pytest.raises(DatasetFormatError, match=r"grey\.npz: .*3 means but the images have 1"):
        NpzDataset(path, normalization="mean-std:0.2,0.4,0.6/0.1")


def test_an_npz_converts_channels_to_those_registered(tmp_path: Path) -> None:
    # Given a grey file and an RGB file
    grey = np.array([[[0, 255]]], np.uint8)
    rgb = np.zeros((1, 1, 2, 3), np.uint8)
    rgb[0, 0, 1] = (100, 200, 50)
    grey_path = write_npz(tmp_path / "g.npz", train_images=grey, train_labels=np.array([0]))
    rgb_path = write_npz(tmp_path / "c.npz", train_images=rgb, train_labels=np.array([0]))
    # When the grey one is opened as colour and the colour one as grey
    as_colour = NpzDataset(grey_path, normalization="none", channels=3)[0][0]
    as_grey = NpzDataset(rgb_path, normalization="none", channels=1)[0][0]
    # Then grey is repeated and colour collapsed with luma weights
    assert as_colour.shape == (3, 1, 2)
    np.testing.assert_allclose(as_colour[:, 0, 1].numpy(), [1.0, 1.0, 1.0])
    assert as_grey.shape == (1, 1, 2)
    luma = (0.299 * 100 + 0.587 * 200 + 0.114 * 50) / 255
    assert float(as_grey[0, 0, 1]) == pytest.approx(luma, abs=1e-6)


def test_load_dataset_gives_an_npz_the_preprocessors_normalization_and_channels(
    tmp_path: Path,
) -> None:
    pixels = np.array([[[10.0, 30.0]]], np.float32)
    path = write_npz(tmp_path / "set.npz", train_images=pixels, train_labels=np.array([0]))
    dataset = load_dataset(path, preprocessor=Preprocessor(normalization="minmax", channels=3))
    assert dataset[0][0].shape == (3, 1, 2)
    np.testing.assert_allclose(dataset[0][0][:, 0].numpy(), [[0.0, 1.0]] * 3)


def test_native_channels_are_read_from_the_npz_header_or_the_first_image(
    tmp_path: Path,
) -> None:
    rgb = write_npz(
        tmp_path / "rgb.npz",
        train_images=np.zeros((2, 8, 8, 3), np.uint8),
        train_labels=np.array([0, 1]),
    )
    volume = write_npz(
        tmp_path / "volume.npz",
        train_images=np.zeros((2, 4, 8, 8), np.uint8),
        train_labels=np.array([0, 1]),
    )
    np.savez_compressed(
        tmp_path / "compressed.npz",
        train_images=np.zeros((2, 8, 8, 3), np.uint8),
        train_labels=np.array([0, 1]),
    )
    colour_folder = tmp_path / "colour"
    write_image(
        ImageArray(
            array=np.zeros((6, 6, 3), np.float32),
            spacing=(1.0, 1.0),
            origin=(0.0, 0.0),
            direction=(1.0, 0.0, 0.0, 1.0),
        ),
        colour_folder / "a.png",
    )
    (colour_folder / "labels.csv").write_text("path,label\na.png,0\n", encoding="utf-8")
    grey_folder = write_folder(tmp_path / "grey", ["images/0.nii.gz,0"], "path,label")

    assert native_channels(rgb) == 3
    assert native_channels(tmp_path / "compressed.npz", "npz") == 3
    assert native_channels(volume) == 1
    assert native_channels(colour_folder) == 3
    assert native_channels(grey_folder, "folder") == 1
    with pytest.raises(DatasetFormatError, match="no train_images array"):
        native_channels(write_npz(tmp_path / "empty.npz", test_labels=np.array([0])))


def test_image_folder_reads_the_volume_of_a_4d_file_that_labels_csv_chooses(
    tmp_path: Path,
) -> None:
    # Given a 4D NIfTI of two volumes (all 0s, all 1s) listed once per volume as "#N"
    root = write_folder(tmp_path / "set", ["cine.nii.gz#1,1", "cine.nii.gz#0,0"], "path,label")
    volumes = np.stack([np.full((2, 4, 4), t, np.float32) for t in range(2)])
    sitk.WriteImage(sitk.GetImageFromArray(volumes, isVector=False), str(root / "cine.nii.gz"))
    # When the folder is opened and read
    dataset = ImageFolderDataset(root, preprocessor=Preprocessor(normalization="none"))
    # Then each row is its own 3D volume of the file
    assert [path.name for path in dataset.paths] == ["cine.nii.gz#1", "cine.nii.gz#0"]
    assert torch.all(dataset[0][0] == 1) and dataset[0][0].shape == (1, 2, 4, 4)
    assert torch.all(dataset[1][0] == 0)


def test_image_folder_refuses_a_chosen_volume_of_a_file_that_is_not_there(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "set", ["missing.nii.gz#1,1"], "path,label")
    with pytest.raises(DatasetFormatError, match=r"missing\.nii\.gz#1 not found"):
        ImageFolderDataset(root)
