"""A MedMNIST-style ``.npz``: ``<split>_images``, ``<split>_labels`` and optionally
``<split>_sites`` for the splits train, val and test."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from training.fl.data.cache import DecodedCache
from training.fl.data.errors import DEFAULT_MAX_VOLUME_VOXELS, DatasetFormatError
from training.fl.data.formats.base import (
    CLASSIFICATION,
    DatasetDescription,
    DatasetFormat,
    ImageEntry,
)
from training.fl.data.preprocess import Preprocessor
from training.fl.data.readers import ImageArray

if TYPE_CHECKING:
    from training.fl.data.datasets import NpzDataset

__all__ = ["NpzFormat"]

# How an entry names its row: "<file> <split>[<row>]".
_ENTRY_NAME = re.compile(r"(?P<split>\w+)\[(?P<row>\d+)\]$")


@lru_cache(maxsize=2)
def _split_images(path: str, split: str, modified_ns: int) -> npt.NDArray[np.generic]:
    """One split's images, kept for the next look (the viewer reads one row at a time)."""
    with np.load(path, allow_pickle=False) as archive:
        images: npt.NDArray[np.generic] = archive[f"{split}_images"]
    return images


class NpzFormat(DatasetFormat):
    """Its own test split holds the data that evaluates the global model."""

    name = "npz"
    task = CLASSIFICATION
    summary = "npz: a MedMNIST-style .npz file (train_images, train_labels, ...)"
    splits = ("train", "val", "test")
    evaluation_split = "test"
    stores_geometry = False

    def detect(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".npz"

    def open(
        self,
        path: Path,
        *,
        split: str = "train",
        preprocessor: Preprocessor | None = None,
        class_names: Sequence[str] | None = None,
        max_voxels: int = DEFAULT_MAX_VOLUME_VOXELS,
        decoded_cache: DecodedCache | None = None,
    ) -> NpzDataset:
        from training.fl.data.datasets import NpzDataset

        self.check_split(path, split)
        if preprocessor is None:
            return NpzDataset(path, split, decoded_cache=decoded_cache)
        # The file's images keep their size; they take the normalization and channels.
        return NpzDataset(
            path,
            split,
            normalization=preprocessor.normalization,
            channels=preprocessor.channels,
            decoded_cache=decoded_cache,
        )

    def describe(
        self,
        path: Path,
        *,
        class_names: Sequence[str] | None = None,
        max_voxels: int = DEFAULT_MAX_VOLUME_VOXELS,
    ) -> DatasetDescription:
        data = self.open(path)
        image, _ = data[0]
        return DatasetDescription(
            storage_format=self.name,
            task=self.task,
            num_samples=len(data),
            num_classes=data.num_classes,
            class_names=list(class_names or []),
            channels=data.in_channels,
            image_shape=list(image.shape[1:]),
        )

    def entries(self, path: Path, *, split: str = "train") -> list[ImageEntry]:
        data = self.open(path, split=split)
        return [
            ImageEntry(
                image=f"{path.name} {split}[{position}]",
                mask=None,
                label=int(label),
                site=data.sites[position] if data.sites is not None else None,
                position=position,
            )
            for position, label in enumerate(data.labels.tolist())
        ]

    def read_entry(
        self, path: Path, entry: ImageEntry, *, max_voxels: int = DEFAULT_MAX_VOLUME_VOXELS
    ) -> tuple[ImageArray, ImageArray | None]:
        """The row as stored (no scaling), with unit spacing: an .npz stores no geometry."""
        named = _ENTRY_NAME.search(entry.image)
        split = named["split"] if named else "train"
        self.check_split(path, split)
        images = _split_images(str(path), split, path.stat().st_mtime_ns)
        if not 0 <= entry.position < len(images):
            raise DatasetFormatError(f"{path}: {split} has no row {entry.position}")
        pixels = np.asarray(images[entry.position], dtype=np.float32)
        # Like NpzDataset: a trailing axis of 3 is colour, otherwise 3 axes make a volume.
        dims = 2 if pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3) else 3
        image = ImageArray(
            array=pixels,
            spacing=(1.0,) * dims,
            origin=(0.0,) * dims,
            direction=tuple(np.eye(dims).ravel().tolist()),
        )
        return image, None

    def native_channels(self, path: Path) -> int:
        from training.fl.data.datasets import npz_array_shape

        shape = npz_array_shape(path, "train_images")
        return 3 if len(shape) == 4 and shape[-1] == 3 else 1
