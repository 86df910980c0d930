"""FedAdagrad: Reddi et al., 2021, "Adaptive Federated Optimization", arXiv:2003.00295.

Adagrad on the server over the clients' pseudo-gradient (see :mod:`.fedopt` for the
step): ``v <- v + delta**2``, so each coordinate's step shrinks as its squared
pseudo-gradients add up. Adagrad has no second-moment decay, hence no ``beta_2``;
``beta_1`` defaults to 0 (no momentum), as Adagrad itself.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from training.fl.strategies.base import Parameter
from training.fl.strategies.fedopt import FedOpt, fedopt_parameters

__all__ = ["FedAdagrad"]


class FedAdagrad(FedOpt):
    name: ClassVar[str] = "fedadagrad"
    title: ClassVar[str] = "FedAdagrad"
    description: ClassVar[str] = (
        "Adagrad on the server: each coordinate's step is divided by the root of its "
        "squared pseudo-gradients summed over rounds."
    )
    parameters: ClassVar[tuple[Parameter, ...]] = fedopt_parameters(
        server_learning_rate=0.01, beta_1=0.0, beta_2=None, tau=1e-3
    )

    def __init__(
        self,
        *,
        server_learning_rate: float = 0.01,
        beta_1: float = 0.0,
        tau: float = 1e-3,
        weighting: str = "samples",
    ) -> None:
        params = FedAdagrad.validate_params(
            {"server_learning_rate": server_learning_rate, "beta_1": beta_1, "tau": tau}
        )
        # beta_2 plays no part in Adagrad's accumulation.
        super().__init__(weighting=weighting, beta_2=0.0, **params)

    def _second_moment(self, previous: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        return previous.add_(squared)
