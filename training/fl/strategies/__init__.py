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
from training.fl.strategies.fedavg import FedAvg

__all__ = [
    "WEIGHTINGS",
    "FedAvg",
    "Parameter",
    "Strategy",
    "StrategyContext",
    "available_strategies",
    "build_strategy",
    "describe_strategies",
    "validate_strategy_params",
]

_REGISTRY: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg,)}


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
