"""What the robust strategies share: they hold the round's updates as a list.

Median, trimmed mean and Krum are order statistics over all updates at once, so unlike
FedAvg they cannot stream: they keep a CPU copy of every client's floating-point weights
(memory of one model per client). Non-floating buffers (BatchNorm's
``num_batches_tracked``) take the largest client value, as in FedAvg.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping

import torch

from training.fl.strategies.base import Strategy

__all__ = ["OrderStatisticStrategy"]


class OrderStatisticStrategy(Strategy):
    def __init__(self, *, weighting: str = "samples") -> None:
        super().__init__(weighting=weighting)
        self._updates: list[dict[str, torch.Tensor]] = []
        self._weights: list[float] = []
        self._buffer_max: dict[str, torch.Tensor] = {}

    def _start(self, global_weights: Mapping[str, torch.Tensor]) -> None:
        self._updates = []
        self._weights = []
        self._buffer_max = {}

    def _add(self, update: Mapping[str, torch.Tensor], num_samples: int) -> None:
        floating = {}
        for name, tensor in update.items():
            # Copies: the update's tensors may be reused for the next one.
            value = tensor.detach().to("cpu", copy=True)
            if tensor.dtype.is_floating_point:
                floating[name] = value
            else:
                previous = self._buffer_max.get(name)
                self._buffer_max[name] = (
                    value if previous is None else torch.maximum(previous, value)
                )
        self._updates.append(floating)
        self._weights.append(self.update_weight(num_samples))

    @abstractmethod
    def _combine(
        self, updates: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        """The new floating-point weights from every client's (any float dtype)."""

    def _aggregate(self) -> dict[str, torch.Tensor]:
        if self._shapes is None:  # finish_round calls this before it resets the shapes
            raise RuntimeError("_aggregate called outside finish_round")
        combined = self._combine(self._updates, self._weights)
        self._updates, self._weights = [], []
        return {
            name: (combined[name] if dtype.is_floating_point else self._buffer_max[name]).to(dtype)
            for name, (_, dtype) in self._shapes.items()
        }
