"""Aggregation strategies, built by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from training.fl.strategies.base import Strategy
from training.fl.strategies.fedavg import FedAvg

__all__ = [
    "FedAvg",
    "Strategy",
    "available_strategies",
    "build_strategy",
    "validate_strategy_params",
]

_REGISTRY: dict[str, type[Strategy]] = {FedAvg.name: FedAvg}


def available_strategies() -> list[str]:
    return sorted(_REGISTRY)


def _strategy_class(name: str) -> type[Strategy]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {available_strategies()}")
    return _REGISTRY[name]


def validate_strategy_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters ``build_strategy(name, ...)`` would use, defaults filled in.

    Raises ValueError for an unknown strategy, unknown parameters or invalid values.
    """
    return _strategy_class(name).validate_params(params)


def build_strategy(name: str, **params: Any) -> Strategy:
    cls = _strategy_class(name)
    return cls(**cls.validate_params(params))
