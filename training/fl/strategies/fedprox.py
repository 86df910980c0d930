"""FedProx: Li et al., 2020, "Federated Optimization in Heterogeneous Networks",
arXiv:1812.06127.

Each client minimises its loss plus the proximal term ``mu / 2 * ||w - w_global||^2``,
which keeps its weights near the round's global weights when sites' data differ. The
term lives entirely in the client's training, which this strategy asks for through the
client option ``{"proximal_mu": mu}``; on the server FedProx is FedAvg, unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

from training.fl.strategies.base import Parameter
from training.fl.strategies.fedavg import FedAvg

__all__ = ["FedProx"]


class FedProx(FedAvg):
    name: ClassVar[str] = "fedprox"
    title: ClassVar[str] = "FedProx"
    paper: ClassVar[str] = "Li et al. 2020, arXiv:1812.06127"
    description: ClassVar[str] = (
        "FedAvg whose clients add a proximal term mu/2 * ||w - w_global||^2 to their loss, "
        "limiting how far local training drifts on heterogeneous data."
    )
    parameters: ClassVar[tuple[Parameter, ...]] = (
        Parameter(
            name="mu",
            type="float",
            default=0.01,
            minimum=0.0,
            maximum=10.0,
            description="Weight of the proximal term in each client's loss (0: FedAvg).",
        ),
        *FedAvg.parameters,
    )

    def __init__(
        self, *, mu: float = 0.01, server_learning_rate: float = 1.0, weighting: str = "samples"
    ) -> None:
        params = FedProx.validate_params({"mu": mu, "server_learning_rate": server_learning_rate})
        super().__init__(server_learning_rate=params["server_learning_rate"], weighting=weighting)
        self.mu: float = params["mu"]

    def configure_client(self, *, round_number: int, site: str) -> dict[str, Any]:
        return {"proximal_mu": self.mu}
