"""An image folder for classification: images plus ``labels.csv`` (``path,label[,site]``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from training.fl.data.cache import DecodedCache
from training.fl.data.errors import DEFAULT_MAX_VOLUME_VOXELS, LABELS_FILE
from training.fl.data.formats.base import (
    CLASSIFICATION,
    DatasetDescription,
    DatasetFormat,
    ImageEntry,
    csv_columns,
    read_listed_file,
)
from training.fl.data.preprocess import Preprocessor
from training.fl.data.readers import ImageArray, read_image

if TYPE_CHECKING:
    from training.fl.data.datasets import ImageFolderDataset

__all__ = ["ImageFolderFormat"]


class ImageFolderFormat(DatasetFormat):
    """The whole folder is the "train" split; the server holds back a share to evaluate."""

    name = "folder"
    task = CLASSIFICATION
    summary = f"folder: images and {LABELS_FILE} with columns path,label[,site]"

    def detect(self, path: Path) -> bool:
        # A labels file with a mask column belongs to the mask folder format.
        labels = path / LABELS_FILE
        return path.is_dir() and labels.is_file() and "mask" not in csv_columns(labels)

    def open(
        self,
        path: Path,
        *,
        split: str = "train",
        preprocessor: Preprocessor | None = None,
        class_names: Sequence[str] | None = None,
        max_voxels: int = DEFAULT_MAX_VOLUME_VOXELS,
        decoded_cache: DecodedCache | None = None,
    ) -> ImageFolderDataset:
        from training.fl.data.datasets import ImageFolderDataset

        self.check_split(path, split)
        return ImageFolderDataset(
            path, preprocessor=preprocessor, max_voxels=max_voxels, decoded_cache=decoded_cache
        )

    def describe(
        self,
        path: Path,
        *,
        class_names: Sequence[str] | None = None,
        max_voxels: int = DEFAULT_MAX_VOLUME_VOXELS,
    ) -> DatasetDescription:
        data = self.open(path, max_voxels=max_voxels)
        image, _ = data[0]
        first = read_image(data.paths[0])
        return DatasetDescription(
            storage_format=self.name,
            task=self.task,
            num_samples=len(data),
            num_classes=data.num_classes,
            class_names=list(class_names or []),
            channels=data.in_channels,
            image_shape=list(image.shape[1:]),
            # SimpleITK gives spacing as x, y(, z); the ledger keeps (depth,) height, width.
            spacing=[float(step) for step in reversed(first.spacing)],
        )

    def entries(self, path: Path, *, split: str = "train") -> list[ImageEntry]:
        data = self.open(path, split=split)
        folder = data.root.resolve()
        return [
            ImageEntry(
                image=file.relative_to(folder).as_posix(),
                mask=None,
                label=int(label),
                site=data.sites[position] if data.sites is not None else None,
                position=position,
            )
            for position, (file, label) in enumerate(zip(data.paths, data.labels, strict=True))
        ]

    def read_entry(
        self, path: Path, entry: ImageEntry, *, max_voxels: int = DEFAULT_MAX_VOLUME_VOXELS
    ) -> tuple[ImageArray, ImageArray | None]:
        return read_listed_file(path, entry.image, max_voxels), None

    def native_channels(self, path: Path) -> int:
        from training.fl.data.datasets import ImageFolderDataset

        first = ImageFolderDataset(path, cache=False).paths[0]
        # As to_channels keeps them: grey (+ alpha) is 1 channel, RGB(A) 3.
        return 1 if read_image(first).channels in (1, 2) else 3
