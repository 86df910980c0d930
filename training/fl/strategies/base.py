"""The server-side round lifecycle that every aggregation strategy follows.

A round is ``begin_round(global_weights)``, then ``accumulate(update, ...)`` once per
client update as it arrives, then ``finish_round()`` for the new global weights. Updates
are full client weights (not deltas) with the same names and shapes as the global ones.
The base class validates every update and keeps sample-weighted means of the clients'
numeric metrics; subclasses only combine tensors.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

__all__ = ["Strategy", "reject_unknown_params"]


def reject_unknown_params(name: str, params: Mapping[str, Any], accepted: set[str]) -> None:
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(
            f"strategy {name!r} got unknown parameters {unknown}; accepted: {sorted(accepted)}"
        )


class Strategy(ABC):
    """Aggregates client updates into new global weights, one round at a time."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self._shapes: dict[str, tuple[torch.Size, torch.dtype]] | None = None
        self._num_updates = 0
        self._num_samples = 0
        self._metric_sums: dict[str, float] = {}
        self._metric_weights: dict[str, int] = {}
        self.round_metrics: dict[str, float] = {}

    @classmethod
    @abstractmethod
    def validate_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Check constructor parameters; return them complete with defaults."""

    def configure_client(self, *, round_number: int, site: str) -> dict[str, Any]:
        """The options sent with a client's task in round ``round_number`` (JSON values),
        which the client applies to its local training. Plain averaging sends none."""
        return {}

    @property
    def num_updates(self) -> int:
        """Updates accumulated in the current round."""
        return self._num_updates

    def begin_round(self, global_weights: Mapping[str, torch.Tensor]) -> None:
        """Start a round from ``global_weights``, discarding anything accumulated before."""
        if not global_weights:
            raise ValueError("global weights are empty")
        self._shapes = {name: (t.shape, t.dtype) for name, t in global_weights.items()}
        self._num_updates = 0
        self._num_samples = 0
        self._metric_sums.clear()
        self._metric_weights.clear()
        self._start(global_weights)

    def accumulate(
        self,
        update: Mapping[str, torch.Tensor],
        *,
        num_samples: int,
        metrics: Mapping[str, Any] | None = None,
        extras: Mapping[str, Any] | None = None,
    ) -> None:
        """Fold one client's weights, trained on ``num_samples`` samples, into the round.

        ``extras`` are the per-client results the client reported beside its weights (what
        a strategy's :meth:`configure_client` options asked it for)."""
        if self._shapes is None:
            raise RuntimeError("accumulate called before begin_round")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self._check_update(update, self._shapes)
        self._add(update, num_samples)
        self._receive_extras(extras or {}, num_samples)
        self._num_updates += 1
        self._num_samples += num_samples
        for key, value in (metrics or {}).items():
            # Only plain finite numbers average meaningfully; other entries are ignored.
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                self._metric_sums[key] = self._metric_sums.get(key, 0.0) + value * num_samples
                self._metric_weights[key] = self._metric_weights.get(key, 0) + num_samples

    def finish_round(self) -> dict[str, torch.Tensor]:
        """The new global weights (on the CPU, in the global weights' dtypes)."""
        if self._shapes is None:
            raise RuntimeError("finish_round called before begin_round")
        if self._num_updates == 0:
            raise RuntimeError("finish_round called before any update was accumulated")
        self.round_metrics = {
            key: total / self._metric_weights[key] for key, total in self._metric_sums.items()
        }
        self.round_metrics["num_clients"] = self._num_updates
        self.round_metrics["num_samples"] = self._num_samples
        new_weights = self._aggregate()
        self._shapes = None
        return new_weights

    @staticmethod
    def _check_update(
        update: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[torch.Size, torch.dtype]]
    ) -> None:
        if update.keys() != shapes.keys():
            missing = sorted(shapes.keys() - update.keys())
            extra = sorted(update.keys() - shapes.keys())
            raise ValueError(f"update does not match the model: missing {missing}, extra {extra}")
        for name, tensor in update.items():
            shape, dtype = shapes[name]
            if tensor.shape != shape:
                raise ValueError(
                    f"update {name!r} has shape {tuple(tensor.shape)}, not {tuple(shape)}"
                )
            if tensor.dtype.is_floating_point != dtype.is_floating_point:
                raise ValueError(f"update {name!r} has dtype {tensor.dtype}, expected {dtype}")
            if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"update {name!r} contains NaN or infinite values")

    @abstractmethod
    def _start(self, global_weights: Mapping[str, torch.Tensor]) -> None:
        """Reset the running state for a new round."""

    @abstractmethod
    def _add(self, update: Mapping[str, torch.Tensor], num_samples: int) -> None:
        """Fold one validated update into the running state."""

    def _receive_extras(self, extras: Mapping[str, Any], num_samples: int) -> None:  # noqa: B027 - optional hook
        """Take one client's extra results; strategies that ask for none ignore them."""

    @abstractmethod
    def _aggregate(self) -> dict[str, torch.Tensor]:
        """Turn the running state into new global weights."""
