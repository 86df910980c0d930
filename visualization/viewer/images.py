"""The images of a registered dataset as the viewer sees them: one numbered list.

The list is built from the data on this server: the dataset's `path` (sites from the site
column of labels.csv, or "all" without one) or, when the server holds no copy, each site
path that lies under FEDLENS_DATASET_ROOTS (one site each). A request only ever gives an
index into this list; no path it names is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from training.api.serializers import is_within_dataset_roots
from training.federation import open_dataset_at
from training.fl.data import (
    ClassificationDataset,
    DatasetFormatError,
    ImageArray,
    ImageFolderDataset,
    ImageReadError,
    read_image,
)
from training.fl.data.readers import image_shape
from training.models import Dataset
from visualization.viewer.cache import ProcessCache

ALL_SITES = "all"
# Rows of labels.csv whose site cell is empty.
NO_SITE = "(no site)"
# The viewer browses the split that training reads (see training.federation.open_dataset_at).
SPLIT = "train"


class DataUnavailable(Exception):
    """The dataset's data cannot be read on this server; the message says why."""


@dataclass(frozen=True)
class ImageRecord:
    index: int
    site: str
    label: int
    source: str  # the dataset folder or .npz file holding the image
    position: int  # the image's index within `source`
    file: Path | None  # folder datasets: the image file, or its DICOM series folder
    relative_path: str  # what users see: the file within its folder, or the .npz entry


@dataclass(frozen=True)
class Catalog:
    records: tuple[ImageRecord, ...]
    sites: tuple[str, ...]
    # Sites whose data this server cannot read, with the reason.
    unavailable_sites: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> ImageRecord | None:
        return self.records[index] if 0 <= index < len(self.records) else None

    def filtered(self, *, site: str | None = None, label: int | None = None) -> list[ImageRecord]:
        return [
            record
            for record in self.records
            if (site is None or record.site == site) and (label is None or record.label == label)
        ]

    def site_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.sites, 0)
        for record in self.records:
            counts[record.site] += 1
        return counts


def class_names_of(dataset: Dataset) -> list[str]:
    """One name per class label, falling back to "class <n>" where the ledger has none."""
    names = list(dataset.class_names or [])
    if len(names) != dataset.num_classes:
        names = [f"class {label}" for label in range(dataset.num_classes)]
    return names


def class_name(dataset: Dataset, label: int) -> str:
    names = class_names_of(dataset)
    return names[label] if 0 <= label < len(names) else f"class {label}"


def _checked_source(path: str) -> str:
    resolved = Path(path).resolve()
    if not is_within_dataset_roots(resolved):
        raise DataUnavailable(
            f"The data at {path} lies outside FEDLENS_DATASET_ROOTS; the viewer reads only "
            "data under those folders."
        )
    if not resolved.exists():
        raise DataUnavailable(f"Nothing exists at {path} on this server.")
    return str(resolved)


def _open(dataset: Dataset, source: str) -> ClassificationDataset:
    try:
        return open_dataset_at(dataset, source, SPLIT)
    except (DatasetFormatError, ImageReadError, OSError, ValueError) as error:
        raise DataUnavailable(f"The data at {source} cannot be read: {error}") from None


def _records_of(
    dataset: Dataset, source: str, first_index: int, site: str | None
) -> list[ImageRecord]:
    """The images of one source; `site` overrides its site column when given."""
    data = _open(dataset, source)
    folder = data.root.resolve() if isinstance(data, ImageFolderDataset) else None
    records = []
    for position, label in enumerate(data.labels.tolist()):
        if isinstance(data, ImageFolderDataset) and folder is not None:
            file: Path | None = data.paths[position]
            shown = data.paths[position].relative_to(folder).as_posix()
        else:
            file, shown = None, f"{Path(source).name} {SPLIT}[{position}]"
        records.append(
            ImageRecord(
                index=first_index + position,
                site=site or _site_column(data, position),
                label=int(label),
                source=source,
                position=position,
                file=file,
                relative_path=shown,
            )
        )
    return records


def _site_column(data: ClassificationDataset, position: int) -> str:
    if data.sites is None:
        return ALL_SITES
    return data.sites[position] or NO_SITE


def _build_catalog(dataset: Dataset) -> Catalog:
    if not dataset.path:
        raise DataUnavailable(
            "This server holds no images of this dataset: its sites keep them, and declared "
            "only their statistics."
        )
    records = _records_of(dataset, _checked_source(dataset.path), 0, None)
    return Catalog(tuple(records), tuple(sorted({record.site for record in records})))


_catalogs: ProcessCache[tuple, Catalog] = ProcessCache(maxsize=16)


def data_key(dataset: Dataset) -> tuple:
    """What the dataset's images depend on; caches of derived results are keyed by it."""
    return (
        dataset.pk,
        dataset.storage_format,
        dataset.path,
        tuple(dataset.image_shape or ()),
        dataset.channels,
    )


def catalog_for(dataset: Dataset) -> Catalog:
    """The dataset's images; raises `DataUnavailable` when this server cannot read them."""
    return _catalogs.get_or_compute(data_key(dataset), lambda: _build_catalog(dataset))


_npz_arrays: ProcessCache[str, npt.NDArray[np.generic]] = ProcessCache(maxsize=2)


def _npz_images(source: str) -> npt.NDArray[np.generic]:
    def load() -> npt.NDArray[np.generic]:
        with np.load(source, allow_pickle=False) as archive:
            return archive[f"{SPLIT}_images"]

    return _npz_arrays.get_or_compute(source, load)


def _npz_image(dataset: Dataset, record: ImageRecord) -> ImageArray:
    pixels = np.asarray(_npz_images(record.source)[record.position], dtype=np.float32)
    # Like NpzDataset: a trailing axis of 3 is colour, otherwise 3 axes make a volume.
    dims = 2 if pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3) else 3
    spacing = [float(step) for step in (dataset.spacing or [])]
    # The ledger keeps spacing in array order; SimpleITK geometry is x, y(, z).
    geometry = tuple(reversed(spacing)) if len(spacing) == dims else (1.0,) * dims
    return ImageArray(
        array=pixels,
        spacing=geometry,
        origin=(0.0,) * dims,
        direction=tuple(np.eye(dims).ravel().tolist()),
    )


def read_raw_image(dataset: Dataset, record: ImageRecord) -> ImageArray:
    """The image's stored intensities (not the normalised training tensor)."""
    if record.file is None:
        return _npz_image(dataset, record)
    try:
        return read_image(record.file)
    except ImageReadError as error:
        raise DataUnavailable(str(error)) from None


def training_sample(dataset: Dataset, record: ImageRecord) -> tuple[torch.Tensor, int]:
    """The image exactly as training feeds it to the network, with its label.

    Folder images go through the training dataset's own preprocessor, but without its
    tensor cache: in a web process that cache would grow with every image looked at.
    """
    data = _open(dataset, record.source)
    try:
        if isinstance(data, ImageFolderDataset):
            tensor = data.preprocessor(read_image(data.paths[record.position]))
            return tensor, int(data.labels[record.position])
        return data[record.position]
    except (ImageReadError, RuntimeError, ValueError) as error:
        raise DataUnavailable(f"{record.relative_path} cannot be preprocessed: {error}") from None


@lru_cache(maxsize=16384)
def _file_shape(path: str) -> tuple[int, ...] | None:
    """Array-order shape from the file's header alone, by the rules read_image reads it
    with (a 4D file's chosen volume; a single DICOM slice as 2D), or None when read_image
    would refuse the file."""
    try:
        return image_shape(path)
    except ImageReadError:
        return None


def stored_shape(record: ImageRecord) -> list[int] | None:
    """The image's shape in array order ((slices,) rows, columns), read cheaply."""
    if record.file is None:
        pixels = _npz_images(record.source)[record.position]
        colour = pixels.ndim == 3 and pixels.shape[-1] == 3
        return [int(n) for n in (pixels.shape[:2] if colour else pixels.shape)]
    shape = _file_shape(str(record.file))
    return list(shape) if shape is not None else None
