"""Decoded datasets kept on disk, so that images are read and preprocessed once, not once per
process: later worker processes and later runs memory-map what the first one decoded.

An entry is a folder of arrays named by a key: what was decoded (the dataset's path, split
and format), how (the preprocessing), and from what (each source file's size and
modification time, in sample order). Changing a file, the listing or the preprocessing
changes the key, so a stale entry is never read; it is deleted when its replacement is
written. An entry is written in a temporary folder that is renamed into place in one step,
so concurrent writers of the same entry each produce a complete folder and the first
rename wins; readers only ever see complete entries.

Arrays of samples that share one shape are stored as one array ``(N, *shape)``; otherwise
as one flat buffer with each sample's offset and shape. Both are opened copy-on-write
(``mmap_mode="c"``): pages come from the page cache, shared by every process reading the
entry, and a process that writes to a sample changes only its own copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from training.fl.data.errors import DatasetFormatError
from training.fl.data.preprocess import Preprocessor
from training.fl.data.readers import ImageReadError

__all__ = [
    "CACHE_VERSION",
    "DECODING",
    "DecodedCache",
    "DecodedEntry",
    "EntryWriter",
    "OpenedDatasets",
    "SampleArrays",
    "files_fingerprint",
    "preprocessing_key",
    "smallest_label_dtype",
]

# What reading one sample may raise for bad data. Kept with the entry and raised again
# when that sample is asked for: one unreadable file fails the clients whose share holds
# it, as it would without the cache, not the whole dataset.
SAMPLE_ERRORS: tuple[type[Exception], ...] = (
    ImageReadError,
    DatasetFormatError,
    ValueError,
    OSError,
)

# Part of every key: a change of how entries are laid out makes the old ones unreadable.
CACHE_VERSION = 1
_KEY_FILE = "key.json"
# A temporary folder untouched for this long was left by a writer that died.
ABANDONED_AFTER_SECONDS = 24 * 3600
_META_FILE = "meta.json"


def files_fingerprint(paths: Iterable[Path | str]) -> str:
    """A digest of the files' names, sizes and modification times, in the given order.

    A sample's file named ``scan.nii.gz#3`` (one volume of a 4D file) is fingerprinted by
    the file it names; a folder (a DICOM series) by every file directly inside it.
    """
    digest = hashlib.sha256()
    for path in paths:
        name = str(path)
        file = Path(name.split("#", 1)[0]) if "#" in Path(name).name else Path(name)
        members = sorted(file.iterdir()) if file.is_dir() else [file]
        digest.update(name.encode("utf-8", "surrogateescape") + b"\0")
        for member in members:
            status = member.stat()
            digest.update(f"{member.name}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class SampleArrays:
    """One array per sample, memory-mapped: ``arrays[i]`` is sample ``i``'s array.

    ``flat`` holds the samples one after the other, sample ``i`` at ``offsets[i]`` up to
    ``offsets[i + 1]`` with the shape ``shapes[i]`` (padded with -1 to the longest).
    """

    def __init__(
        self,
        flat: npt.NDArray[Any],
        offsets: npt.NDArray[np.int64],
        shapes: npt.NDArray[np.int64],
    ) -> None:
        self._flat, self._offsets, self._shapes = flat, offsets, shapes
        uniform = len(shapes) > 0 and bool((shapes == shapes[0]).all() and (shapes[0] >= 0).all())
        #: ``(N, *shape)`` over the same memory when every sample has one shape, else None.
        self.dense: npt.NDArray[Any] | None = (
            flat.reshape(len(shapes), *(int(size) for size in shapes[0])) if uniform else None
        )

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @property
    def nbytes(self) -> int:
        return int(self._flat.nbytes)

    def __getitem__(self, index: int) -> npt.NDArray[Any]:
        if self.dense is not None:
            sample: npt.NDArray[Any] = self.dense[index]
            return sample
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        start, stop = int(self._offsets[index]), int(self._offsets[index + 1])
        shape = tuple(int(size) for size in self._shapes[index] if size >= 0)
        return self._flat[start:stop].reshape(shape)


class EntryWriter:
    """Writes one entry's arrays into its temporary folder, one sample at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.meta: dict[str, Any] = {}
        self._open: dict[str, _SampleFileWriter] = {}

    def add_sample(self, name: str, array: npt.NDArray[Any]) -> None:
        """Append the next sample of the array set ``name``."""
        writer = self._open.get(name)
        if writer is None:
            writer = self._open[name] = _SampleFileWriter(self.folder, name, array.dtype)
        writer.add(array)

    def add_failure(self, index: int, error: Exception) -> None:
        """Record that sample ``index`` could not be read (its arrays are left empty)."""
        kind = next(kind for kind in SAMPLE_ERRORS if isinstance(error, kind))
        self.meta.setdefault("failures", {})[str(index)] = [kind.__name__, str(error)]

    def add_array(self, name: str, array: npt.NDArray[Any]) -> None:
        """Store a whole array (labels, for instance) under ``name``."""
        np.save(self.folder / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)

    def close(self) -> None:
        for writer in self._open.values():
            writer.close()
        (self.folder / _META_FILE).write_text(json.dumps(self.meta), encoding="utf-8")


class _SampleFileWriter:
    """Samples streamed to a raw file as they are decoded (memory of one sample)."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype[Any]) -> None:
        self.folder, self.name, self.dtype = folder, name, np.dtype(dtype)
        self.handle = (folder / f"{name}.raw").open("wb")
        self.offsets = [0]
        self.shapes: list[tuple[int, ...]] = []

    def add(self, array: npt.NDArray[Any]) -> None:
        if array.dtype != self.dtype:
            raise ValueError(f"{self.name}: samples must share one dtype, got {array.dtype}")
        self.handle.write(np.ascontiguousarray(array).tobytes())
        self.offsets.append(self.offsets[-1] + array.size)
        self.shapes.append(tuple(array.shape))

    def close(self) -> None:
        self.handle.close()
        longest = max((len(shape) for shape in self.shapes), default=0)
        shapes = np.full((len(self.shapes), longest), -1, dtype=np.int64)
        for row, shape in enumerate(self.shapes):
            shapes[row, : len(shape)] = shape
        np.save(self.folder / f"{self.name}.shapes.npy", shapes, allow_pickle=False)
        np.save(
            self.folder / f"{self.name}.offsets.npy",
            np.asarray(self.offsets, dtype=np.int64),
            allow_pickle=False,
        )
        (self.folder / f"{self.name}.dtype").write_text(self.dtype.str, encoding="ascii")


@dataclass(frozen=True)
class DecodedEntry:
    """A complete entry, opened read-only (copy-on-write)."""

    folder: Path
    meta: dict[str, Any]

    def failures(self) -> dict[int, Exception]:
        """The error each sample that could not be read raised, by sample index."""
        kinds = {kind.__name__: kind for kind in SAMPLE_ERRORS}
        return {
            int(index): kinds[kind](message)
            for index, (kind, message) in self.meta.get("failures", {}).items()
        }

    def samples(self, name: str) -> SampleArrays:
        """The array set ``name``, memory-mapped."""
        dtype = np.dtype((self.folder / f"{name}.dtype").read_text(encoding="ascii"))
        shapes = np.load(self.folder / f"{name}.shapes.npy", allow_pickle=False)
        offsets = np.load(self.folder / f"{name}.offsets.npy", allow_pickle=False)
        raw = self.folder / f"{name}.raw"
        count = int(offsets[-1])
        # An empty file cannot be mapped.
        flat = (
            np.memmap(raw, dtype=dtype, mode="c", shape=(count,))
            if count
            else np.zeros(0, dtype=dtype)
        )
        return SampleArrays(flat, offsets, shapes)

    def array(self, name: str) -> npt.NDArray[Any]:
        loaded: npt.NDArray[Any] = np.load(
            self.folder / f"{name}.npy", mmap_mode="c", allow_pickle=False
        )
        return loaded


class DecodedCache:
    """Decoded datasets under ``root``, shared by every process that opens the same data.

    ``entry(key, build)`` returns the entry named by ``key`` (a JSON-able mapping), calling
    ``build(writer)`` to write it first when no process has. ``key["source"]`` groups the
    entries of one dataset: writing an entry deletes that source's entries whose
    ``key["fingerprint"]`` differs (decoded from data that has since changed).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        #: Entries this object wrote (decoded) and read, for tests and benchmarks.
        self.built = 0
        self.reused = 0

    def entry(self, key: dict[str, Any], build: Callable[[EntryWriter], None]) -> DecodedEntry:
        full_key = {"version": CACHE_VERSION, **key}
        encoded = json.dumps(full_key, sort_keys=True, default=str)
        source = str(full_key.get("source", ""))
        group = self.root / _digest(source)[:16]
        folder = group / _digest(encoded)[:32]
        if (folder / _KEY_FILE).is_file():
            self.reused += 1
            return _open_entry(folder)
        group.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=group))
        try:
            writer = EntryWriter(staging)
            build(writer)
            writer.close()
            # Written last: an entry with its key file is complete.
            (staging / _KEY_FILE).write_text(encoded, encoding="utf-8")
            try:
                staging.rename(folder)
            except OSError:
                # Another process renamed its own copy first (same key, same content).
                if not (folder / _KEY_FILE).is_file():
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        self.built += 1
        self._delete_stale(group, keep=folder, fingerprint=full_key.get("fingerprint"))
        return _open_entry(folder)

    @staticmethod
    def _delete_stale(group: Path, *, keep: Path, fingerprint: Any) -> None:
        """Delete the source's entries decoded from other file contents, and what writers
        that died left half-written. A process still reading an entry keeps its mapped pages
        (the files go when the last map does)."""
        for folder in group.iterdir():
            if folder.name.startswith("."):
                try:
                    abandoned = time.time() - folder.stat().st_mtime > ABANDONED_AFTER_SECONDS
                except OSError:
                    continue
                if abandoned:
                    shutil.rmtree(folder, ignore_errors=True)
                continue
            if folder == keep:
                continue
            try:
                key = json.loads((folder / _KEY_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if key.get("fingerprint") != fingerprint:
                # Renamed first, so that no reader finds it half-deleted.
                doomed = group / f".stale-{uuid.uuid4().hex}"
                try:
                    folder.rename(doomed)
                except OSError:
                    continue
                shutil.rmtree(doomed, ignore_errors=True)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _open_entry(folder: Path) -> DecodedEntry:
    meta_file = folder / _META_FILE
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    return DecodedEntry(folder=folder, meta=meta)


def smallest_label_dtype(num_classes: int) -> np.dtype[Any]:
    """The narrowest integer type that holds labels 0..num_classes-1 (masks on disk)."""
    for dtype in (np.uint8, np.int16, np.int32):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def preprocessing_key(preprocessor: Preprocessor) -> dict[str, Any]:
    """The preprocessing part of a key: what decides the decoded arrays' values."""
    size, spacing = preprocessor.size, preprocessor.spacing
    return {
        "size": [int(axis) for axis in size] if size is not None else None,
        "spacing": [float(step) for step in spacing] if spacing is not None else None,
        "channels": preprocessor.channels,
        "normalization": preprocessor.normalization_spec,
    }


# Decoding a whole dataset happens once per process and entry; one at a time, so that the
# embedded worker's concurrent clients do not each decode the same dataset.
DECODING = threading.Lock()


class HoldsSamples(Protocol):
    def memory_bytes(self) -> int: ...


Opened = TypeVar("Opened", bound=HoldsSamples)


class OpenedDatasets(Generic[Opened]):
    """The datasets a process keeps open, the least recently used closed first once the
    decoded samples they hold or map add up to more than a budget.

    A dataset's samples are decoded when first used, after it was opened: the budget is
    checked on each ``get``, never evicting the dataset asked for (one dataset larger than
    the budget is kept alone while it is used). Thread-safe.
    """

    def __init__(self) -> None:
        self._open: OrderedDict[Hashable, Opened] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, key: Hashable, open_dataset: Callable[[], Opened], *, budget_bytes: int
    ) -> Opened:
        with self._lock:
            dataset = self._open.pop(key, None)
            if dataset is None:
                dataset = open_dataset()
            self._open[key] = dataset
            sizes = {name: opened.memory_bytes() for name, opened in self._open.items()}
            total = sum(sizes.values())
            for name in list(self._open)[:-1]:
                if total <= budget_bytes:
                    break
                del self._open[name]
                total -= sizes[name]
            return dataset

    def __len__(self) -> int:
        return len(self._open)

    def clear(self) -> None:
        with self._lock:
            self._open.clear()
