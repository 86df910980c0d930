"""The adaptive server optimizers of Reddi et al., 2021, "Adaptive Federated
Optimization", arXiv:2003.00295 (Algorithm 2): FedAdagrad, FedAdam and FedYogi.

Each round the server takes the clients' (weighted) mean and forms the pseudo-gradient
``delta = mean - x`` (x: the round's global weights), then, per coordinate::

    m <- beta_1 * m + (1 - beta_1) * delta                      (m starts at zero)
    v <- beta_2 * v + (1 - beta_2) * delta**2                   FedAdam
    v <- v - (1 - beta_2) * delta**2 * sign(v - delta**2)       FedYogi
    v <- v + delta**2                                           FedAdagrad
    x <- x + server_learning_rate * m / (sqrt(v) + tau)

``v`` starts at ``tau**2`` (the algorithm asks for ``v_{-1} >= tau**2``); as in the paper
there is no bias correction. ``m``, ``v`` and the number of rounds aggregated are the
strategy's state, carried from round to round. This module holds the shared step; each
optimizer has its own module.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch

from training.fl.strategies.base import Parameter, check_state_matches, round_counter
from training.fl.strategies.fedavg import FedAvg

__all__ = ["FedOpt", "fedopt_parameters"]

_FIRST = "m."
_SECOND = "v."
_ROUNDS = "rounds"


def fedopt_parameters(
    *, server_learning_rate: float, beta_1: float, beta_2: float | None, tau: float
) -> tuple[Parameter, ...]:
    """The declared parameters of one optimizer (``beta_2=None``: it has none)."""
    parameters = [
        Parameter(
            name="server_learning_rate",
            type="float",
            default=server_learning_rate,
            minimum=0.0,
            exclusive_minimum=True,
            maximum=10.0,
            description="Server learning rate (eta) of the adaptive step.",
        ),
        Parameter(
            name="beta_1",
            type="float",
            default=beta_1,
            minimum=0.0,
            maximum=1.0,
            exclusive_maximum=True,
            description="Decay of the first moment m of the pseudo-gradient.",
        ),
    ]
    if beta_2 is not None:
        parameters.append(
            Parameter(
                name="beta_2",
                type="float",
                default=beta_2,
                minimum=0.0,
                maximum=1.0,
                exclusive_maximum=True,
                description="Decay of the second moment v of the pseudo-gradient.",
            )
        )
    parameters.append(
        Parameter(
            name="tau",
            type="float",
            default=tau,
            minimum=0.0,
            exclusive_minimum=True,
            maximum=1.0,
            description="Adaptivity: added to sqrt(v); larger is closer to momentum SGD.",
        )
    )
    return tuple(parameters)


class FedOpt(FedAvg):
    """The server step shared by the three optimizers; they differ in :meth:`_second_moment`."""

    paper: ClassVar[str] = "Reddi et al. 2021, arXiv:2003.00295"

    def __init__(
        self,
        *,
        server_learning_rate: float,
        beta_1: float,
        beta_2: float,
        tau: float,
        weighting: str,
    ) -> None:
        super().__init__(server_learning_rate=server_learning_rate, weighting=weighting)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.tau = tau
        self._first: dict[str, torch.Tensor] = {}
        self._second: dict[str, torch.Tensor] = {}
        self._rounds = 0

    def _server_step_needs_global(self) -> bool:
        return True

    def _start(self, global_weights: Mapping[str, torch.Tensor]) -> None:
        check_state_matches(self.name, self._first, global_weights)
        check_state_matches(self.name, self._second, global_weights)
        super()._start(global_weights)

    @abstractmethod
    def _second_moment(self, previous: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        """The new v from the previous one and delta**2 (may overwrite both)."""

    def _server_step(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stepped = {}
        for name, mean in means.items():
            start = self._global[name]
            delta = mean.sub_(start)
            first = self._first.get(name)
            if first is None:
                first = torch.zeros_like(delta)
            first.mul_(self.beta_1).add_(delta, alpha=1 - self.beta_1)
            second = self._second.get(name)
            if second is None:
                second = torch.full_like(delta, self.tau**2)
            second = self._second_moment(second, delta.square_())
            self._first[name], self._second[name] = first, second
            step = second.sqrt().add_(self.tau)
            stepped[name] = (
                torch.div(first, step, out=delta).mul_(self.server_learning_rate).add_(start)
            )
        self._rounds += 1
        return stepped

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {_FIRST + name: m.clone() for name, m in self._first.items()}
        state.update({_SECOND + name: v.clone() for name, v in self._second.items()})
        state[_ROUNDS] = round_counter(self._rounds)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        first = {k.removeprefix(_FIRST): t for k, t in state.items() if k.startswith(_FIRST)}
        second = {k.removeprefix(_SECOND): t for k, t in state.items() if k.startswith(_SECOND)}
        unexpected = sorted(
            key for key in state if not key.startswith((_FIRST, _SECOND)) and key != _ROUNDS
        )
        if unexpected or first.keys() != second.keys():
            raise ValueError(
                f"strategy {self.name!r}: saved state with entries {sorted(state)} is not "
                "first and second moments per weight"
            )
        self._first = {name: t.detach().to("cpu", copy=True) for name, t in first.items()}
        self._second = {name: t.detach().to("cpu", copy=True) for name, t in second.items()}
        self._rounds = int(state[_ROUNDS]) if _ROUNDS in state else 0

    @property
    def rounds_aggregated(self) -> int:
        return self._rounds
