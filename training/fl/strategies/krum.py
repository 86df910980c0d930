"""Krum and Multi-Krum: Blanchard, El Mhamdi, Guerraoui and Stainer, 2017, "Machine
Learning with Adversaries: Byzantine Tolerant Gradient Descent", arXiv:1703.02757.

Each client's weights, as one vector, are scored by the sum of squared distances to its
``n - f - 2`` nearest other clients (n: clients in the round, f: Byzantine clients to
tolerate; Krum needs ``n > 2f + 2``). Krum's new global model is the client with the
lowest score; Multi-Krum averages the ``m`` lowest-scoring clients under the strategy's
weighting (``m = 0``: ``n - f``, the paper's choice). The distances between weights are
those between updates, since every client starts from the same global weights.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from training.fl.strategies.base import Parameter
from training.fl.strategies.kernels import flatten_weights, krum_select, weighted_mean
from training.fl.strategies.order_statistics import OrderStatisticStrategy

__all__ = ["Krum", "MultiKrum"]

_BYZANTINE = Parameter(
    name="f",
    type="int",
    default=1,
    minimum=0,
    maximum=1000,
    description="Byzantine clients to tolerate; a round needs more than 2f + 2 updates.",
)


class Krum(OrderStatisticStrategy):
    name: ClassVar[str] = "krum"
    title: ClassVar[str] = "Krum"
    paper: ClassVar[str] = "Blanchard et al. 2017, arXiv:1703.02757"
    description: ClassVar[str] = (
        "The new global model is the one client model closest to its n - f - 2 nearest "
        "neighbours: robust to f Byzantine clients."
    )
    parameters: ClassVar[tuple[Parameter, ...]] = (_BYZANTINE,)

    def __init__(self, *, f: int = 1, weighting: str = "samples") -> None:
        super().__init__(weighting=weighting)
        self.f: int = int(Krum.validate_params({"f": f})["f"])
        # Positions, in arrival order, of the updates the last round selected.
        self.selected: list[int] = []

    def _num_selected(self, count: int) -> int:
        return 1

    def _combine(
        self, updates: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> dict[str, torch.Tensor]:
        count = len(updates)
        if count <= 2 * self.f + 2:
            raise ValueError(
                f"{self.name} with f={self.f} needs at least {2 * self.f + 3} client updates, "
                f"got {count}; lower f or wait for more clients per round"
            )
        self.selected = krum_select(
            [flatten_weights(update) for update in updates],
            num_byzantine=self.f,
            num_selected=self._num_selected(count),
        )
        picked = [updates[index] for index in self.selected]
        picked_weights = [weights[index] for index in self.selected]
        return {
            name: weighted_mean([update[name] for update in picked], picked_weights)
            for name in updates[0]
        }


class MultiKrum(Krum):
    name: ClassVar[str] = "multikrum"
    title: ClassVar[str] = "Multi-Krum"
    description: ClassVar[str] = (
        "Averages the m client models with the best Krum scores: Krum's robustness with "
        "more of the honest clients' information."
    )
    parameters: ClassVar[tuple[Parameter, ...]] = (
        _BYZANTINE,
        Parameter(
            name="m",
            type="int",
            default=0,
            minimum=0,
            maximum=1000,
            description="Client models averaged (0: n - f); at most the round's updates.",
        ),
    )

    def __init__(self, *, f: int = 1, m: int = 0, weighting: str = "samples") -> None:
        params = MultiKrum.validate_params({"f": f, "m": m})
        super().__init__(f=int(params["f"]), weighting=weighting)
        self.m = int(params["m"])

    def _num_selected(self, count: int) -> int:
        if self.m > count:
            raise ValueError(
                f"multikrum with m={self.m} needs at least {self.m} client updates, got {count}"
            )
        return self.m or count - self.f
