"""What every dataset format provides: detection, opening a split, a description for the
ledger, and the list of images (with their masks) that the viewer shows."""

from __future__ import annotations

import csv
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from training.fl.data.cache import DecodedCache
from training.fl.data.errors import DEFAULT_MAX_VOLUME_VOXELS, DatasetFormatError
from training.fl.data.headers import check_volume_size
from training.fl.data.preprocess import Preprocessor
from training.fl.data.readers import ImageArray, read_image, split_volume

__all__ = [
    "CLASSIFICATION",
    "SEGMENTATION",
    "DatasetDescription",
    "DatasetFormat",
    "ImageEntry",
    "csv_columns",
    "read_listed_file",
]

CLASSIFICATION = "classification"
SEGMENTATION = "segmentation"


@dataclass(frozen=True)
class ImageEntry:
    """One image of a dataset as the viewer lists it.

    ``image`` and ``mask`` are relative to the dataset's folder (array formats name the
    file and row instead, e.g. ``set.npz train[3]``, with no mask); ``position`` is the
    image's index in the split the entry was listed from.
    """

    image: str
    mask: str | None
    label: int | None
    site: str | None
    position: int


@dataclass(frozen=True)
class DatasetDescription:
    """What the ledger records of a dataset, read from the data itself. ``image_shape`` and
    ``spacing`` are in array order ((depth,) height, width) and describe the first image;
    ``spacing`` is empty when the format stores none."""

    storage_format: str
    task: str
    num_samples: int
    num_classes: int
    class_names: list[str]
    channels: int
    image_shape: list[int]
    spacing: list[float] = field(default_factory=list)

    def ledger_fields(self) -> dict[str, Any]:
        return {
            "storage_format": self.storage_format,
            "task": self.task,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "channels": self.channels,
            "image_shape": list(self.image_shape),
            "spacing": list(self.spacing),
        }


class DatasetFormat(ABC):
    """One way of storing a dataset. Subclasses are stateless; the registry holds one each."""

    #: The StorageFormat value the ledger stores.
    name: ClassVar[str]
    #: "classification" or "segmentation".
    task: ClassVar[str]
    #: What users read in error messages listing the formats.
    summary: ClassVar[str]
    #: The splits ``open`` accepts; "train" is what training and the viewer read.
    splits: ClassVar[tuple[str, ...]] = ("train",)
    #: A split of labelled data kept apart for evaluating the global model, or None when
    #: the server holds back a share of "train" instead.
    evaluation_split: ClassVar[str | None] = None
    #: Whether images carry their physical spacing (an array file stores none).
    stores_geometry: ClassVar[bool] = True

    @abstractmethod
    def detect(self, path: Path) -> bool:
        """Whether ``path`` looks like a dataset of this format (cheap: no pixels read)."""

    @abstractmethod
    def open(
        self,
        path: Path,
        *,
        split: str = "train",
        preprocessor: Preprocessor | None = None,
        class_names: Sequence[str] | None = None,
        max_voxels: int = DEFAULT_MAX_VOLUME_VOXELS,
        decoded_cache: DecodedCache | None = None,
    ) -> Any:
        """The dataset of one split. ``class_names`` declares the classes (segmentation
        masks are checked against them); ``max_voxels`` bounds each image read; with a
        ``decoded_cache`` the dataset decodes its images once into it (see
        training.fl.data.cache)."""

    @abstractmethod
    def describe(
        self,
        path: Path,
        *,
        class_names: Sequence[str] | None = None,
        max_voxels: int = DEFAULT_MAX_VOLUME_VOXELS,
    ) -> DatasetDescription:
        """The ledger's facts about the dataset; raises on data that training would refuse."""

    @abstractmethod
    def entries(self, path: Path, *, split: str = "train") -> list[ImageEntry]:
        """Every image of a split, in the dataset's order (entry i is sample i)."""

    @abstractmethod
    def read_entry(
        self, path: Path, entry: ImageEntry, *, max_voxels: int = DEFAULT_MAX_VOLUME_VOXELS
    ) -> tuple[ImageArray, ImageArray | None]:
        """An entry's stored image and mask (None without one), with their geometry."""

    @abstractmethod
    def native_channels(self, path: Path) -> int:
        """Channels the stored images have, 1 (grey) or 3 (colour), from the first one."""

    def check_split(self, path: Path, split: str) -> None:
        if split not in self.splits:
            raise DatasetFormatError(
                f"{path}: a {self.name} dataset has no {split!r} split; it has "
                f"{', '.join(self.splits)}"
            )


def csv_columns(labels_path: Path) -> set[str]:
    """The header of a labels file, or no columns when it cannot be read."""
    try:
        with labels_path.open(newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return set()
    return {column.strip() for column in header}


def read_listed_file(root: Path, relative: str, max_voxels: int) -> ImageArray:
    """An image a dataset's listing names, relative to its folder (``#N`` choosing one
    volume of a 4D file); a name leading out of the folder is refused."""
    folder = root.resolve()
    file, _ = split_volume(folder / relative)
    if not file.resolve().is_relative_to(folder):
        raise DatasetFormatError(f"{root}: {relative} does not lie in the dataset's folder")
    check_volume_size(folder / relative, max_voxels)
    return read_image(folder / relative)
