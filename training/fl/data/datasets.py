"""Labelled image datasets that training and partitioning work with.

Classification datasets yield ``(tensor, label)`` pairs, with a channels-first float32
tensor; segmentation datasets (:class:`SegmentationDataset`) yield ``(tensor, mask)``.
Both expose ``task``, ``labels`` (an int64 numpy array) and ``sites`` (one name per
sample, or None) so that partitioners never have to load images. Which class opens which
files is the format registry's business (training/fl/data/formats/).
"""

from __future__ import annotations

import csv
import os
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset

from training.fl.data.cache import (
    DECODING,
    SAMPLE_ERRORS,
    DecodedCache,
    EntryWriter,
    SampleArrays,
    files_fingerprint,
    preprocessing_key,
)
from training.fl.data.errors import DEFAULT_MAX_VOLUME_VOXELS, LABELS_FILE, DatasetFormatError
from training.fl.data.headers import check_volume_size
from training.fl.data.preprocess import (
    DEFAULT_NPZ_NORMALIZATION,
    DEFAULT_UINT8_NPZ_NORMALIZATION,
    LUMA_WEIGHTS,
    Normalization,
    NormalizationError,
    Preprocessor,
    parse_normalization,
)
from training.fl.data.readers import ImageArray, read_image, split_volume
from training.fl.data.segmentation import SegmentationDataset

__all__ = [
    "LABELS_FILE",
    "ClassificationDataset",
    "DatasetFormatError",
    "ImageFolderDataset",
    "NpzDataset",
    "SegmentationDataset",
    "load_dataset",
    "native_channels",
]

_NPZ_SPLITS = ("train", "val", "test")


class ClassificationDataset(Dataset[tuple[torch.Tensor, int]], ABC):
    """A dataset of images with integer class labels and optional acquisition sites."""

    task = "classification"
    #: The format registry's name for how the data is stored.
    storage_format: str
    labels: npt.NDArray[np.int64]
    sites: list[str] | None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...

    @abstractmethod
    def raw_sample(self, index: int) -> tuple[ImageArray, None]:
        """Sample ``index`` before preprocessing, and no mask."""

    def read_sample(self, index: int) -> tuple[torch.Tensor, int]:
        """``self[index]`` without any cache (a web process must not keep every image)."""
        return self[index]

    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes of decoded samples this object holds in memory or maps from the decoded
        cache (mapped pages are resident only once read, and the kernel may reclaim them,
        so this is what they may come to)."""

    @property
    def num_classes(self) -> int:
        """Largest label + 1, and at least 2 so that a split missing a class still gets a
        two-way head; use the training split's value for the network."""
        return max(int(self.labels.max()) + 1, 2)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one input tensor, channels first."""
        return tuple(self[0][0].shape)

    @property
    def in_channels(self) -> int:
        return self.sample_shape[0]

    @property
    def spatial_dims(self) -> int:
        return len(self.sample_shape) - 1


def _csv_problem(error: csv.Error) -> str:
    if "field larger than field limit" in str(error):
        # csv.field_size_limit() stays at its default: a labels file holds short cells.
        return (
            f"a cell is longer than {csv.field_size_limit()} characters; each row holds only "
            "path,label[,site]"
        )
    return f"not valid CSV ({error})"


def _check_labels(labels: npt.NDArray[np.int64], source: object) -> None:
    if len(labels) == 0:
        raise DatasetFormatError(f"{source}: dataset has no samples")
    if labels.min() < 0:
        raise DatasetFormatError(f"{source}: labels must be non-negative integers")


class _DecodedImages:
    """Memory-mapped decoded samples as tensors; one tensor for all when they share a shape,
    so that taking a sample is an index into it."""

    def __init__(self, samples: SampleArrays, failures: dict[int, Exception]) -> None:
        self.samples = samples
        self.failures = failures
        self.dense = torch.from_numpy(samples.dense) if samples.dense is not None else None

    def __getitem__(self, index: int) -> torch.Tensor:
        failure = self.failures.get(index)
        if failure is not None:
            raise failure
        if self.dense is not None:
            return self.dense[index]
        return torch.from_numpy(self.samples[index])


class ImageFolderDataset(ClassificationDataset):
    """A folder of images listed in ``labels.csv`` with columns ``path,label[,site]``.

    Paths are relative to the folder and may name image files, DICOM series folders or
    one volume of a 4D file (``scan.nii.gz#3``, volumes counted from 0). An image larger
    than ``max_voxels`` is refused before its pixels are read.

    With a ``decoded_cache``, the first sample asked for decodes every image into it (or
    maps what another process decoded); without one, preprocessed tensors are kept in
    memory after their first use when ``cache`` is on.
    """

    storage_format = "folder"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        preprocessor: Preprocessor | None = None,
        cache: bool = True,
        max_voxels: int = DEFAULT_MAX_VOLUME_VOXELS,
        decoded_cache: DecodedCache | None = None,
    ) -> None:
        self.root = Path(root)
        self.preprocessor = preprocessor or Preprocessor()
        self.cache = cache
        self.max_voxels = max_voxels
        self.decoded_cache = decoded_cache
        self._cached: dict[int, torch.Tensor] = {}
        self._decoded: _DecodedImages | None = None
        self.paths, labels, sites = self._read_labels_file()
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sites = sites
        _check_labels(self.labels, self.root / LABELS_FILE)

    def _read_labels_file(self) -> tuple[list[Path], list[int], list[str] | None]:
        labels_path = self.root / LABELS_FILE
        if not labels_path.is_file():
            raise DatasetFormatError(f"{self.root}: no {LABELS_FILE} in this folder")
        root = self.root.resolve()
        paths: list[Path] = []
        labels: list[int] = []
        sites: list[str] = []
        # utf-8-sig also accepts the byte-order mark that spreadsheet exports add.
        with labels_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            try:
                columns = set(reader.fieldnames or ())
                if not {"path", "label"} <= columns:
                    raise DatasetFormatError(
                        f"{labels_path}: needs columns path,label[,site]; found {sorted(columns)}"
                    )
                has_site = "site" in columns
                for line, row in enumerate(reader, start=2):
                    # Short rows give None for their missing cells.
                    relative = (row["path"] or "").strip()
                    label = (row["label"] or "").strip()
                    # "scan.nii.gz#3" names volume 3 of a 4D file (see readers.split_volume).
                    file, volume = split_volume(root / relative)
                    path = file.resolve()
                    if not relative or not path.is_relative_to(root):
                        raise DatasetFormatError(
                            f"{labels_path}:{line}: path must lie in the folder"
                        )
                    if not path.exists():
                        raise DatasetFormatError(f"{labels_path}:{line}: {relative} not found")
                    if volume is not None:
                        path = path.with_name(f"{path.name}#{volume}")
                    try:
                        labels.append(int(label))
                    except ValueError:
                        raise DatasetFormatError(
                            f"{labels_path}:{line}: label {label!r} is not an integer"
                        ) from None
                    paths.append(path)
                    if has_site:
                        sites.append((row["site"] or "").strip())
            except csv.Error as error:
                # The DictReader's own line_num stops at the last row it could read.
                raise DatasetFormatError(
                    f"{labels_path}:{reader.reader.line_num}: {_csv_problem(error)}"
                ) from None
        return paths, labels, sites if has_site else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.decoded_cache is not None:
            return self._decoded_images(self.decoded_cache)[index], int(self.labels[index])
        tensor = self._cached.get(index)
        if tensor is None:
            tensor = self.read_sample(index)[0]
            if self.cache:
                self._cached[index] = tensor
        return tensor, int(self.labels[index])

    def _decoded_images(self, decoded_cache: DecodedCache) -> _DecodedImages:
        if self._decoded is None:
            with DECODING:
                if self._decoded is None:
                    key = {
                        "source": str(self.root.resolve()),
                        "format": self.storage_format,
                        "kind": "images",
                        "preprocessing": preprocessing_key(self.preprocessor),
                        "fingerprint": files_fingerprint(self.paths),
                    }
                    entry = decoded_cache.entry(key, self._write_images)
                    self._decoded = _DecodedImages(entry.samples("images"), entry.failures())
        return self._decoded

    def _write_images(self, writer: EntryWriter) -> None:
        for index in range(len(self)):
            try:
                image = self.preprocessor.array(self.raw_sample(index)[0])
            except SAMPLE_ERRORS as error:
                writer.add_failure(index, error)
                image = np.zeros(0, dtype=np.float32)
            writer.add_sample("images", image)

    def memory_bytes(self) -> int:
        mapped = self._decoded.samples.nbytes if self._decoded is not None else 0
        return mapped + sum(tensor.nbytes for tensor in self._cached.values())

    def raw_sample(self, index: int) -> tuple[ImageArray, None]:
        check_volume_size(self.paths[index], self.max_voxels)
        return read_image(self.paths[index]), None

    def read_sample(self, index: int) -> tuple[torch.Tensor, int]:
        return self.preprocessor(self.raw_sample(index)[0]), int(self.labels[index])


class NpzDataset(ClassificationDataset):
    """One split of a MedMNIST-style ``.npz`` (``train_images``, ``train_labels``, ...).

    Images are (N, H, W) grey, (N, H, W, 3) RGB or (N, D, H, W) volumes; uint8 pixels
    are scaled to [0, 1] before ``normalization`` (a spec for
    :func:`~training.fl.data.preprocess.parse_normalization`; blank means the format's
    default: ``mean-std:0.5,0.5`` for uint8 pixels, MedMNIST's convention, else ``none``).
    ``channels`` (1 or 3) converts grey to RGB or RGB to grey; None keeps the file's.
    An optional ``<split>_sites`` array gives acquisition sites. Row ``i`` of the
    dataset is row ``i`` of the split's arrays. Multi-label tasks (labels with more than
    one column) are not supported.
    """

    storage_format = "npz"

    def __init__(
        self,
        path: str | os.PathLike[str],
        split: str = "train",
        *,
        normalization: str = "",
        channels: int | None = None,
        decoded_cache: DecodedCache | None = None,
    ) -> None:
        if split not in _NPZ_SPLITS:
            raise ValueError(f"split must be one of {_NPZ_SPLITS}, got {split!r}")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or None, got {channels}")
        self.path = Path(path)
        self.split = split
        # Labels and sites are small and read from the file every time; the images are
        # decompressed and normalised once into the decoded cache when one is given.
        arrays = self._read_arrays((f"{split}_labels", f"{split}_sites"))
        labels, sites = arrays[f"{split}_labels"], arrays.get(f"{split}_sites")
        if labels.ndim == 2 and labels.shape[1] != 1:
            raise DatasetFormatError(f"{self.path}: multi-label targets are not supported")
        self.labels = labels.reshape(-1).astype(np.int64)
        self.sites = None if sites is None else [str(site) for site in sites]
        _check_labels(self.labels, self.path)
        if decoded_cache is None:
            self.normalization, pixels = self._decode(normalization, channels)
            self.images = torch.from_numpy(pixels)
            return
        key = {
            "source": str(self.path.resolve()),
            "format": self.storage_format,
            "kind": f"{split}_images",
            "preprocessing": {"normalization": normalization.strip(), "channels": channels},
            "fingerprint": files_fingerprint([self.path]),
        }

        def write(writer: EntryWriter) -> None:
            writer.meta["normalization"], pixels = self._decode(normalization, channels)
            writer.add_array("images", pixels)

        with DECODING:
            entry = decoded_cache.entry(key, write)
        #: The normalization applied, with the format's default filled in.
        self.normalization = str(entry.meta["normalization"])
        self.images = torch.from_numpy(entry.array("images"))
        if len(self.images) != len(self.labels):  # the entry was decoded from this file
            raise DatasetFormatError(f"{self.path}: {split} images and labels differ in length")

    def _read_arrays(self, names: Sequence[str]) -> dict[str, npt.NDArray[np.generic]]:
        """Those of the named arrays that the file holds (it must hold the split's images
        and labels); only these are decompressed."""
        try:
            archive = np.load(self.path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DatasetFormatError(f"{self.path}: not a readable .npz file ({error})") from None
        with archive:
            required = {f"{self.split}_images", f"{self.split}_labels"}
            missing = required - set(archive.files)
            if missing:
                raise DatasetFormatError(
                    f"{self.path}: missing arrays {sorted(missing)}; found {sorted(archive.files)}"
                )
            return {name: archive[name] for name in names if name in archive.files}

    def _decode(
        self, normalization: str, channels: int | None
    ) -> tuple[str, npt.NDArray[np.float32]]:
        """The split's images as float32, channels first, normalised; with the
        normalization applied (the format's default filled in)."""
        images = self._read_arrays((f"{self.split}_images",))[f"{self.split}_images"]
        if len(images) != len(self.labels):
            raise DatasetFormatError(
                f"{self.path}: {self.split} images and labels differ in length"
            )
        if not normalization.strip():
            normalization = (
                DEFAULT_UINT8_NPZ_NORMALIZATION
                if images.dtype == np.uint8
                else DEFAULT_NPZ_NORMALIZATION
            )
        parsed = parse_normalization(normalization)
        return parsed.spec, self._to_array(images, parsed, channels)

    def _to_array(
        self,
        images: npt.NDArray[np.generic],
        normalization: Normalization,
        channels: int | None,
    ) -> npt.NDArray[np.float32]:
        pixels = images.astype(np.float32)
        if images.dtype == np.uint8:
            pixels /= 255.0
        if pixels.ndim == 4 and pixels.shape[-1] == 3:  # RGB, channels last
            pixels = np.moveaxis(pixels, -1, 1)
        elif pixels.ndim in (3, 4):  # grey 2D images or volumes: add the channel axis
            pixels = pixels[:, np.newaxis]
        else:
            raise DatasetFormatError(
                f"{self.path}: cannot interpret images of shape {images.shape}"
            )
        if channels == 3 and pixels.shape[1] == 1:
            pixels = np.repeat(pixels, 3, axis=1)
        elif channels == 1 and pixels.shape[1] == 3:
            pixels = np.tensordot(pixels, LUMA_WEIGHTS, axes=([1], [0]))[:, np.newaxis]
        try:
            normalization.check_channels(pixels.shape[1])
        except NormalizationError as error:
            raise DatasetFormatError(f"{self.path}: {error}") from None
        return np.ascontiguousarray(normalization.batch(pixels), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def memory_bytes(self) -> int:
        return self.images.nbytes

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def raw_sample(self, index: int) -> tuple[ImageArray, None]:
        """Row ``index`` as an image: as loaded (channels last), unit spacing (an .npz
        stores none)."""
        tensor = self.images[index]
        pixels = tensor[0] if tensor.shape[0] == 1 else tensor.movedim(0, -1)
        dims = tensor.dim() - 1
        identity = tuple(float(row == column) for row in range(dims) for column in range(dims))
        image = ImageArray(
            array=pixels.numpy(), spacing=(1.0,) * dims, origin=(0.0,) * dims, direction=identity
        )
        return image, None


def native_channels(path: str | os.PathLike[str], fmt: str | None = None) -> int:
    """The channels a dataset's images have as stored, 1 (grey) or 3 (colour), read from
    the first image only (for ``.npz``, from the array's header, not its pixels)."""
    # The formats open the classes defined here, so the registry is imported on use.
    from training.fl.data.formats import detect_format, get_format

    path = Path(path)
    return (get_format(fmt) if fmt else detect_format(path)).native_channels(path)


def npz_array_shape(path: Path, name: str) -> tuple[int, ...]:
    """The shape of one array of an .npz, from its .npy header."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(member)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(member)
    except KeyError:
        raise DatasetFormatError(f"{path}: no {name} array in this file") from None
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DatasetFormatError(f"{path}: not a readable .npz file ({error})") from None
    return tuple(int(size) for size in shape)


def load_dataset(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    split: str = "train",
    preprocessor: Preprocessor | None = None,
    class_names: Sequence[str] | None = None,
    max_voxels: int = DEFAULT_MAX_VOLUME_VOXELS,
    decoded_cache: DecodedCache | None = None,
) -> ClassificationDataset | SegmentationDataset:
    """Open one split of a dataset, in format ``fmt`` (a registry name) or the one detected.

    ``preprocessor`` is applied whole to image files; ``.npz`` files take its
    normalization and channels (their images keep their size). ``class_names`` declares
    a segmentation dataset's classes (else its format's own, or those its masks hold);
    ``max_voxels`` bounds each image read. With a ``decoded_cache``, images are decoded
    once into it, on first use, and memory-mapped from there (training.fl.data.cache).
    """
    from training.fl.data.formats import detect_format, get_format

    path = Path(path)
    data_format = get_format(fmt) if fmt else detect_format(path)
    dataset: ClassificationDataset | SegmentationDataset = data_format.open(
        path,
        split=split,
        preprocessor=preprocessor,
        class_names=class_names,
        max_voxels=max_voxels,
        decoded_cache=decoded_cache,
    )
    return dataset
