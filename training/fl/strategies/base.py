"""The server-side round lifecycle that every aggregation strategy follows.

A round is ``begin_round(global_weights)``, then ``accumulate(update, ...)`` once per
client update as it arrives, then ``finish_round()`` for the new global weights. Updates
are full client weights (not deltas) with the same names and shapes as the global ones.
The base class validates every update and keeps sample-weighted means of the clients'
numeric metrics; subclasses only combine tensors.

A strategy declares its user-facing parameters as :class:`Parameter` entries; validation,
defaults and the description served to the API, the form and the command line all come
from that one declaration. ``weighting`` says how averaging strategies weigh each update:
``"samples"`` by the client's number of training samples, ``"uniform"`` all alike.

What a strategy carries from one round to the next (momentum, moments, control variates)
is its :meth:`Strategy.state_dict`, which the server persists after every round and loads
before the next, since any worker process may aggregate the next round; what every client
of the next round needs is its :meth:`Strategy.client_payload`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from training.fl.weights import all_finite

__all__ = [
    "WEIGHTINGS",
    "Parameter",
    "Strategy",
    "StrategyContext",
    "check_state_matches",
    "round_counter",
    "validate_weighting",
]

WEIGHTINGS = ("samples", "uniform")


def validate_weighting(weighting: object) -> str:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
    return str(weighting)


@dataclass(frozen=True, kw_only=True)
class Parameter:
    """One user-facing strategy parameter: its type, default and admissible range."""

    name: str
    type: Literal["float", "int"]
    default: float | int
    description: str
    minimum: float | int | None = None
    maximum: float | int | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False

    def __post_init__(self) -> None:
        # A declaration whose own default fails its checks is a programming error.
        self.validate(self.default, strategy="(declaration)")

    def validate(self, value: object, *, strategy: str) -> float | int:
        """``value`` as this parameter's type, or ValueError naming the parameter."""
        where = f"strategy {strategy!r}: parameter {self.name!r}"
        if self.type == "int":
            # JSON has one number type: 2.0 is accepted as the integer 2, 2.5 is not.
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{where} must be an integer, got {value!r}")
            number: float | int = value
        else:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{where} must be a number, got {value!r}")
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"{where} must be a finite number, got {value!r}")
        if self.minimum is not None:
            if self.exclusive_minimum and not number > self.minimum:
                raise ValueError(f"{where} must be greater than {self.minimum}, got {value!r}")
            if not self.exclusive_minimum and not number >= self.minimum:
                raise ValueError(f"{where} must be at least {self.minimum}, got {value!r}")
        if self.maximum is not None:
            if self.exclusive_maximum and not number < self.maximum:
                raise ValueError(f"{where} must be less than {self.maximum}, got {value!r}")
            if not self.exclusive_maximum and not number <= self.maximum:
                raise ValueError(f"{where} must be at most {self.maximum}, got {value!r}")
        return number

    def describe(self) -> dict[str, Any]:
        """JSON-able description (JSON Schema's names for the bounds)."""
        description: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "default": self.default,
            "description": self.description,
        }
        if self.minimum is not None:
            description["minimum"] = self.minimum
            description["exclusive_minimum"] = self.exclusive_minimum
        if self.maximum is not None:
            description["maximum"] = self.maximum
            description["exclusive_maximum"] = self.exclusive_maximum
        return description


def check_state_matches(
    strategy: str,
    saved: Mapping[str, torch.Tensor],
    global_weights: Mapping[str, torch.Tensor],
) -> None:
    """Refuse per-weight state (keyed by weight name) saved for another model."""
    for name, tensor in saved.items():
        weight = global_weights.get(name)
        if weight is None or not weight.dtype.is_floating_point or weight.shape != tensor.shape:
            raise ValueError(
                f"strategy {strategy!r}: its saved state for {name!r} does not match the "
                "model's weights; the state belongs to another network"
            )


def round_counter(value: int) -> torch.Tensor:
    """The number of rounds a stateful strategy has aggregated, as a 0-d tensor."""
    return torch.tensor(value, dtype=torch.int64)


@dataclass(frozen=True, kw_only=True)
class StrategyContext:
    """What the server knows about an experiment that some strategies need besides their
    parameters: the size of the site pool (SCAFFOLD) and the state_dict names of the
    network's batch-norm layers (FedBN). Not user settings, so not in the description."""

    num_sites: int | None = None
    batch_norm_parameters: Sequence[str] = ()


class Strategy(ABC):
    """Aggregates client updates into new global weights, one round at a time."""

    name: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str]
    description: ClassVar[str]
    parameters: ClassVar[tuple[Parameter, ...]] = ()

    def __init__(self, *, weighting: str = "samples") -> None:
        self.weighting = validate_weighting(weighting)
        self._shapes: dict[str, tuple[torch.Size, torch.dtype]] | None = None
        self._num_updates = 0
        self._num_samples = 0
        self._metric_sums: dict[str, float] = {}
        self._metric_weights: dict[str, int] = {}
        self.round_metrics: dict[str, float] = {}

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Check user parameters against the declared ones; return them with defaults.

        ValueError names the unknown or invalid parameter."""
        declared = {parameter.name: parameter for parameter in cls.parameters}
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise ValueError(
                f"strategy {cls.name!r} got unknown parameters {unknown}; "
                f"accepted: {sorted(declared)}"
            )
        return {
            name: parameter.validate(params.get(name, parameter.default), strategy=cls.name)
            for name, parameter in declared.items()
        }

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "title": cls.title,
            "paper": cls.paper,
            "description": cls.description,
            "parameters": [parameter.describe() for parameter in cls.parameters],
        }

    @classmethod
    def build(
        cls, params: Mapping[str, Any], *, weighting: str, context: StrategyContext
    ) -> Strategy:
        """An instance from user ``params``; strategies that need the server's ``context``
        take what they need from it."""
        return cls(weighting=weighting, **cls.validate_params(params))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What this strategy carries to the next round; empty for stateless strategies."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take back what :meth:`state_dict` returned after the previous round."""
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state, got {sorted(state)}")

    def client_payload(self) -> dict[str, torch.Tensor]:
        """Tensors every client of the next round receives; empty for most strategies."""
        return {}

    def update_weight(self, num_samples: int) -> float:
        """How much one update counts in an average, under this strategy's weighting."""
        return float(num_samples) if self.weighting == "samples" else 1.0

    def configure_client(self, *, round_number: int, site: str) -> dict[str, Any]:
        """The options sent with a client's task in round ``round_number`` (JSON values),
        which the client applies to its local training. Plain averaging sends none."""
        return {}

    @property
    def num_updates(self) -> int:
        """Updates accumulated in the current round."""
        return self._num_updates

    def begin_round(self, global_weights: Mapping[str, torch.Tensor]) -> None:
        """Start a round from ``global_weights``, discarding anything accumulated before."""
        if not global_weights:
            raise ValueError("global weights are empty")
        self._shapes = {name: (t.shape, t.dtype) for name, t in global_weights.items()}
        self._num_updates = 0
        self._num_samples = 0
        self._metric_sums.clear()
        self._metric_weights.clear()
        self._start(global_weights)

    def accumulate(
        self,
        update: Mapping[str, torch.Tensor],
        *,
        num_samples: int,
        metrics: Mapping[str, Any] | None = None,
        extras: Mapping[str, Any] | None = None,
    ) -> None:
        """Fold one client's weights, trained on ``num_samples`` samples, into the round.

        ``extras`` are the per-client results the client reported beside its weights (what
        a strategy's :meth:`configure_client` options asked it for)."""
        if self._shapes is None:
            raise RuntimeError("accumulate called before begin_round")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self._check_update(update, self._shapes)
        # Extras first: a strategy refuses a client's missing extras before taking its weights.
        self._receive_extras(extras or {}, num_samples)
        self._add(update, num_samples)
        self._num_updates += 1
        self._num_samples += num_samples
        for key, value in (metrics or {}).items():
            # Only plain finite numbers average meaningfully; other entries are ignored.
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                self._metric_sums[key] = self._metric_sums.get(key, 0.0) + value * num_samples
                self._metric_weights[key] = self._metric_weights.get(key, 0) + num_samples

    def finish_round(self) -> dict[str, torch.Tensor]:
        """The new global weights (on the CPU, in the global weights' dtypes)."""
        if self._shapes is None:
            raise RuntimeError("finish_round called before begin_round")
        if self._num_updates == 0:
            raise RuntimeError("finish_round called before any update was accumulated")
        self.round_metrics = {
            key: total / self._metric_weights[key] for key, total in self._metric_sums.items()
        }
        self.round_metrics["num_clients"] = self._num_updates
        self.round_metrics["num_samples"] = self._num_samples
        new_weights = self._aggregate()
        self._shapes = None
        return new_weights

    @staticmethod
    def _check_update(
        update: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[torch.Size, torch.dtype]]
    ) -> None:
        if update.keys() != shapes.keys():
            missing = sorted(shapes.keys() - update.keys())
            extra = sorted(update.keys() - shapes.keys())
            raise ValueError(f"update does not match the model: missing {missing}, extra {extra}")
        for name, tensor in update.items():
            shape, dtype = shapes[name]
            if tensor.shape != shape:
                raise ValueError(
                    f"update {name!r} has shape {tuple(tensor.shape)}, not {tuple(shape)}"
                )
            if tensor.dtype.is_floating_point != dtype.is_floating_point:
                raise ValueError(f"update {name!r} has dtype {tensor.dtype}, expected {dtype}")
            if tensor.dtype.is_floating_point and not all_finite(tensor):
                raise ValueError(f"update {name!r} contains NaN or infinite values")

    @abstractmethod
    def _start(self, global_weights: Mapping[str, torch.Tensor]) -> None:
        """Reset the running state for a new round."""

    @abstractmethod
    def _add(self, update: Mapping[str, torch.Tensor], num_samples: int) -> None:
        """Fold one validated update into the running state."""

    def _receive_extras(self, extras: Mapping[str, Any], num_samples: int) -> None:  # noqa: B027 - optional hook
        """Take one client's extra results; strategies that ask for none ignore them."""

    @abstractmethod
    def _aggregate(self) -> dict[str, torch.Tensor]:
        """Turn the running state into new global weights."""
