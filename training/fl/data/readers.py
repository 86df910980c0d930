"""Reading and writing medical images with SimpleITK.

Each extension is read with its own SimpleITK ImageIO, so a file is never silently
decoded as some other format; a file without a known extension is read as DICOM when it
carries DICOM's "DICM" marker. Geometry follows SimpleITK: ``spacing`` and ``origin`` are
in physical axis order (x, y[, z]) while the array axes are reversed ((z,) y, x).

NIfTI gets checks of its own: ITK pads a truncated NIfTI file with zeros instead of failing,
so the data its header declares must all be there (and a gzip stream must end intact);
ITK reads NIfTI-1 only, so a NIfTI-2 header is rewritten as NIfTI-1 for it; a 4D file is
read one volume at a time, chosen by a ``#N`` suffix on its path (``scan.nii.gz#3``).
"""

# SimpleITK annotates its procedural functions but not its classes (readers, writers,
# filters), which strict mypy would report at every call.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import gzip
import io
import math
import os
import re
import struct
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "ImageArray",
    "ImageReadError",
    "image_from_sitk",
    "image_shape",
    "image_to_sitk",
    "read_image",
    "split_volume",
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


# A DICOM Part 10 file: a 128-byte preamble, then this marker. Scanners and PACS exports
# often name files by number or UID (IM0001, 1.2.840...), with no ".dcm".
_DICOM_MARKER_OFFSET = 128
_DICOM_MARKER = b"DICM"


def _is_dicom_file(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            handle.seek(_DICOM_MARKER_OFFSET)
            return handle.read(len(_DICOM_MARKER)) == _DICOM_MARKER
    except OSError:
        return False


def _image_io_of(path: Path) -> str:
    """The SimpleITK ImageIO that reads the file, by extension, else by the DICOM marker."""
    extension = _extension_of(path)
    if extension in _IMAGE_IO:
        return _IMAGE_IO[extension]
    if _is_dicom_file(path):
        return "GDCMImageIO"
    raise ImageReadError(
        f"{path}: unsupported extension {extension or '(none)'!r}; supported: "
        f"{', '.join(SUPPORTED_EXTENSIONS)}, a DICOM file (by content, any name) or a DICOM "
        "series folder"
    )


# "scan.nii.gz#3": volume 3 (from 0) of a 4D file.
_VOLUME_SUFFIX = re.compile(r"#(\d+)$")


def split_volume(path: str | os.PathLike[str]) -> tuple[Path, int | None]:
    """A reference such as ``scan.nii.gz#3`` as the file and the volume it chooses (None
    when it chooses none). A file whose own name ends in ``#N`` is taken as it is."""
    text = os.fspath(path)
    match = _VOLUME_SUFFIX.search(text)
    if match is None or Path(text).exists():
        return Path(text), None
    return Path(text[: match.start()]), int(match.group(1))


# --- NIfTI headers ---------------------------------------------------------------------------

_NIFTI1_HEADER_BYTES = 348
_NIFTI2_HEADER_BYTES = 540
_NIFTI2_MAGIC = b"n+2\x00\r\n\x1a\n"
_GZIP_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class _NiftiHeader:
    version: int  # 1 or 2
    byte_order: str  # struct's "<" or ">"
    dims: tuple[int, ...]  # dim[1] .. dim[dim[0]]
    bitpix: int
    vox_offset: int
    raw: bytes

    @property
    def data_end(self) -> int:
        """Where the voxel data that the header declares ends, in the uncompressed file."""
        return self.vox_offset + math.prod(self.dims) * self.bitpix // 8


def _open_nifti(path: Path) -> gzip.GzipFile | io.BufferedReader:
    """The file's uncompressed bytes, whether it is a .nii or a .nii.gz."""
    if _extension_of(path) == ".nii.gz":
        return gzip.GzipFile(path, "rb")
    return path.open("rb")


def _read_nifti_header(path: Path) -> _NiftiHeader:
    try:
        with _open_nifti(path) as handle:
            raw = handle.read(_NIFTI2_HEADER_BYTES)
    except (OSError, EOFError, zlib.error) as error:
        raise ImageReadError(f"{path}: cannot read the NIfTI header: {error}") from None
    for order in "<>":
        if len(raw) >= 4 and struct.unpack(f"{order}i", raw[:4])[0] == _NIFTI1_HEADER_BYTES:
            if len(raw) < _NIFTI1_HEADER_BYTES:
                break
            dim = struct.unpack(f"{order}8h", raw[40:56])
            bitpix = struct.unpack(f"{order}h", raw[72:74])[0]
            vox_offset = int(struct.unpack(f"{order}f", raw[108:112])[0])
            return _nifti_header(path, 1, order, dim, bitpix, vox_offset, raw)
        if len(raw) >= 4 and struct.unpack(f"{order}i", raw[:4])[0] == _NIFTI2_HEADER_BYTES:
            if len(raw) < _NIFTI2_HEADER_BYTES or raw[4:12] != _NIFTI2_MAGIC:
                break
            bitpix = struct.unpack(f"{order}h", raw[14:16])[0]
            dim = struct.unpack(f"{order}8q", raw[16:80])
            vox_offset = struct.unpack(f"{order}q", raw[168:176])[0]
            return _nifti_header(path, 2, order, dim, bitpix, vox_offset, raw)
    raise ImageReadError(f"{path}: not a NIfTI file (its header is neither NIfTI-1 nor NIfTI-2)")


def _nifti_header(
    path: Path,
    version: int,
    order: str,
    dim: tuple[int, ...],
    bitpix: int,
    vox_offset: int,
    raw: bytes,
) -> _NiftiHeader:
    rank = dim[0]
    if not 1 <= rank <= 7 or any(n < 1 for n in dim[1 : rank + 1]) or bitpix <= 0:
        raise ImageReadError(f"{path}: the NIfTI header's dimensions or bitpix are invalid")
    return _NiftiHeader(version, order, tuple(dim[1 : rank + 1]), bitpix, vox_offset, raw)


def _check_nifti_complete(path: Path, header: _NiftiHeader, *, full: bool) -> None:
    """Refuse a file that ends before the data its header declares. A .nii's size says it;
    a .nii.gz is decompressed (``full``), which also checks the gzip CRC, or else only its
    trailer is compared (the uncompressed size modulo 2**32, cheap)."""
    expected = header.data_end
    if _extension_of(path) != ".nii.gz":
        actual = path.stat().st_size
    elif full:
        actual = 0
        try:
            with gzip.open(path, "rb") as handle:
                while chunk := handle.read(_GZIP_CHUNK_BYTES):
                    actual += len(chunk)
        except (OSError, EOFError, zlib.error) as error:
            raise ImageReadError(
                f"{path}: the compressed data is truncated or corrupt ({error}); after "
                f"{actual} of the {expected} bytes its header declares"
            ) from None
    else:
        with path.open("rb") as handle:
            handle.seek(-4, os.SEEK_END)
            actual = struct.unpack("<I", handle.read(4))[0]
        if actual != expected % 2**32:
            raise ImageReadError(
                f"{path}: the compressed file is truncated or corrupt (its gzip trailer does "
                f"not give the {expected} bytes its header declares)"
            )
        return
    if actual < expected:
        raise ImageReadError(
            f"{path}: truncated: holds {actual} of the {expected} bytes its NIfTI header declares"
        )


def _nifti2_as_nifti1(header: _NiftiHeader, path: Path) -> bytes:
    """The NIfTI-1 header of the same image, for ITK, which reads NIfTI-1 only. Its data
    follows at offset 352, as in a single-file NIfTI-1 without extensions."""
    raw, order = header.raw, header.byte_order

    def field(fmt: str, offset: int) -> tuple[Any, ...]:
        return struct.unpack_from(f"{order}{fmt}", raw, offset)

    dim = field("8q", 16)
    if max(dim) > 32767:
        raise ImageReadError(
            f"{path}: a NIfTI-2 image with {max(dim)} voxels along an axis (NIfTI-1, which "
            "this reader goes through, holds at most 32767); split or resample it"
        )
    datatype, bitpix = field("2h", 12)
    slice_start, slice_end = field("2q", 224)
    qform_code, sform_code = field("2i", 344)
    slice_code, xyzt_units, intent_code = field("3i", 496)
    return (
        struct.pack(f"{order}i", _NIFTI1_HEADER_BYTES)
        + bytes(36)  # data_type, db_name, extents, session_error, regular, dim_info: unused
        + struct.pack(f"{order}8h", *dim)
        + struct.pack(f"{order}3f", *field("3d", 80))  # intent_p1..3
        + struct.pack(f"{order}4h", intent_code, datatype, bitpix, slice_start)
        + struct.pack(f"{order}8f", *field("8d", 104))  # pixdim
        + struct.pack(f"{order}f", 352.0)  # vox_offset
        + struct.pack(f"{order}2f", *field("2d", 176))  # scl_slope, scl_inter
        + struct.pack(f"{order}h", slice_end)
        + bytes([slice_code, xyzt_units])
        + struct.pack(f"{order}2f", *field("2d", 192))  # cal_max, cal_min
        + struct.pack(f"{order}2f", *field("2d", 208))  # slice_duration, toffset
        + bytes(8)  # glmax, glmin: unused
        + raw[240:320]  # descrip
        + raw[320:344]  # aux_file
        + struct.pack(f"{order}2h", qform_code, sform_code)
        + struct.pack(f"{order}6f", *field("6d", 352))  # quatern_b..d, qoffset_x..z
        + struct.pack(f"{order}12f", *field("12d", 400))  # srow_x, srow_y, srow_z
        + raw[508:524]  # intent_name
        + b"n+1\x00"
        + bytes(4)  # no extensions
    )


def _nifti2_as_nifti1_file(
    path: Path, header: _NiftiHeader, folder: str, *, with_data: bool
) -> Path:
    """A NIfTI-1 copy of a NIfTI-2 file in ``folder``: its header rewritten, its data as
    it is, or none (enough for reading the header)."""
    copy = Path(folder) / "image.nii"
    with _open_nifti(path) as source, copy.open("wb") as target:
        target.write(_nifti2_as_nifti1(header, path))
        if not with_data:
            return copy
        source.seek(header.vox_offset)  # past the header and its extensions
        remaining = header.data_end - header.vox_offset
        while remaining and (chunk := source.read(min(remaining, _GZIP_CHUNK_BYTES))):
            target.write(chunk)
            remaining -= len(chunk)
    return copy


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


def read_image(path: str | os.PathLike[str], *, volume: int | None = None) -> ImageArray:
    """Read one image file, or a folder holding a single DICOM series.

    A 4D file is read one volume at a time: ``volume`` (from 0), or a ``#N`` suffix on the
    path (``scan.nii.gz#3``), chooses which. Raises :class:`ImageReadError` naming the file
    when it is missing, unsupported, truncated or corrupt, or 4D without a volume chosen.
    """
    path, suffix_volume = split_volume(path)
    volume = suffix_volume if volume is None else volume
    if not path.exists():
        raise ImageReadError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            return image_from_sitk(_read_dicom_series(path))
        with _image_reader(path, verify=True) as reader:
            reader.ReadImageInformation()
            _choose_volume(reader, path, volume)
            image = reader.Execute()
        if reader.GetImageIO() == "GDCMImageIO":
            image = _squeeze_single_slice(image)
        return image_from_sitk(image)
    except RuntimeError as error:
        raise ImageReadError(f"{path}: cannot read image: {_itk_reason(error)}") from error


def image_shape(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """The array-order shape ((z,) y, x) that :func:`read_image` returns for ``path``, from
    the file's header (a ``.nii.gz`` is not decompressed: its gzip trailer is checked).
    Raises :class:`ImageReadError` for what read_image would refuse on the same grounds."""
    path, volume = split_volume(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path))
            if not files:
                raise ImageReadError(f"{path}: no DICOM series found in this folder")
            reader = sitk.ImageFileReader()
            reader.SetFileName(files[0])
            reader.ReadImageInformation()
            size = [*reader.GetSize()[:2], len(files)]
        else:
            with _image_reader(path, verify=False) as reader:
                reader.ReadImageInformation()
            size = list(_choose_volume(reader, path, volume))
            if reader.GetImageIO() != "GDCMImageIO":
                return tuple(reversed(size))
    except RuntimeError as error:
        raise ImageReadError(f"{path}: cannot read image: {_itk_reason(error)}") from error
    # A single DICOM slice is a 2D image (see _squeeze_single_slice).
    if len(size) == 3 and size[2] == 1:
        size = size[:2]
    return tuple(int(n) for n in reversed(size))


def _itk_reason(error: RuntimeError) -> str:
    """SimpleITK reports every failure as RuntimeError with a C++ trace; its ITK ERROR line
    is the readable reason (some traces end with a less telling line)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    for line in lines:
        if "ITK ERROR" in line or "ERROR:" in line:
            return line.split("): ", 1)[-1]
    return lines[-1] if lines else "unknown error"


@contextmanager
def _image_reader(path: Path, *, verify: bool) -> Iterator[sitk.ImageFileReader]:
    """A reader of ``path`` with its ImageIO chosen. A NIfTI file is checked first, and a
    NIfTI-2 file is read from a NIfTI-1 copy, which lasts as long as the context.
    ``verify``: decompress a .nii.gz completely to check it (for its pixels), where False
    checks its gzip trailer only (for its header) and copies no NIfTI-2 data."""
    image_io = _image_io_of(path)
    reader = sitk.ImageFileReader()
    reader.SetImageIO(image_io)
    reader.SetFileName(str(path))
    if image_io != "NiftiImageIO":
        yield reader
        return
    header = _read_nifti_header(path)
    _check_nifti_complete(path, header, full=verify)
    if header.version == 1:
        yield reader
        return
    with tempfile.TemporaryDirectory(prefix="fedlens-nifti2-") as scratch:
        reader.SetFileName(str(_nifti2_as_nifti1_file(path, header, scratch, with_data=verify)))
        yield reader


def _choose_volume(reader: sitk.ImageFileReader, path: Path, volume: int | None) -> tuple[int, ...]:
    """Set the reader to read ``volume`` of a 4D image; the size (x, y[, z]) it reads."""
    size = tuple(reader.GetSize())
    if len(size) in (2, 3):
        if volume is not None:
            raise ImageReadError(
                f"{path}: is {len(size)}D and has no volumes to choose; remove '#{volume}'"
            )
        return size
    if len(size) != 4:
        raise ImageReadError(
            f"{path}: only 2D, 3D and 4D images are supported, this one is {len(size)}D"
        )
    count = size[3]
    if volume is None:
        raise ImageReadError(
            f"{path}: is 4D with {count} volumes of {size[0]} x {size[1]} x {size[2]}; choose "
            f"one by adding '#N' (0 to {count - 1}) to its path in labels.csv, e.g. "
            f"'{path.name}#0'"
        )
    if not 0 <= volume < count:
        raise ImageReadError(f"{path}: has volumes 0 to {count - 1}; there is no volume {volume}")
    # Size 0 along the fourth axis drops it: the reader returns the 3D volume only.
    reader.SetExtractIndex([0, 0, 0, volume])
    reader.SetExtractSize([size[0], size[1], size[2], 0])
    return size[:3]


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
