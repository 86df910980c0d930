"""FedYogi: Reddi et al., 2021, "Adaptive Federated Optimization", arXiv:2003.00295.

Yogi (Zaheer et al., 2018) on the server over the clients' pseudo-gradient (see
:mod:`.fedopt`): v grows or shrinks by at most (1 - beta_2) * delta**2 per round,
``v <- v - (1 - beta_2) * delta**2 * sign(v - delta**2)``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from training.fl.strategies.base import Parameter
from training.fl.strategies.fedopt import FedOpt, fedopt_parameters

__all__ = ["FedYogi"]


class FedYogi(FedOpt):
    name: ClassVar[str] = "fedyogi"
    title: ClassVar[str] = "FedYogi"
    description: ClassVar[str] = (
        "Yogi on the server: like FedAdam, but the second moment changes additively, by at "
        "most (1 - beta_2) * delta^2 a round, which keeps steps from growing suddenly."
    )
    parameters: ClassVar[tuple[Parameter, ...]] = fedopt_parameters(
        server_learning_rate=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3
    )

    def __init__(
        self,
        *,
        server_learning_rate: float = 0.01,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        weighting: str = "samples",
    ) -> None:
        super().__init__(
            weighting=weighting,
            **FedYogi.validate_params(
                {
                    "server_learning_rate": server_learning_rate,
                    "beta_1": beta_1,
                    "beta_2": beta_2,
                    "tau": tau,
                }
            ),
        )

    def _second_moment(self, previous: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        sign = torch.sign(previous - squared)
        return previous.sub_(squared.mul_(sign), alpha=1 - self.beta_2)
