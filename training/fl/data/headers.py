"""An image's size and spacing from its header alone, and the size limit on images read."""

# SimpleITK annotates its procedural functions but not its classes.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
from dataclasses import dataclass

import SimpleITK as sitk

from training.fl.data.errors import DatasetFormatError
from training.fl.data.readers import split_volume

__all__ = ["ImageHeader", "check_volume_size", "read_header"]


@dataclass(frozen=True)
class ImageHeader:
    size: tuple[int, ...]  # x, y[, z], like SimpleITK
    spacing: tuple[float, ...]
    components: int

    @property
    def voxels(self) -> int:
        total = self.components
        for extent in self.size:
            total *= extent
        return total


def read_header(path: str | os.PathLike[str]) -> ImageHeader | None:
    """The header of an image file or DICOM series folder; None when it cannot be read
    (reading the image then says why)."""
    path, volume = split_volume(path)
    reader = sitk.ImageFileReader()
    try:
        if path.is_dir():
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path))
            if not files:
                return None
            reader.SetFileName(files[0])
            reader.ReadImageInformation()
            size = (*reader.GetSize()[:2], len(files))
        else:
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            size = tuple(reader.GetSize())
            if volume is not None:  # one volume of a 4D file is read
                size = size[:3]
    except RuntimeError:
        return None
    return ImageHeader(
        size=tuple(int(n) for n in size),
        spacing=tuple(float(step) for step in reader.GetSpacing()),
        components=int(reader.GetNumberOfComponents()),
    )


def check_volume_size(path: str | os.PathLike[str], max_voxels: int) -> None:
    """Refuse, before reading its pixels, an image larger than ``max_voxels``."""
    header = read_header(path)
    if header is not None and header.voxels > max_voxels:
        raise DatasetFormatError(
            f"{path}: the image has {header.voxels:,} voxels, more than the {max_voxels:,} "
            "allowed in memory (the server's FEDLENS_MAX_VOLUME_VOXELS); crop or downsample "
            "it, or raise the limit"
        )
