"""FedAdam: Reddi et al., 2021, "Adaptive Federated Optimization", arXiv:2003.00295.

Adam on the server over the clients' pseudo-gradient (see :mod:`.fedopt` for the step):
``v <- beta_2 * v + (1 - beta_2) * delta**2``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from training.fl.strategies.base import Parameter
from training.fl.strategies.fedopt import FedOpt, fedopt_parameters

__all__ = ["FedAdam"]


class FedAdam(FedOpt):
    name: ClassVar[str] = "fedadam"
    title: ClassVar[str] = "FedAdam"
    description: ClassVar[str] = (
        "Adam on the server: the clients' mean update is a pseudo-gradient whose first and "
        "second moments, kept over rounds, scale each coordinate's step."
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
            **FedAdam.validate_params(
                {
                    "server_learning_rate": server_learning_rate,
                    "beta_1": beta_1,
                    "beta_2": beta_2,
                    "tau": tau,
                }
            ),
        )

    def _second_moment(self, previous: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        return previous.mul_(self.beta_2).add_(squared, alpha=1 - self.beta_2)
