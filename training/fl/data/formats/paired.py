"""What the segmentation formats share: images paired with masks, listed by the format."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.fl.data.cache import DecodedCache
from training.fl.data.errors import DEFAULT_MAX_VOLUME_VOXELS, DatasetFormatError
from training.fl.data.formats.base import (
    SEGMENTATION,
    DatasetDescription,
    DatasetFormat,
    ImageEntry,
    read_listed_file,
)
from training.fl.data.headers import check_volume_size
from training.fl.data.preprocess import Preprocessor
from training.fl.data.readers import ImageArray, read_image

if TYPE_CHECKING:
    from training.fl.data.segmentation import SegmentationDataset

__all__ = ["BACKGROUND", "PairListing", "PairedFormat", "default_class_names"]

BACKGROUND = "background"


def default_class_names(num_classes: int) -> list[str]:
    return [BACKGROUND, *(f"class {label}" for label in range(1, num_classes))]


@dataclass(frozen=True)
class PairListing:
    """A split's images and masks, relative to the dataset's folder, and their sites."""

    images: list[str]
    masks: list[str]
    sites: list[str] | None


class PairedFormat(DatasetFormat):
    """A segmentation format: subclasses list the pairs and the classes they declare."""

    task = SEGMENTATION

    @abstractmethod
    def listing(self, path: Path, split: str) -> PairListing:
        """The pairs of a split, checked to exist and to lie in the folder."""

    def declared_class_names(self, path: Path) -> list[str] | None:
        """The classes the data declares itself, label 0 first; None when it declares none."""
        return None

    def open(
        self,
        path: Path,
        *,
        split: str = "train",
        preprocessor: Preprocessor | None = None,
        class_names: Sequence[str] | None = None,
        max_voxels: int = DEFAULT_MAX_VOLUME_VOXELS,
        decoded_cache: DecodedCache | None = None,
    ) -> SegmentationDataset:
        from training.fl.data.segmentation import SegmentationDataset

        self.check_split(path, split)
        listing = self.listing(path, split)
        folder = path.resolve()
        masks = [folder / mask for mask in listing.masks]
        names = list(class_names or []) or self.declared_class_names(path)
        if not names:
            names = default_class_names(_classes_in_masks(masks, max_voxels))
        return SegmentationDataset(
            source=path,
            storage_format=self.name,
            images=[folder / image for image in listing.images],
            masks=masks,
            class_names=names,
            sites=listing.sites,
            preprocessor=preprocessor,
            max_voxels=max_voxels,
            decoded_cache=decoded_cache,
        )

    def describe(
        self,
        path: Path,
        *,
        class_names: Sequence[str] | None = None,
        max_voxels: int = DEFAULT_MAX_VOLUME_VOXELS,
    ) -> DatasetDescription:
        """Every mask is read and checked against its image, so that what training would
        refuse is refused at registration, naming the file."""
        data = self.open(
            path,
            preprocessor=Preprocessor(normalization="none"),
            class_names=class_names,
            max_voxels=max_voxels,
        )
        data.labels  # noqa: B018 -- reads and checks every mask
        image, _ = data.raw_sample(0)
        tensor = data.preprocessor(image)
        return DatasetDescription(
            storage_format=self.name,
            task=self.task,
            num_samples=len(data),
            num_classes=data.num_classes,
            class_names=data.class_names,
            channels=int(tensor.shape[0]),
            image_shape=list(tensor.shape[1:]),
            # SimpleITK gives spacing as x, y(, z); the ledger keeps (depth,) height, width.
            spacing=[float(f"{step:.6g}") for step in reversed(image.spacing)],
        )

    def entries(self, path: Path, *, split: str = "train") -> list[ImageEntry]:
        self.check_split(path, split)
        listing = self.listing(path, split)
        return [
            ImageEntry(
                image=image,
                mask=mask,
                label=None,
                site=listing.sites[position] if listing.sites is not None else None,
                position=position,
            )
            for position, (image, mask) in enumerate(
                zip(listing.images, listing.masks, strict=True)
            )
        ]

    def read_entry(
        self, path: Path, entry: ImageEntry, *, max_voxels: int = DEFAULT_MAX_VOLUME_VOXELS
    ) -> tuple[ImageArray, ImageArray | None]:
        image = read_listed_file(path, entry.image, max_voxels)
        mask = read_listed_file(path, entry.mask, max_voxels) if entry.mask else None
        return image, mask

    def native_channels(self, path: Path) -> int:
        first = path.resolve() / self.listing(path, "train").images[0]
        return 1 if read_image(first).channels in (1, 2) else 3


def _classes_in_masks(masks: Sequence[Path], max_voxels: int) -> int:
    """Classes the masks hold when nothing declares them: the largest label + 1, at least 2."""
    largest = 0
    for mask_path in masks:
        check_volume_size(mask_path, max_voxels)
        values = read_image(mask_path).array
        if values.size:
            if values.min() < 0 or not np.array_equal(values, np.rint(values)):
                raise DatasetFormatError(
                    f"{mask_path}: a mask holds class labels 0, 1, 2, ...; this one holds "
                    "negative or non-integer values"
                )
            largest = max(largest, int(values.max()))
    return max(largest + 1, 2)
