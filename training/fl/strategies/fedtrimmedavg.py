"""FedTrimmedAvg: coordinate-wise trimmed mean of the clients' weights. Yin, Chen,
Ramchandran and Bartlett, 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", arXiv:1803.01498.

For each coordinate, the ``floor(beta * n)`` largest and smallest client values are
dropped and the rest averaged (n: clients in the round). With fewer than ``1 / beta``
clients nothing is trimmed. An order statistic: the weighting does not apply.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from training.fl.strategies.base import Parameter
from training.fl.strategies.kernels import trimmed_mean
from training.fl.strategies.order_statistics import OrderStatisticStrategy

__all__ = ["FedTrimmedAvg"]


class FedTrimmedAvg(OrderStatisticStrategy):
    name: ClassVar[str] = "fedtrimmedavg"
    title: ClassVar[str] = "FedTrimmedAvg"
    paper: ClassVar[str] = "Yin et al. 2018, arXiv:1803.01498"
    description: ClassVar[str] = (
        "Coordinate-wise trimmed mean: each coordinate drops the beta share of largest and "
        "of smallest client values, then averages the rest."
    )
    parameters: ClassVar[tuple[Parameter, ...]] = (
        Parameter(
            name="beta",
            type="float",
            default=0.2,
            minimum=0.0,
            maximum=0.5,
            exclusive_maximum=True,
            description="Share of clients trimmed at each end, per coordinate.",
        ),
    )

    def __init__(self, *, beta: float = 0.2, weighting: str = "samples") -> None:
        super().__init__(weighting=weighting)
        self.beta: float = FedTrimmedAvg.validate_params({"beta": beta})["beta"]

    def _combine(
        self, updates: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        return {
            name: trimmed_mean([u[name] for u in updates], trim_ratio=self.beta)
            for name in updates[0]
        }
