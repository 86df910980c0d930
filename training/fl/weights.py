"""Model weights on disk and on the wire, as safetensors only.

Pickle-based formats (``torch.save``) can run arbitrary code when loaded, and weights
here come from other organisations, so they are never used. A SHA-256 of the exact bytes
identifies each weights file and is checked before the tensors are decoded.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

__all__ = [
    "WeightsError",
    "WeightsInfo",
    "load_weights",
    "save_weights",
    "sha256_hex",
    "weights_from_bytes",
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
