"""FedMedian: coordinate-wise median of the clients' weights. Yin, Chen, Ramchandran and
Bartlett, 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
Rates", arXiv:1803.01498.

Each coordinate of the new global weights is the median of the clients' values (the mean
of the two middle ones for an even count), so fewer than half the clients, however wrong
their updates, cannot drag it outside the honest clients' range. An order statistic: the
weighting does not apply, each client counts once.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from training.fl.strategies.kernels import coordinate_median
from training.fl.strategies.order_statistics import OrderStatisticStrategy

__all__ = ["FedMedian"]


class FedMedian(OrderStatisticStrategy):
    name: ClassVar[str] = "fedmedian"
    title: ClassVar[str] = "FedMedian"
    paper: ClassVar[str] = "Yin et al. 2018, arXiv:1803.01498"
    description: ClassVar[str] = (
        "Coordinate-wise median of the clients' models: robust to fewer than half the "
        "clients sending arbitrary updates."
    )

    def _combine(
        self, updates: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        return {name: coordinate_median([u[name] for u in updates]) for name in updates[0]}
