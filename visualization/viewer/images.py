"""The images of a registered dataset as the viewer sees them: one numbered list.

The list is built from the data on this server: the dataset's `path` (sites from the site
column of labels.csv, or "all" without one) or, when the server holds no copy, each site
path that lies under FEDLENS_DATASET_ROOTS (one site each). A request only ever gives an
index into this list; no path it names is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings

from training.api.serializers import is_within_dataset_roots
from training.fl.data import DatasetFormatError, ImageArray, ImageReadError
from training.fl.data.formats import DatasetFormat, ImageEntry, detect_format, get_format
from training.fl.data.readers import image_shape
from training.models import Dataset
from visualization.viewer.cache import ProcessCache

if TYPE_CHECKING:
    import torch

    from training.fl.data import ClassificationDataset

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
    file: Path | None  # image files: the file, or its DICOM series folder; None in arrays
    relative_path: str  # what users see: the file within its folder, or the .npz entry
    entry: ImageEntry  # how the dataset's format finds the image (and its mask) again
    storage_format: str  # that format's name
    mask_file: Path | None = None  # segmentation: the image's label mask


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


def format_of(dataset: Dataset, source: str) -> DatasetFormat:
    try:
        if dataset.storage_format:
            return get_format(dataset.storage_format)
        return detect_format(source)
    except DatasetFormatError as error:
        raise DataUnavailable(f"The data at {source} cannot be read: {error}") from None


def _open(dataset: Dataset, source: str) -> ClassificationDataset:
    # Training's datasets load PyTorch: imported when the viewer first opens one.
    from training.federation import open_dataset_at

    try:
        return open_dataset_at(dataset, source, SPLIT)
    except (DatasetFormatError, ImageReadError, OSError, ValueError) as error:
        raise DataUnavailable(f"The data at {source} cannot be read: {error}") from None


def _records_of(
    dataset: Dataset, source: str, first_index: int, site: str | None
) -> list[ImageRecord]:
    """The images of one source; `site` overrides its site column when given. A
    segmentation image's label is its mask's most frequent foreground class."""
    data_format = format_of(dataset, source)
    try:
        entries = data_format.entries(Path(source), split=SPLIT)
    except (DatasetFormatError, ImageReadError, OSError, ValueError) as error:
        raise DataUnavailable(f"The data at {source} cannot be read: {error}") from None
    if any(entry.label is None for entry in entries):
        data = _open(dataset, source)
        try:
            labels = data.labels.tolist()
        except (DatasetFormatError, ImageReadError, OSError) as error:
            raise DataUnavailable(f"The data at {source} cannot be read: {error}") from None
    else:
        labels = [entry.label for entry in entries]
    # Formats that store files (not rows of an array) name each image's file.
    folder = Path(source) if data_format.stores_geometry else None
    return [
        ImageRecord(
            index=first_index + entry.position,
            site=site or _site_of(entry),
            label=int(label),
            source=source,
            position=entry.position,
            file=folder / entry.image if folder else None,
            relative_path=entry.image,
            entry=entry,
            storage_format=data_format.name,
            mask_file=folder / entry.mask if folder and entry.mask else None,
        )
        for entry, label in zip(entries, labels, strict=True)
    ]


def _site_of(entry: ImageEntry) -> str:
    if entry.site is None:
        return ALL_SITES
    return entry.site or NO_SITE


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


def read_raw_pair(dataset: Dataset, record: ImageRecord) -> tuple[ImageArray, ImageArray | None]:
    """The image's stored intensities (not the normalised training tensor) and its label
    mask (None without one), each with its geometry."""
    data_format = format_of(dataset, record.source)
    try:
        image, mask = data_format.read_entry(
            Path(record.source), record.entry, max_voxels=settings.FEDLENS_MAX_VOLUME_VOXELS
        )
    except (DatasetFormatError, ImageReadError, OSError) as error:
        raise DataUnavailable(str(error)) from None
    spacing = [float(step) for step in (dataset.spacing or [])]
    if not data_format.stores_geometry and len(spacing) == image.spatial_dims:
        # An array stores no spacing: the ledger's, kept in array order (SimpleITK: x, y(, z)).
        image = replace(image, spacing=tuple(reversed(spacing)))
    return image, mask


def read_raw_image(dataset: Dataset, record: ImageRecord) -> ImageArray:
    """The image's stored intensities (not the normalised training tensor)."""
    return read_raw_pair(dataset, record)[0]


def training_sample(
    dataset: Dataset, record: ImageRecord
) -> tuple[torch.Tensor, int | torch.Tensor]:
    """The image exactly as training feeds it to the network, with its label (a
    segmentation dataset's: its mask on the same grid).

    Images go through the training dataset's own preprocessor, but without its tensor
    cache: in a web process that cache would grow with every image looked at.
    """
    data = _open(dataset, record.source)
    try:
        return data.read_sample(record.position)
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
    if record.file is None:  # a row of an array, which its format keeps in memory
        try:
            image, _ = get_format(record.storage_format).read_entry(
                Path(record.source), record.entry
            )
        except (DatasetFormatError, OSError, ValueError):
            return None
        return list(image.array.shape[: image.spatial_dims])
    shape = _file_shape(str(record.file))
    return list(shape) if shape is not None else None
