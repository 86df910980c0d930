"""The dataset formats FedLens reads, one module each; adding a format is adding a module
and a line here (and its value in training.models.StorageFormat)."""

from __future__ import annotations

from pathlib import Path

from training.fl.data.errors import DatasetFormatError
from training.fl.data.formats.base import DatasetDescription, DatasetFormat, ImageEntry
from training.fl.data.formats.folder import ImageFolderFormat
from training.fl.data.formats.maskfolder import MaskFolderFormat
from training.fl.data.formats.msd import DecathlonFormat
from training.fl.data.formats.npz import NpzFormat

__all__ = [
    "FORMAT_NAMES",
    "DatasetDescription",
    "DatasetFormat",
    "ImageEntry",
    "detect_format",
    "formats",
    "get_format",
]

_FORMATS: dict[str, DatasetFormat] = {
    data_format.name: data_format
    for data_format in (ImageFolderFormat(), NpzFormat(), DecathlonFormat(), MaskFolderFormat())
}
FORMAT_NAMES: tuple[str, ...] = tuple(_FORMATS)


def formats() -> list[DatasetFormat]:
    return list(_FORMATS.values())


def _listing() -> str:
    return "; ".join(data_format.summary for data_format in _FORMATS.values())


def get_format(name: str) -> DatasetFormat:
    try:
        return _FORMATS[name]
    except KeyError:
        raise DatasetFormatError(
            f"unknown dataset format {name!r}; expected one of {', '.join(FORMAT_NAMES)}"
        ) from None


def detect_format(path: str | Path) -> DatasetFormat:
    """The one format whose layout ``path`` has (reading no pixels)."""
    path = Path(path)
    found = [data_format for data_format in _FORMATS.values() if data_format.detect(path)]
    if len(found) == 1:
        return found[0]
    if found:
        raise DatasetFormatError(
            f"{path}: looks like several formats ({', '.join(f.name for f in found)}); "
            "name the format"
        )
    raise DatasetFormatError(
        f"{path}: expected a folder containing labels.csv, a .npz file or a Decathlon "
        f"folder; the formats: {_listing()}"
    )
