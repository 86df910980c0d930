"""Model weights on disk and on the wire, as safetensors only.

Pickle-based formats (``torch.save``) can run arbitrary code when loaded, and weights
here come from other organisations, so they are never used. A SHA-256 of the exact bytes
identifies each weights file and is checked before the tensors are decoded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

__all__ = [
    "WeightsError",
    "WeightsInfo",
    "all_finite",
    "encode_weights",
    "l2_distance",
    "load_weights",
    "save_weights",
    "sha256_hex",
    "weights_from_bytes",
    "weights_mismatch",
    "weights_to_bytes",
]


class WeightsError(ValueError):
    """Weights are malformed, or their hash is not the one expected."""


@dataclass(frozen=True, kw_only=True)
class WeightsInfo:
    """What a saved weights file is: its hash, size and number of stored values.

    ``num_parameters`` counts the elements of every tensor, buffers included.
    """

    sha256: str
    size_bytes: int
    num_parameters: int


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_to_bytes(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise tensors (any dtype, integer buffers included) to safetensors bytes."""
    # Cloning gives contiguous CPU tensors that share no storage, which safetensors needs
    # (it refuses aliased tensors such as tied weights).
    tensors = {
        name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state_dict.items()
    }
    return save_safetensors(tensors)


def weights_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Decode safetensors bytes; raises :class:`WeightsError` if they are malformed."""
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise WeightsError(f"malformed safetensors weights: {error}") from None


def save_weights(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str]
) -> WeightsInfo:
    """Write ``state_dict`` to ``path`` and describe the file written."""
    data = weights_to_bytes(state_dict)
    Path(path).write_bytes(data)
    return WeightsInfo(
        sha256=sha256_hex(data),
        size_bytes=len(data),
        num_parameters=sum(tensor.numel() for tensor in state_dict.values()),
    )


# safetensors dtype codes (https://github.com/huggingface/safetensors, format spec).
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}
# Work through large tensors in pieces of this many elements, so that the temporaries of a
# distance stay in the cache instead of costing a model's worth of memory.
_PIECE = 1 << 18


def encode_weights(
    state_dict: Mapping[str, torch.Tensor], *, chunk_bytes: int = 1 << 20
) -> tuple[int, Iterator[bytes]]:
    """The safetensors encoding of ``state_dict`` as its size and a stream of chunks.

    Unlike :func:`weights_to_bytes`, it never holds a copy of the model: each tensor's bytes
    are sliced into chunks of at most ``chunk_bytes`` as they are written, so storing a large
    global model costs only a chunk of memory. Tensors are laid out widest dtype first, then
    by name, which keeps every tensor aligned; the result loads with safetensors itself.
    """
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    order = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
    header: dict[str, dict[str, object]] = {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in _DTYPE_CODES:
            raise WeightsError(f"tensor {name!r} has dtype {tensor.dtype}, not storable")
        size = tensor.numel() * tensor.dtype.itemsize
        header[name] = {
            "dtype": _DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data section starts aligned

    def chunks() -> Iterator[bytes]:
        yield len(header_bytes).to_bytes(8, "little") + header_bytes
        for name in order:
            tensor = tensors[name]
            if tensor.numel() == 0:
                continue
            data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy().data)
            for start in range(0, len(data), chunk_bytes):
                yield bytes(data[start : start + chunk_bytes])

    return 8 + len(header_bytes) + offset, chunks()


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN or infinity.

    Its smallest and largest values tell (aminmax propagates NaN) in one pass with no mask
    of the tensor's size, several times faster than ``isfinite(tensor).all()`` on the CPU.
    """
    if tensor.numel() == 0:
        return True
    smallest, largest = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(smallest)) and bool(torch.isfinite(largest))


def load_weights_file(
    path: str | os.PathLike[str],
    *,
    expected_sha256: str,
    into: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Load a safetensors file in one pass, hashing it while each tensor is read into place.

    Aggregation loads one update after another; reading straight into the tensors holds
    the weights once, where the bytes-then-decode path (or a memory map) holds them twice.
    ``into`` (an earlier result) lends its tensors to those of the same name, dtype and
    shape, which are overwritten: a stream of updates then allocates memory only once,
    rather than leaving the allocator a freed model to reuse or not for every update.
    The header is checked as the format requires before anything is allocated.
    """
    reusable = into or {}
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            header_length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < header_length <= min(_MAX_HEADER_BYTES, size - 8):
                raise WeightsError(f"{path}: not a safetensors file (bad header length)")
            header_bytes = handle.read(header_length)
            digest.update(prefix)
            digest.update(header_bytes)
            entries = _parse_header(path, header_bytes, data_length=size - 8 - header_length)
            tensors: dict[str, torch.Tensor] = {}
            for name, dtype, shape in entries:
                tensor = reusable.get(name)
                if tensor is None or tensor.dtype != dtype or list(tensor.shape) != shape:
                    tensor = torch.empty(shape, dtype=dtype)
                view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy().data)
                filled = 0
                while filled < len(view):
                    count = handle.readinto(view[filled:])
                    if not count:
                        raise WeightsError(f"{path}: file ends inside tensor {name!r}")
                    filled += count
                digest.update(view)
                tensors[name] = tensor
    except OSError as error:
        raise WeightsError(f"cannot read weights file {path}: {error}") from None
    actual = digest.hexdigest()
    if actual != expected_sha256.lower():
        raise WeightsError(f"{path}: SHA-256 mismatch (expected {expected_sha256}, got {actual})")
    return tensors


def _parse_header(
    path: str | os.PathLike[str], header_bytes: bytes, *, data_length: int
) -> list[tuple[str, torch.dtype, list[int]]]:
    """The tensors in file order; their data must tile the data section exactly."""
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightsError(f"{path}: the safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: the safetensors header is not an object")
    entries = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[spec["dtype"]]
            shape = [int(dim) for dim in spec["shape"]]
            begin, end = (int(offset) for offset in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: tensor {name!r} is badly described") from None
        numel = math.prod(shape)
        if min(shape, default=0) < 0 or end - begin != numel * dtype.itemsize:
            raise WeightsError(f"{path}: tensor {name!r} has inconsistent size")
        entries.append((begin, end, name, dtype, shape))
    entries.sort()
    position = 0
    for begin, end, name, _, _ in entries:
        if begin != position:
            raise WeightsError(f"{path}: tensor {name!r} does not follow the previous one")
        position = end
    if position != data_length:
        raise WeightsError(f"{path}: the data section does not match the header")
    return [(name, dtype, shape) for _, _, name, dtype, shape in entries]


def load_weights(
    source: str | os.PathLike[str] | bytes, *, expected_sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """Load weights from a file path or raw bytes, verifying the hash when one is given."""
    if isinstance(source, bytes):
        data, origin = source, "weights bytes"
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as error:
            raise WeightsError(f"cannot read weights file {source}: {error}") from None
        origin = str(source)
    if expected_sha256 is not None:
        actual = sha256_hex(data)
        if actual != expected_sha256.lower():
            raise WeightsError(
                f"{origin}: SHA-256 mismatch (expected {expected_sha256}, got {actual})"
            )
    try:
        return weights_from_bytes(data)
    except WeightsError as error:
        raise WeightsError(f"{origin}: {error}") from None


def weights_mismatch(
    weights: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
) -> str | None:
    """Why ``weights`` are not a model of the ``expected`` names, shapes and dtypes with
    finite values, or None when they are."""
    missing, extra = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected)
    if missing or extra:
        return f"its tensors are not the network's: missing {missing[:5]}, unexpected {extra[:5]}"
    for name, tensor in weights.items():
        shape, dtype = expected[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            return (
                f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}; the network's is "
                f"{dtype} {tuple(shape)}"
            )
        if tensor.dtype.is_floating_point and not all_finite(tensor):
            return f"tensor {name!r} holds NaN or infinite values"
    return None


def l2_distance(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> float:
    """Euclidean distance between two sets of weights, over their floating-point tensors.

    A large model's differences are taken a piece at a time into one buffer, in float32
    (float64 for float64 weights), and their squares summed in float64 across pieces: no
    temporaries of a tensor's size, and a relative error of about 1e-7, which a reported
    distance can bear.
    """
    total = 0.0
    for name, tensor in first.items():
        if tensor.dtype.is_floating_point:
            left = tensor.detach().cpu().reshape(-1)
            right = second[name].detach().cpu().reshape(-1)
            # Half precision would overflow its sum of squares: those go through float32.
            precision = torch.float64 if tensor.dtype == torch.float64 else torch.float32
            buffer = torch.empty(min(left.numel(), _PIECE), dtype=precision)
            for start in range(0, left.numel(), _PIECE):
                end = min(start + _PIECE, left.numel())
                piece = buffer[: end - start].copy_(left[start:end]).sub_(right[start:end])
                total += float(torch.dot(piece, piece))
    return math.sqrt(total)
