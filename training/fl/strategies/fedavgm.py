"""FedAvg with server momentum (FedAvgM): Hsu, Qi and Brown, 2019, arXiv:1909.06335.

Each round the server treats the difference between the global weights and the clients'
(weighted) mean as a gradient, the pseudo-gradient ``g = x - mean``, and takes a step of
heavy-ball momentum on it::

    v <- server_momentum * v + g        (v starts at zero)
    x <- x - server_learning_rate * v

With ``server_momentum = 0`` and ``server_learning_rate = 1`` this is FedAvg. The
momentum ``v`` is the strategy's state, carried from round to round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from training.fl.strategies.base import Parameter, check_state_matches
from training.fl.strategies.fedavg import FedAvg

__all__ = ["FedAvgM"]

_MOMENTUM = "momentum."


class FedAvgM(FedAvg):
    name: ClassVar[str] = "fedavgm"
    title: ClassVar[str] = "FedAvgM"
    paper: ClassVar[str] = "Hsu et al. 2019, arXiv:1909.06335"
    description: ClassVar[str] = (
        "FedAvg whose server step keeps heavy-ball momentum over rounds on the "
        "pseudo-gradient (global model minus the clients' mean)."
    )
    parameters: ClassVar[tuple[Parameter, ...]] = (
        Parameter(
            name="server_learning_rate",
            type="float",
            default=1.0,
            minimum=0.0,
            exclusive_minimum=True,
            maximum=10.0,
            description="Server step size applied to the momentum.",
        ),
        Parameter(
            name="server_momentum",
            type="float",
            default=0.9,
            minimum=0.0,
            maximum=1.0,
            exclusive_maximum=True,
            description="Momentum factor: the share of last round's step carried over.",
        ),
    )

    def __init__(
        self,
        *,
        server_learning_rate: float = 1.0,
        server_momentum: float = 0.9,
        weighting: str = "samples",
    ) -> None:
        params = FedAvgM.validate_params(
            {"server_learning_rate": server_learning_rate, "server_momentum": server_momentum}
        )
        super().__init__(server_learning_rate=params["server_learning_rate"], weighting=weighting)
        self.server_momentum: float = params["server_momentum"]
        self._momentum: dict[str, torch.Tensor] = {}

    def _server_step_needs_global(self) -> bool:
        return True

    def _start(self, global_weights: Mapping[str, torch.Tensor]) -> None:
        check_state_matches(self.name, self._momentum, global_weights)
        super()._start(global_weights)

    def _server_step(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stepped = {}
        for name, mean in means.items():
            start = self._global[name]
            pseudo_gradient = mean.neg_().add_(start)
            previous = self._momentum.get(name)
            momentum = (
                pseudo_gradient.clone()
                if previous is None
                else previous.mul_(self.server_momentum).add_(pseudo_gradient)
            )
            self._momentum[name] = momentum
            stepped[name] = pseudo_gradient.copy_(start).sub_(
                momentum, alpha=self.server_learning_rate
            )
        return stepped

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {_MOMENTUM + name: v.clone() for name, v in self._momentum.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        unexpected = sorted(key for key in state if not key.startswith(_MOMENTUM))
        if unexpected:
            raise ValueError(f"strategy {self.name!r} does not keep state {unexpected}")
        self._momentum = {
            key.removeprefix(_MOMENTUM): tensor.detach().to("cpu", copy=True)
            for key, tensor in state.items()
        }
