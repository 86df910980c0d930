"""FedBN: Li, Jiang, Zhang, Kamp and Dou, 2021, "FedBN: Federated Learning on Non-IID
Features via Local Batch Normalization", arXiv:2102.07623.

Batch-norm layers stay at the sites: each client keeps its own batch-norm weights, biases
and running statistics, and the server averages everything else as FedAvg does. This
personalises the model to each site's feature distribution (a scanner's intensities).

Which state_dict entries are batch-norm ones comes from the server, which builds the
network (:func:`batch_norm_parameters`), not from the weights' names: names like
``running_mean`` are a convention of PyTorch's modules, not a guarantee, and a network
may name its own buffers that way. The strategy sends those names to every client
(``{"local_parameters": [...]}``) and leaves them out of averaging: the global model
keeps the values it started with there (the initial ones), while each site trains and
evaluates with its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from training.fl.strategies.base import Parameter, Strategy, StrategyContext
from training.fl.strategies.fedavg import FedAvg

__all__ = ["FedBN", "batch_norm_parameters"]


def batch_norm_parameters(model: nn.Module) -> list[str]:
    """The state_dict names of ``model``'s batch-norm layers (weights, biases, running
    statistics and batch counters), in state_dict order."""
    names: list[str] = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            prefix = f"{module_name}." if module_name else ""
            names.extend(prefix + entry for entry in module.state_dict())
    return names


class FedBN(FedAvg):
    name: ClassVar[str] = "fedbn"
    title: ClassVar[str] = "FedBN"
    paper: ClassVar[str] = "Li et al. 2021, arXiv:2102.07623"
    description: ClassVar[str] = (
        "FedAvg that keeps batch-norm layers local to each site (personalization for "
        "sites whose images differ, e.g. by scanner); the rest is averaged."
    )
    parameters: ClassVar[tuple[Parameter, ...]] = ()

    def __init__(self, *, local_parameters: Sequence[str], weighting: str = "samples") -> None:
        super().__init__(weighting=weighting)
        if isinstance(local_parameters, str) or not all(
            isinstance(name, str) for name in local_parameters
        ):
            raise ValueError("local_parameters must be a list of state_dict names")
        self.local_parameters: list[str] = list(dict.fromkeys(local_parameters))
        self._kept_global = frozenset(self.local_parameters)

    @classmethod
    def build(
        cls, params: Mapping[str, Any], *, weighting: str, context: StrategyContext
    ) -> Strategy:
        cls.validate_params(params)
        return cls(local_parameters=context.batch_norm_parameters, weighting=weighting)

    def configure_client(self, *, round_number: int, site: str) -> dict[str, Any]:
        return {"local_parameters": list(self.local_parameters)}

    def _start(self, global_weights: Mapping[str, torch.Tensor]) -> None:
        unknown = sorted(self._kept_global - global_weights.keys())
        if unknown:
            raise ValueError(f"fedbn: local parameters {unknown} are not weights of the model")
        super()._start(global_weights)
