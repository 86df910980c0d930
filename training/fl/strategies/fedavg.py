"""Federated Averaging: McMahan et al., 2017, arXiv:1602.05629.

The new global weights are the mean of the client weights, each weighted by its number of
training samples (``weighting="samples"``) or all alike (``"uniform"``).
``server_learning_rate`` moves the global weights only part of the way towards that mean
(the server step of Reddi et al., 2021, arXiv:2003.00295); the default 1.0 is plain FedAvg.

Streaming: the strategy holds one running sum (float32 for float32 models), a copy of the
global weights only when ``server_learning_rate`` is not 1, and never the list of updates;
the sum becomes the new global weights in place. Non-floating buffers (e.g. BatchNorm's
``num_batches_tracked``) cannot be averaged; the largest client value is kept, which is
also independent of the order in which updates arrive.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from training.fl.strategies.base import Parameter, Strategy
from training.fl.strategies.kernels import add_weighted_

__all__ = ["FedAvg"]


class FedAvg(Strategy):
    name: ClassVar[str] = "fedavg"
    title: ClassVar[str] = "FedAvg"
    paper: ClassVar[str] = "McMahan et al. 2017, arXiv:1602.05629"
    description: ClassVar[str] = (
        "The new global model is the (sample-weighted or uniform) mean of the clients' "
        "models; a server learning rate below 1 moves only part of the way towards it."
    )
    parameters: ClassVar[tuple[Parameter, ...]] = (
        Parameter(
            name="server_learning_rate",
            type="float",
            default=1.0,
            minimum=0.0,
            exclusive_minimum=True,
            maximum=10.0,
            description="Step from the global model towards the clients' mean (1: the mean).",
        ),
    )

    def __init__(self, *, server_learning_rate: float = 1.0, weighting: str = "samples") -> None:
        super().__init__(weighting=weighting)
        params = FedAvg.validate_params({"server_learning_rate": server_learning_rate})
        self.server_learning_rate: float = params["server_learning_rate"]
        # Entries the server does not average but keeps at their global values (FedBN).
        self._kept_global: frozenset[str] = frozenset()
        self._global: dict[str, torch.Tensor] = {}
        self._weighted_sum: dict[str, torch.Tensor] = {}
        self._buffer_max: dict[str, torch.Tensor] = {}
        self._total_weight = 0.0

    def _server_step_needs_global(self) -> bool:
        """Whether :meth:`_server_step` reads the global weights (plain FedAvg does not)."""
        return self.server_learning_rate != 1.0

    def _start(self, global_weights: Mapping[str, torch.Tensor]) -> None:
        # Plain FedAvg needs only the shapes of the global weights, which the base class keeps.
        needs_global = self._server_step_needs_global()
        self._global = {
            name: tensor.detach().to("cpu").clone()
            for name, tensor in global_weights.items()
            if name in self._kept_global or (needs_global and tensor.dtype.is_floating_point)
        }
        self._weighted_sum = {}
        self._buffer_max = {}
        self._total_weight = 0.0

    def _add(self, update: Mapping[str, torch.Tensor], num_samples: int) -> None:
        averaged = {name: t for name, t in update.items() if name not in self._kept_global}
        floating = {name: t for name, t in averaged.items() if t.dtype.is_floating_point}
        weight = self.update_weight(num_samples)
        add_weighted_(self._weighted_sum, floating, weight)
        for name, tensor in averaged.items():
            if not tensor.dtype.is_floating_point:
                # A copy: the update's tensors may be reused for the next one.
                value = tensor.detach().to("cpu", copy=True)
                previous = self._buffer_max.get(name)
                self._buffer_max[name] = (
                    value if previous is None else torch.maximum(previous, value)
                )
        self._total_weight += weight

    def _server_step(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The new global floating-point weights from the clients' means (which it may
        overwrite); ``self._global`` holds the round's starting weights when needed."""
        if self.server_learning_rate == 1.0:
            return means
        return {
            name: mean.sub_(self._global[name])
            .mul_(self.server_learning_rate)
            .add_(self._global[name])
            for name, mean in means.items()
        }

    def _aggregate(self) -> dict[str, torch.Tensor]:
        if self._shapes is None:  # finish_round calls this before it resets the shapes
            raise RuntimeError("_aggregate called outside finish_round")
        means = {
            name: self._weighted_sum.pop(name).div_(self._total_weight)
            for name, (_, dtype) in self._shapes.items()
            if dtype.is_floating_point and name not in self._kept_global
        }
        stepped = self._server_step(means)
        new_weights: dict[str, torch.Tensor] = {}
        for name, (_, dtype) in self._shapes.items():
            if name in self._kept_global:
                new_weights[name] = self._global[name]
            elif dtype.is_floating_point:
                new_weights[name] = stepped[name].to(dtype)
            else:
                new_weights[name] = self._buffer_max[name].to(dtype)
        return new_weights
