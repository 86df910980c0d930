"""Reading and writing medical images with SimpleITK.

Each extension is read with its own SimpleITK ImageIO, so a file is never silently
decoded as some other format. Geometry follows SimpleITK: ``spacing`` and ``origin`` are in
physical axis order (x, y[, z]) while the array axes are reversed ((z,) y, x).
"""

# SimpleITK annotates its procedural functions but not its classes (readers, writers,
# filters), which strict mypy would report at every call.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "ImageArray",
    "ImageReadError",
    "image_from_sitk",
    "image_to_sitk",
    "read_image",
    "write_dicom_series",
    "write_image",
]

_IMAGE_IO = {
    ".nii": "NiftiImageIO",
    ".nii.gz": "NiftiImageIO",
    ".mha": "MetaImageIO",
    ".mhd": "MetaImageIO",
    ".nrrd": "NrrdImageIO",
    ".dcm": "GDCMImageIO",
    ".png": "PNGImageIO",
}
SUPPORTED_EXTENSIONS: tuple[str, ...] = tuple(_IMAGE_IO)

_INTEGER_DTYPES = ("uint8", "uint16", "int16")
_WRITE_DTYPES = ("float32", "float64", *_INTEGER_DTYPES)


class ImageReadError(ValueError):
    """An image file is missing, corrupt, or of an unsupported format."""


@dataclass(frozen=True, kw_only=True)
class ImageArray:
    """Pixels plus the geometry needed to place them in physical space.

    ``array`` is float32 shaped like the spatial axes ((z,) y, x), with a trailing axis
    for multi-component pixels such as RGB. ``direction`` is the row-major direction
    cosine matrix, flattened.
    """

    array: npt.NDArray[np.float32]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        dims = len(self.spacing)
        if dims not in (2, 3):
            raise ValueError(f"images must be 2D or 3D, got {dims} spacing values")
        if len(self.origin) != dims or len(self.direction) != dims * dims:
            raise ValueError("origin and direction must match the number of spatial dimensions")
        if self.array.ndim not in (dims, dims + 1):
            raise ValueError(f"array of shape {self.array.shape} does not fit a {dims}D image")

    @property
    def spatial_dims(self) -> int:
        return len(self.spacing)

    @property
    def channels(self) -> int:
        """Components per pixel: 1 for scalar images, 3 or 4 for RGB(A)."""
        return 1 if self.array.ndim == self.spatial_dims else int(self.array.shape[-1])


def _extension_of(path: Path) -> str:
    """Lower-cased extension, treating ``.nii.gz`` as one extension."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def image_from_sitk(image: sitk.Image) -> ImageArray:
    return ImageArray(
        array=sitk.GetArrayFromImage(image).astype(np.float32, copy=False),
        spacing=tuple(image.GetSpacing()),
        origin=tuple(image.GetOrigin()),
        direction=tuple(image.GetDirection()),
    )


def image_to_sitk(image: ImageArray, *, dtype: str = "float32") -> sitk.Image:
    pixels = image.array.astype(dtype, copy=False)
    result = sitk.GetImageFromArray(pixels, isVector=pixels.ndim > image.spatial_dims)
    result.SetSpacing(image.spacing)
    result.SetOrigin(image.origin)
    result.SetDirection(image.direction)
    return result


def _squeeze_single_slice(image: sitk.Image) -> sitk.Image:
    """Return a one-slice DICOM volume as 2D, dropping its out-of-plane position.

    The in-plane orientation survives only when the slice is axial; otherwise it cannot
    be expressed as a 2x2 matrix and the 2D image gets the identity direction.
    """
    if image.GetDimension() != 3 or image.GetSize()[2] != 1:
        return image
    direction3 = np.asarray(image.GetDirection()).reshape(3, 3)
    in_plane = direction3[:2, :2]
    slice_2d: sitk.Image = image[:, :, 0]
    if np.allclose(in_plane @ in_plane.T, np.eye(2), atol=1e-6):
        slice_2d.SetDirection(tuple(in_plane.ravel()))
    else:
        slice_2d.SetDirection((1.0, 0.0, 0.0, 1.0))
    return slice_2d


def _read_dicom_series(directory: Path) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory))
    if not series_ids:
        raise ImageReadError(f"{directory}: no DICOM series found in this folder")
    if len(series_ids) > 1:
        raise ImageReadError(
            f"{directory}: folder holds {len(series_ids)} DICOM series; expected exactly one"
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory)))
    return _squeeze_single_slice(reader.Execute())


def read_image(path: str | os.PathLike[str]) -> ImageArray:
    """Read one image file, or a folder holding a single DICOM series.

    Raises :class:`ImageReadError` naming the file when it is missing, unsupported or corrupt.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            return image_from_sitk(_read_dicom_series(path))
        extension = _extension_of(path)
        if extension not in _IMAGE_IO:
            raise ImageReadError(
                f"{path}: unsupported extension {extension or '(none)'!r}; supported: "
                f"{', '.join(SUPPORTED_EXTENSIONS)} or a DICOM series folder"
            )
        image = sitk.ReadImage(str(path), imageIO=_IMAGE_IO[extension])
        if extension == ".dcm":
            image = _squeeze_single_slice(image)
        if image.GetDimension() not in (2, 3):
            raise ImageReadError(
                f"{path}: only 2D and 3D images are supported, this one is {image.GetDimension()}D"
            )
        return image_from_sitk(image)
    except RuntimeError as error:
        # SimpleITK reports every decoding failure as RuntimeError with a C++ trace;
        # its last line is the readable reason.
        reason = str(error).strip().splitlines()[-1]
        raise ImageReadError(f"{path}: cannot read image: {reason}") from error


def _integer_pixels(image: ImageArray, dtype: str, path: Path) -> ImageArray:
    info = np.iinfo(dtype)
    rounded = np.rint(image.array)
    if rounded.size and (rounded.min() < info.min or rounded.max() > info.max):
        raise ValueError(
            f"{path}: values in [{image.array.min()}, {image.array.max()}] do not fit {dtype}"
        )
    return ImageArray(
        array=rounded.astype(np.float32),
        spacing=image.spacing,
        origin=image.origin,
        direction=image.direction,
    )


def _default_dtype(image: ImageArray, extension: str) -> str:
    if extension == ".png":
        return "uint8" if image.array.size == 0 or image.array.max() <= 255 else "uint16"
    if extension == ".dcm":
        return "int16"
    return "float32"


def write_image(
    image: ImageArray, path: str | os.PathLike[str], *, dtype: str | None = None
) -> Path:
    """Write ``image`` in the format its extension names.

    ``dtype`` defaults to float32, except PNG (uint8, or uint16 above 255) and DICOM
    (int16), which store integers: values are rounded and must fit that type.
    """
    path = Path(path)
    extension = _extension_of(path)
    if extension not in _IMAGE_IO:
        raise ValueError(
            f"{path}: unsupported extension {extension or '(none)'!r}; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if extension == ".png" and image.spatial_dims != 2:
        raise ValueError(f"{path}: PNG holds 2D images only")
    dtype = dtype or _default_dtype(image, extension)
    if dtype not in _WRITE_DTYPES:
        raise ValueError(f"dtype must be one of {_WRITE_DTYPES}, got {dtype!r}")
    if dtype in _INTEGER_DTYPES:
        image = _integer_pixels(image, dtype, path)
    elif extension in (".png", ".dcm"):
        raise ValueError(
            f"{path}: {extension} stores integers; dtype must be one of "
            f"{_INTEGER_DTYPES}, got {dtype!r}"
        )
    if extension == ".dcm":
        if image.spatial_dims != 2 or image.channels != 1:
            raise ValueError(
                f"{path}: a single DICOM file holds a scalar 2D image; "
                "use write_dicom_series for volumes"
            )
        _write_dicom_slices(_single_slice_volume(image, dtype), [path])
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image_to_sitk(image, dtype=dtype), str(path), useCompression=True)
    return path


def _dicom_uid() -> str:
    # The 2.25 root turns a random UUID into a valid, globally unique DICOM UID.
    return f"2.25.{uuid.uuid4().int}"


def _write_dicom_slices(volume: sitk.Image, paths: list[Path]) -> None:
    """Write slice k of a 3D image to ``paths[k]``, all in one series.

    SimpleITK's default DICOM objects (secondary capture) carry no patient position or
    orientation, so those tags are set per slice; UIDs are kept as set here.
    """
    direction = np.asarray(volume.GetDirection()).reshape(3, 3)
    # ImageOrientationPatient: the row (x) and column (y) direction cosines.
    orientation = "\\".join(f"{v:.10g}" for v in (*direction[:, 0], *direction[:, 1]))
    study_uid, series_uid = _dicom_uid(), _dicom_uid()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for index, path in enumerate(paths):
        slice_image = volume[:, :, index]
        position = volume.TransformIndexToPhysicalPoint((0, 0, index))
        tags = {
            "0008|0060": "OT",  # Modality: other
            "0008|0018": _dicom_uid(),  # SOP instance UID
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0013": str(index + 1),  # Instance number
            "0020|0032": "\\".join(f"{v:.10g}" for v in position),
            "0020|0037": orientation,
            "0018|0050": f"{volume.GetSpacing()[2]:.10g}",  # Slice thickness
        }
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer.SetFileName(str(path))
        writer.Execute(slice_image)


def _single_slice_volume(image: ImageArray, dtype: str) -> sitk.Image:
    """A 2D image as a one-slice 3D volume, so DICOM keeps its origin and direction."""
    direction = np.eye(3)
    direction[:2, :2] = np.asarray(image.direction).reshape(2, 2)
    volume = ImageArray(
        array=image.array[np.newaxis],
        spacing=(*image.spacing, 1.0),
        origin=(*image.origin, 0.0),
        direction=tuple(direction.ravel()),
    )
    return image_to_sitk(volume, dtype=dtype)


def write_dicom_series(
    image: ImageArray, directory: str | os.PathLike[str], *, dtype: str = "int16"
) -> list[Path]:
    """Write a 3D image as one DICOM file per slice, with the tags a series reader needs.

    Values are rounded to ``dtype`` and must fit it.
    """
    directory = Path(directory)
    if image.spatial_dims != 3 or image.channels != 1:
        raise ValueError(f"{directory}: a DICOM series needs a scalar 3D image")
    if dtype not in _INTEGER_DTYPES:
        raise ValueError(f"dtype must be one of {_INTEGER_DTYPES}, got {dtype!r}")
    volume = image_to_sitk(_integer_pixels(image, dtype, directory), dtype=dtype)
    paths = [directory / f"slice-{index + 1:04d}.dcm" for index in range(volume.GetDepth())]
    _write_dicom_slices(volume, paths)
    return paths
