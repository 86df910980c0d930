"""The model store: global checkpoints and client updates as safetensors files.

It goes through Django's storage API (STORAGES["models"]), so a deployment can put it on a
shared volume or an object store; the ledger keeps each file's name and SHA-256.
"""

import hashlib
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from django.core.files.base import File

from training.fl.weights import encode_weights, load_weights, load_weights_file, sha256_hex
from training.models import model_store


@dataclass(frozen=True)
class StoredWeights:
    name: str
    sha256: str
    size_bytes: int
    num_parameters: int


def initial_weights_name(experiment_id: int) -> str:
    return f"experiments/{experiment_id}/initial.safetensors"


def global_weights_name(experiment_id: int, round_number: int) -> str:
    """A new name for each aggregation of a round, for the same reason as a client's."""
    return f"experiments/{experiment_id}/round-{round_number:04d}/global-{_delivery()}.safetensors"


def client_update_name(experiment_id: int, round_number: int, site_slug: str) -> str:
    """A new name for each delivery of a client's task: a duplicate that runs at the same
    time never replaces the file whose hash the ledger recorded."""
    return (
        f"experiments/{experiment_id}/round-{round_number:04d}/"
        f"site-{site_slug}-{_delivery()}.safetensors"
    )


def _delivery() -> str:
    return uuid.uuid4().hex[:8]


class _EncodedWeights(File):
    """Weights as the storage API reads a file: chunk by chunk, hashed on the way, so that
    storing a model never holds a second copy of it (nor its bytes) in memory."""

    def __init__(self, weights: Mapping[str, torch.Tensor], name: str) -> None:
        super().__init__(None, name)
        self.size, self._encoded = encode_weights(weights)
        self.digest = hashlib.sha256()

    def chunks(self, chunk_size: int | None = None) -> Iterator[bytes]:
        for chunk in self._encoded:
            self.digest.update(chunk)
            yield chunk

    def multiple_chunks(self, chunk_size: int | None = None) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # for a storage that reads rather than iterates
        return b"".join(self.chunks())


def save_weights(name: str, weights: Mapping[str, torch.Tensor]) -> StoredWeights:
    """Store `weights` under `name`, replacing an earlier file (a task may run twice)."""
    storage = model_store()
    if storage.exists(name):
        storage.delete(name)
    encoded = _EncodedWeights(weights, name)
    stored_name = storage.save(name, encoded)
    return StoredWeights(
        name=stored_name,
        sha256=encoded.digest.hexdigest(),
        size_bytes=encoded.size,
        num_parameters=sum(tensor.numel() for tensor in weights.values()),
    )


def delete_weights(name: str) -> None:
    model_store().delete(name)


def load_stored_weights(
    name: str, sha256: str, *, into: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Read weights back, refusing a file whose hash is not the one the ledger recorded.

    `into`: tensors to read into where they fit (see load_weights_file); local files only.
    """
    storage = model_store()
    try:
        path = storage.path(name)
    except NotImplementedError:  # a remote store (object storage): no local file to map
        with storage.open(name, "rb") as handle:
            return load_weights(handle.read(), expected_sha256=sha256)
    return load_weights_file(path, expected_sha256=sha256, into=into)


def stream_stored_weights(
    files: Iterable[tuple[str, str]], *, into: Mapping[str, torch.Tensor] | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """The weights of each (name, SHA-256) in turn, each read into the tensors of the one
    before (the first into `into`'s): memory for one model, however many files. A consumer
    must be done with one before it asks for the next."""
    received = into
    for name, sha256 in files:
        received = load_stored_weights(name, sha256, into=received)
        yield received


# --- A strategy's state and payload, beside the checkpoint they belong to ----------------
# Named after the checkpoint file, so that a round's aggregation finds what the previous
# one left from the starting checkpoint alone, and a duplicate aggregation (whose checkpoint
# has another name) never replaces them. Written before the checkpoint is recorded: a
# recorded checkpoint always has its strategy files. A strategy without state or payload
# writes none, and a missing file reads as empty.


def strategy_state_name(checkpoint_name: str) -> str:
    return checkpoint_name.removesuffix(".safetensors") + ".strategy-state.safetensors"


def strategy_payload_name(checkpoint_name: str) -> str:
    return checkpoint_name.removesuffix(".safetensors") + ".strategy-payload.safetensors"


def delete_checkpoint_files(checkpoint_name: str) -> None:
    """A checkpoint that will never be recorded, with the strategy files written beside it."""
    for name in (
        checkpoint_name,
        strategy_state_name(checkpoint_name),
        strategy_payload_name(checkpoint_name),
    ):
        delete_weights(name)


def save_strategy_files(
    checkpoint_name: str,
    *,
    state: Mapping[str, torch.Tensor],
    payload: Mapping[str, torch.Tensor],
) -> None:
    """Store what the strategy carries to the next round and what its clients receive."""
    for name, tensors in (
        (strategy_state_name(checkpoint_name), state),
        (strategy_payload_name(checkpoint_name), payload),
    ):
        if tensors:
            stored = save_weights(name, tensors)
            if stored.name != name:  # the store renamed it: the next round would not find it
                delete_weights(stored.name)
                raise RuntimeError(f"the model store saved {name} as {stored.name}")


def load_strategy_state(checkpoint_name: str) -> dict[str, torch.Tensor]:
    """The state stored beside ``checkpoint_name`` ({} when its strategy kept none)."""
    name = strategy_state_name(checkpoint_name)
    storage = model_store()
    if not storage.exists(name):
        return {}
    # Server-written safetensors (no pickle); the ledger records no hash for it.
    with storage.open(name, "rb") as handle:
        return load_weights(handle.read())


def stored_strategy_payload(checkpoint_name: str) -> tuple[str, str] | None:
    """(file name, SHA-256) of the payload stored beside ``checkpoint_name``, or None."""
    name = strategy_payload_name(checkpoint_name)
    storage = model_store()
    if not storage.exists(name):
        return None
    with storage.open(name, "rb") as handle:
        return name, sha256_hex(handle.read())
