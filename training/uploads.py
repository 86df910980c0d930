"""Unpacking an uploaded dataset archive (zip or tar, plain or compressed) without trusting it.

An archive is a list of names, types and sizes chosen by whoever made it. Before a byte
of a member is written it must name a plain file or folder inside the destination (no
absolute path, no "..", no link, no device), and the archive must not unpack to much
more than it weighs (a zip or gzip bomb). Every file written must then be an image by its
content, in a format FedLens reads and named with that format's extension, except the one
labels.csv. Any refusal removes everything written and names the member to fix.

No Django here: the limits come in as arguments (settings in flproject/settings/base.py).
"""

from __future__ import annotations

import codecs
import gzip
import re
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import SimpleITK as sitk

from training.fl.data.errors import LABELS_FILE
from training.fl.data.readers import SUPPORTED_EXTENSIONS

__all__ = [
    "ArchiveRefused",
    "ArchiveTooLarge",
    "UnpackLimits",
    "detect_image_format",
    "unpack_dataset_archive",
]

COPY_CHUNK_BYTES = 1024 * 1024
# Below this size a member may compress as well as it likes: a small blank image is no bomb.
RATIO_FREE_BYTES = 1024 * 1024
MAX_LABELS_FILE_BYTES = 64 * 1024 * 1024
MAX_NAME_COMPONENT_BYTES = 255
MAX_NAME_DEPTH = 32
# Left by macOS and Windows file managers; skipped rather than refused.
SKIPPED_FOLDERS = {"__MACOSX"}
SKIPPED_FILES = {".DS_Store", "Thumbs.db"}
HEADER_BYTES = 1024


class ArchiveRefused(ValueError):
    """The archive cannot be accepted; the message says which member and why."""

    def __init__(self, message: str, *, member: str | None = None) -> None:
        if member is not None:
            # tarfile decodes undecodable bytes of a name as lone surrogates; show them escaped.
            member = member.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(f"{member}: {message}" if member else message)
        self.member = member


class ArchiveTooLarge(ArchiveRefused):
    """The archive unpacks to more than the limits allow (a compression bomb, or too much)."""


@dataclass(frozen=True, kw_only=True)
class UnpackLimits:
    max_unpacked_bytes: int
    max_ratio: int
    max_files: int


@dataclass(frozen=True)
class ImageFormat:
    name: str
    extensions: tuple[str, ...]
    image_io: str


PNG = ImageFormat("PNG", (".png",), "PNGImageIO")
JPEG = ImageFormat("JPEG", (".jpg", ".jpeg"), "JPEGImageIO")
DICOM = ImageFormat("DICOM", (".dcm",), "GDCMImageIO")
NIFTI = ImageFormat("NIfTI", (".nii",), "NiftiImageIO")
NIFTI_GZ = ImageFormat("gzipped NIfTI", (".nii.gz",), "NiftiImageIO")
NRRD = ImageFormat("NRRD", (".nrrd",), "NrrdImageIO")
METAIMAGE = ImageFormat("MetaImage", (".mha", ".mhd"), "MetaImageIO")
OTHER_FORMATS_EXTENSIONS = frozenset(
    extension
    for image_format in (PNG, JPEG, NIFTI, NIFTI_GZ, NRRD, METAIMAGE)
    for extension in image_format.extensions
)
FORMAT_NAMES = "PNG, DICOM, NIfTI (.nii, .nii.gz), NRRD or MetaImage (.mha)"

METAIMAGE_FIRST_KEY = re.compile(rb"\A\s*(ObjectType|NDims)\s*=")
METAIMAGE_DATA_FILE = re.compile(rb"^\s*ElementDataFile\s*=\s*(\S+)", re.MULTILINE)
NRRD_DATA_FILE = re.compile(rb"^data ?file:", re.MULTILINE | re.IGNORECASE)


def extension_of(name: str) -> str:
    lowered = name.lower()
    return ".nii.gz" if lowered.endswith(".nii.gz") else PurePosixPath(lowered).suffix


def _is_nifti_header(header: bytes) -> bool:
    if len(header) >= 348:
        for order in "<>":
            if struct.unpack(f"{order}i", header[:4])[0] == 348 and header[344:348] in (
                b"n+1\0",
                b"ni1\0",
            ):
                return True
    if len(header) >= 540:
        for order in "<>":
            if struct.unpack(f"{order}i", header[:4])[0] == 540 and header[4:8] in (
                b"n+2\0",
                b"ni2\0",
            ):
                return True
    return False


def detect_image_format(path: Path) -> ImageFormat | None:
    """The image format of a file by its first bytes, or None when it is no image."""
    with path.open("rb") as handle:
        header = handle.read(HEADER_BYTES)
    if header.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if header.startswith(b"\xff\xd8\xff"):
        return JPEG
    if header[128:132] == b"DICM":
        return DICOM
    if _is_nifti_header(header):
        return NIFTI
    if header.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path, "rb") as inner:
                inner_header = inner.read(HEADER_BYTES)
        except (OSError, EOFError, zlib.error):
            return None
        return NIFTI_GZ if _is_nifti_header(inner_header) else None
    if header.startswith(b"NRRD000"):
        return NRRD
    if METAIMAGE_FIRST_KEY.match(header):
        return METAIMAGE
    return None


def _checked_name(raw_name: str) -> PurePosixPath | None:
    """The member's path inside the destination, None for what is skipped, or a refusal."""
    if "\0" in raw_name or any(ord(character) < 32 for character in raw_name):
        raise ArchiveRefused("the name holds control characters", member=repr(raw_name))
    try:
        raw_name.encode("utf-8")
    except UnicodeEncodeError:
        raise ArchiveRefused("the name is not UTF-8 text; rename it", member=raw_name) from None
    if "\\" in raw_name:
        raise ArchiveRefused("the name holds a backslash; use / between folders", member=raw_name)
    if raw_name.startswith("/") or re.match(r"^[A-Za-z]:", raw_name):
        raise ArchiveRefused("an absolute path; archive members must be relative", member=raw_name)
    parts = [part for part in raw_name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ArchiveRefused("the name climbs out of the archive with ..", member=raw_name)
    if not parts:
        return None
    if len(parts) > MAX_NAME_DEPTH:
        raise ArchiveRefused(f"nested more than {MAX_NAME_DEPTH} folders deep", member=raw_name)
    if any(
        len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_COMPONENT_BYTES for part in parts
    ):
        raise ArchiveRefused(
            f"a name longer than {MAX_NAME_COMPONENT_BYTES} bytes", member=raw_name
        )
    if parts[0] in SKIPPED_FOLDERS or parts[-1] in SKIPPED_FILES:
        return None
    return PurePosixPath(*parts)


class _Unpacker:
    """Writes checked members under `destination`, counting against the limits."""

    def __init__(self, destination: Path, archive_bytes: int, limits: UnpackLimits) -> None:
        self.destination = destination
        self.archive_bytes = max(archive_bytes, 1)
        self.limits = limits
        self.seen: set[PurePosixPath] = set()
        self.files: list[tuple[PurePosixPath, Path]] = []
        self.unpacked_bytes = 0

    def target_of(self, raw_name: str) -> tuple[PurePosixPath, Path] | None:
        name = _checked_name(raw_name)
        if name is None:
            return None
        if name in self.seen:
            raise ArchiveRefused("appears twice in the archive", member=str(name))
        self.seen.add(name)
        return name, self.destination.joinpath(*name.parts)

    def count(self, name: PurePosixPath, size: int) -> None:
        """Refuse a member before writing it when it breaks a limit."""
        if len(self.files) >= self.limits.max_files:
            raise ArchiveTooLarge(
                f"the archive holds more than {self.limits.max_files} files "
                "(FEDLENS_UPLOAD_MAX_FILES)",
                member=str(name),
            )
        self.unpacked_bytes += size
        if self.unpacked_bytes > self.limits.max_unpacked_bytes:
            raise ArchiveTooLarge(
                f"the archive unpacks to more than {self.limits.max_unpacked_bytes} bytes "
                "(FEDLENS_UPLOAD_MAX_UNPACKED_MB)",
                member=str(name),
            )
        if (
            self.unpacked_bytes > RATIO_FREE_BYTES
            and self.unpacked_bytes > self.limits.max_ratio * self.archive_bytes
        ):
            raise ArchiveTooLarge(
                f"the archive unpacks to more than {self.limits.max_ratio} times its size "
                "(FEDLENS_UPLOAD_MAX_RATIO): a compression bomb",
                member=str(name),
            )

    def make_folder(self, name: PurePosixPath, target: Path) -> None:
        if target.exists() and not target.is_dir():
            raise ArchiveRefused("a folder of the same name as a file", member=str(name))
        target.mkdir(parents=True, exist_ok=True)

    def write_file(self, name: PurePosixPath, target: Path, source: BinaryIO, size: int) -> None:
        if target.exists():
            raise ArchiveRefused("a file of the same name as a folder", member=str(name))
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with target.open("xb") as output:
            while chunk := source.read(COPY_CHUNK_BYTES):
                written += len(chunk)
                if written > size:
                    raise ArchiveRefused(
                        "holds more data than the archive declares", member=str(name)
                    )
                output.write(chunk)
        if written != size:
            raise ArchiveRefused("holds less data than the archive declares", member=str(name))
        self.files.append((name, target))


def _unpack_zip(archive: zipfile.ZipFile, unpacker: _Unpacker, limits: UnpackLimits) -> None:
    members = []
    for info in archive.infolist():
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise ArchiveRefused("a symbolic link; links are not accepted", member=info.filename)
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise ArchiveRefused("not a plain file or folder", member=info.filename)
        if info.flag_bits & 0x1:
            raise ArchiveRefused("encrypted; upload it without a password", member=info.filename)
        if (
            not info.is_dir()
            and info.file_size > RATIO_FREE_BYTES
            and info.file_size > limits.max_ratio * max(info.compress_size, 1)
        ):
            raise ArchiveTooLarge(
                f"unpacks to more than {limits.max_ratio} times its compressed size "
                "(FEDLENS_UPLOAD_MAX_RATIO): a compression bomb",
                member=info.filename,
            )
        members.append(info)
    # Links, types and each member's ratio were checked above, before anything is written; the
    # totals are counted from the declared sizes, which zipfile holds each member to.
    for info in members:
        target = unpacker.target_of(info.filename)
        if target is None:
            continue
        name, path = target
        if info.is_dir():
            unpacker.make_folder(name, path)
            continue
        unpacker.count(name, info.file_size)
        try:
            with archive.open(info) as source:
                unpacker.write_file(name, path, source, info.file_size)
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise ArchiveRefused(
                f"corrupt in the archive ({error})", member=info.filename
            ) from None
        except NotImplementedError as error:
            raise ArchiveRefused(f"cannot be unpacked: {error}", member=info.filename) from None


def _unpack_tar(archive: tarfile.TarFile, unpacker: _Unpacker) -> None:
    # Streaming: each header is checked before its data is read, the next one after.
    for member in archive:
        if member.issym():
            raise ArchiveRefused("a symbolic link; links are not accepted", member=member.name)
        if member.islnk():
            raise ArchiveRefused("a hard link; links are not accepted", member=member.name)
        if not (member.isreg() or member.isdir()):
            raise ArchiveRefused("not a plain file or folder", member=member.name)
        target = unpacker.target_of(member.name)
        if target is None:
            continue
        name, path = target
        if member.isdir():
            unpacker.make_folder(name, path)
            continue
        unpacker.count(name, member.size)
        source = archive.extractfile(member)
        if source is None:
            raise ArchiveRefused("has no data", member=member.name)
        unpacker.write_file(name, path, source, member.size)


def _open_and_unpack(archive_path: Path, unpacker: _Unpacker, limits: UnpackLimits) -> None:
    if zipfile.is_zipfile(archive_path):
        try:
            with zipfile.ZipFile(archive_path) as archive:
                _unpack_zip(archive, unpacker, limits)
        except zipfile.BadZipFile as error:
            raise ArchiveRefused(f"The zip archive is corrupt ({error}).") from None
        return
    try:
        with tarfile.open(archive_path, mode="r|*") as archive:
            _unpack_tar(archive, unpacker)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        if isinstance(error, tarfile.ReadError) and not unpacker.files:
            raise ArchiveRefused(
                "The upload is not a zip or tar archive (.zip, .tar, .tar.gz, .tgz, .tar.bz2, "
                ".tar.xz)."
            ) from None
        raise ArchiveRefused(f"The tar archive is corrupt or truncated ({error}).") from None


def _check_gzip_stream(path: Path, name: str, limits: UnpackLimits, budget: int) -> None:
    """A .nii.gz is itself compressed: refuse a bomb, or a file cut short, before training
    reads it whole."""
    compressed = path.stat().st_size
    allowed = min(budget, max(limits.max_ratio * compressed, RATIO_FREE_BYTES))
    inflated = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(COPY_CHUNK_BYTES):
                inflated += len(chunk)
                if inflated > allowed:
                    raise ArchiveTooLarge(
                        f"unpacks to more than {limits.max_ratio} times its size or beyond the "
                        "upload's limits: a compression bomb",
                        member=name,
                    )
    except (OSError, EOFError, zlib.error) as error:
        raise ArchiveRefused(f"a damaged or truncated gzip file ({error})", member=name) from None


def _probe(path: Path, image_format: ImageFormat, name: str) -> None:
    """Let SimpleITK read the header, as training will."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO(image_format.image_io)
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1]
        raise ArchiveRefused(
            f"looks like {image_format.name} but cannot be read as one: {reason}", member=name
        ) from None


def _check_detached_data(path: Path, image_format: ImageFormat, name: str) -> None:
    with path.open("rb") as handle:
        header = handle.read(64 * 1024)
    if image_format is METAIMAGE:
        data_file = METAIMAGE_DATA_FILE.search(header)
        if data_file is None or data_file.group(1) != b"LOCAL":
            raise ArchiveRefused(
                "a MetaImage whose pixels lie in another file; save it as one .mha file",
                member=name,
            )
    if image_format is NRRD and NRRD_DATA_FILE.search(header.split(b"\n\n", 1)[0]):
        raise ArchiveRefused(
            "an NRRD whose pixels lie in another file; save it as one .nrrd file", member=name
        )


def _check_labels_file(path: Path, name: str) -> None:
    if path.stat().st_size > MAX_LABELS_FILE_BYTES:
        raise ArchiveRefused(
            f"larger than {MAX_LABELS_FILE_BYTES // (1024 * 1024)} MB", member=name
        )
    decoder = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as handle:
        try:
            while chunk := handle.read(COPY_CHUNK_BYTES):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ArchiveRefused(
                "not UTF-8 text; save it as CSV UTF-8 (path,label[,site])", member=name
            ) from None


def _check_files(unpacker: _Unpacker, limits: UnpackLimits) -> None:
    for name, path in unpacker.files:
        shown = str(name)
        if name.name == LABELS_FILE:
            _check_labels_file(path, shown)
            continue
        image_format = detect_image_format(path)
        if image_format is None:
            raise ArchiveRefused(
                f"not an image by its content; an upload holds {LABELS_FILE} and images "
                f"({FORMAT_NAMES}) only",
                member=shown,
            )
        extension = extension_of(name.name)
        if image_format is DICOM:
            # DICOM series often name their slices without an extension, or with a number.
            if extension in OTHER_FORMATS_EXTENSIONS:
                raise ArchiveRefused(
                    f"holds a DICOM image but is named {extension}; name it .dcm", member=shown
                )
        elif extension not in image_format.extensions:
            raise ArchiveRefused(
                f"holds a {image_format.name} image but is named "
                f"{extension or 'without an extension'}; name it "
                f"{' or '.join(image_format.extensions)}",
                member=shown,
            )
        elif extension not in SUPPORTED_EXTENSIONS:
            raise ArchiveRefused(
                f"{image_format.name} images are not read by FedLens; convert it to one of "
                f"{', '.join(SUPPORTED_EXTENSIONS)}",
                member=shown,
            )
        _check_detached_data(path, image_format, shown)
        if image_format is NIFTI_GZ:
            budget = limits.max_unpacked_bytes - unpacker.unpacked_bytes
            _check_gzip_stream(path, shown, limits, budget)
        _probe(path, image_format, shown)


def _dataset_folder(destination: Path) -> Path:
    """The folder holding labels.csv: the archive's top, or its one top-level folder."""
    if (destination / LABELS_FILE).is_file():
        return destination
    entries = list(destination.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / LABELS_FILE).is_file():
        return entries[0]
    raise ArchiveRefused(
        f"The archive has no {LABELS_FILE} at its top (or in its one top-level folder); add "
        "one with the columns path,label[,site]."
    )


def unpack_dataset_archive(archive_path: Path, destination: Path, limits: UnpackLimits) -> Path:
    """Unpack the archive into `destination` (created here) and return the dataset folder.

    Raises ArchiveRefused, having removed `destination`, when anything is not acceptable.
    """
    destination.mkdir(parents=True)
    unpacker = _Unpacker(destination, archive_path.stat().st_size, limits)
    try:
        _open_and_unpack(archive_path, unpacker, limits)
        _check_files(unpacker, limits)
        return _dataset_folder(destination)
    except BaseException:
        shutil.rmtree(destination, ignore_errors=True)
        raise
