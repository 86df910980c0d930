"""Batches of a client's samples for local training and evaluation, on the device.

A client's samples are read once per call into one tensor (when they fit in
``resident_bytes``) and each batch is a row selection from it, in the order asked for;
larger sets are read batch by batch. On a GPU the samples that fit stay there between
calls (the next round's task of the same client in this process finds them), so batches
are selected on the device and nothing crosses the bus after the first round; batches
read from the host go through pinned memory with ``non_blocking`` copies.

A batch holds exactly what ``DataLoader(dataset, batch_size, sampler=order)`` collates
(``default_collate`` of the same samples), so training on the CPU is bit for bit what it
was with the loader, without the loader's per-batch machinery.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

__all__ = ["DEVICE_RESIDENT_BYTES", "ClientSamples", "forget_resident_samples"]

Batch = tuple[torch.Tensor, torch.Tensor]

# A client's samples up to this size are read into one tensor per call and, on a GPU, kept
# there between calls (all clients' together stay within it: the oldest are dropped).
DEVICE_RESIDENT_BYTES = 512 * 2**20

# dataset -> {(device, sample indices): (inputs, targets)} on a GPU, oldest first. Weak
# keys: a dataset's copies go with it.
_resident: weakref.WeakKeyDictionary[Any, OrderedDict[tuple[str, tuple[int, ...]], Batch]] = (
    weakref.WeakKeyDictionary()
)
# Concurrent clients (threads of the embedded worker) share the copies.
_resident_lock = threading.Lock()


def forget_resident_samples() -> None:
    """Drop every copy of samples kept on a GPU (and free their memory for the caller)."""
    with _resident_lock:
        _resident.clear()


def _resident_bytes_held(device: str) -> list[tuple[Any, tuple[str, tuple[int, ...]], int]]:
    """(dataset, key, bytes) of every copy on ``device``, oldest first within a dataset."""
    held = []
    for dataset, copies in list(_resident.items()):
        for key, (inputs, targets) in copies.items():
            if key[0] == device:
                held.append((dataset, key, inputs.nbytes + targets.nbytes))
    return held


def _collate(samples: list[Any]) -> Batch:
    inputs, targets = default_collate(samples)
    return inputs, targets


class ClientSamples:
    """A client's samples ``dataset[indices]``, batched on ``device``.

    ``positions`` given to :meth:`batches` index ``indices`` (0 is ``indices[0]``).
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        indices: Sequence[int],
        device: torch.device,
        *,
        resident_bytes: int = DEVICE_RESIDENT_BYTES,
    ) -> None:
        if not indices:
            raise ValueError("a client needs at least one sample")
        self.dataset = dataset
        self.indices = list(indices)
        self.device = device
        self.on_cuda = device.type == "cuda"
        self._whole: Batch | None = None
        first_input = dataset[self.indices[0]][0]
        estimated = int(getattr(first_input, "nbytes", 0)) * len(self.indices)
        if estimated <= resident_bytes:
            self._whole = (
                self._on_device(resident_bytes) if self.on_cuda else self._read(self.indices)
            )

    def _read(self, indices: Sequence[int]) -> Batch:
        return _collate([self.dataset[index] for index in indices])

    def _on_device(self, resident_bytes: int) -> Batch:
        """The samples on the GPU: the copy made by an earlier call, or a new one (the
        oldest copies dropped to stay within ``resident_bytes``)."""
        device = str(self.device)
        key = (device, tuple(self.indices))
        with _resident_lock:
            copies = _resident.get(self.dataset)
            if copies is not None and key in copies:
                copies.move_to_end(key)
                return copies[key]
        inputs, targets = self._read(self.indices)
        whole = (
            inputs.pin_memory().to(self.device, non_blocking=True),
            targets.pin_memory().to(self.device, non_blocking=True),
        )
        size = whole[0].nbytes + whole[1].nbytes
        with _resident_lock:
            held = _resident_bytes_held(device)
            total = sum(nbytes for _, _, nbytes in held)
            for dataset, old_key, nbytes in held:
                if total + size <= resident_bytes:
                    break
                _resident[dataset].pop(old_key, None)
                total -= nbytes
            _resident.setdefault(self.dataset, OrderedDict())[key] = whole
        return whole

    def batches(self, positions: torch.Tensor, batch_size: int) -> Iterator[Batch]:
        """Batches of ``batch_size`` samples (the last may be smaller) in the order of
        ``positions`` (a CPU tensor), on the device."""
        if self._whole is not None:
            inputs, targets = self._whole
            order = positions.to(inputs.device, non_blocking=True)
            for start in range(0, len(order), batch_size):
                chosen = order[start : start + batch_size]
                yield inputs.index_select(0, chosen), targets.index_select(0, chosen)
            return
        for start in range(0, len(positions), batch_size):
            chosen = positions[start : start + batch_size]
            batch_inputs, batch_targets = self._read([self.indices[p] for p in chosen.tolist()])
            if self.on_cuda:
                batch_inputs, batch_targets = batch_inputs.pin_memory(), batch_targets.pin_memory()
            yield (
                batch_inputs.to(self.device, non_blocking=True),
                batch_targets.to(self.device, non_blocking=True),
            )
