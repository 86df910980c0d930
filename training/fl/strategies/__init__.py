"""Aggregation strategies, built by name, each described by its declared parameters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from training.fl.strategies.base import (
    WEIGHTINGS,
    Parameter,
    Strategy,
    StrategyContext,
    validate_weighting,
)
from training.fl.strategies.fedadagrad import FedAdagrad
from training.fl.strategies.fedadam import FedAdam
from training.fl.strategies.fedavg import FedAvg
from training.fl.strategies.fedavgm import FedAvgM
from training.fl.strategies.fedbn import FedBN, batch_norm_parameters
from training.fl.strategies.fedmedian import FedMedian
from training.fl.strategies.fedprox import FedProx
from training.fl.strategies.fedtrimmedavg import FedTrimmedAvg
from training.fl.strategies.fedyogi import FedYogi
from training.fl.strategies.krum import Krum, MultiKrum
from training.fl.strategies.scaffold import Scaffold

__all__ = [
    "WEIGHTINGS",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedBN",
    "FedMedian",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "Krum",
    "MultiKrum",
    "Parameter",
    "Scaffold",
    "Strategy",
    "StrategyContext",
    "available_strategies",
    "batch_norm_parameters",
    "build_strategy",
    "describe_strategies",
    "strategy_class",
    "validate_strategy_params",
]

_REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAdagrad,
        FedAdam,
        FedAvg,
        FedAvgM,
        FedBN,
        FedMedian,
        FedProx,
        FedTrimmedAvg,
        FedYogi,
        Krum,
        MultiKrum,
        Scaffold,
    )
}


def available_strategies() -> list[str]:
    return sorted(_REGISTRY)


def strategy_class(name: str) -> type[Strategy]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {available_strategies()}")
    return _REGISTRY[name]


def describe_strategies() -> list[dict[str, Any]]:
    """Every strategy with its paper and parameters (type, default, range), sorted by name:
    what the API, the experiment form and the command line show and validate against."""
    return [_REGISTRY[name].describe() for name in available_strategies()]


def validate_strategy_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters ``build_strategy(name, ...)`` would use, defaults filled in.

    Raises ValueError naming the unknown strategy, the unknown parameters or the invalid one.
    """
    return strategy_class(name).validate_params(params)


def build_strategy(
    name: str,
    *,
    weighting: str = "samples",
    context: StrategyContext | None = None,
    **params: Any,
) -> Strategy:
    """A strategy from its name and user parameters. ``weighting`` is "samples" or
    "uniform"; ``context`` carries what the server knows that some strategies need."""
    return strategy_class(name).build(
        params, weighting=validate_weighting(weighting), context=context or StrategyContext()
    )
