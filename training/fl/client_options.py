"""The per-client options a strategy may send with a task, read and checked.

A strategy sets them in ``Strategy.configure_client``; they travel as JSON in
``ClientTask.options``. Each one names what the client does differently, never which
strategy it serves:

- ``proximal_mu`` (FedProx, Li et al. 2020, arXiv:1812.06127): mu/2 * ||w - w_global||^2
  added to the local loss.
- ``local_parameters`` (FedBN, Li et al. 2021, arXiv:2102.07623): state_dict entries
  (batch-norm weights and statistics) that stay at the site, kept in its site state.
- ``scaffold`` (SCAFFOLD, Karimireddy et al. 2020, arXiv:1910.06378, option II): the
  gradients are corrected by c - c_i, and the site keeps its control variate c_i.
- ``dp_clip`` and ``dp_noise_std``: client-level differential privacy at the client, the
  update clipped in L2 norm and Gaussian noise added before it leaves the site.
- ``dp_sgd``: per-sample DP-SGD in local training (``noise_multiplier``,
  ``max_grad_norm``, and the ``delta`` the local ε is reported for).
- ``models``: in an evaluate task, the labels of the models to evaluate ("global" or a
  site's slug).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from training.fl.local import DpSgd

__all__ = ["DEFAULT_LOCAL_DP_DELTA", "SUPPORTED_OPTIONS", "ClientOptions"]

SUPPORTED_OPTIONS: frozenset[str] = frozenset(
    {"proximal_mu", "local_parameters", "scaffold", "dp_clip", "dp_noise_std", "dp_sgd", "models"}
)
DEFAULT_LOCAL_DP_DELTA = 1e-5


def _number(options: Mapping[str, Any], name: str, *, positive: bool) -> float | None:
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"client option {name!r} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"client option {name!r} must be {bound}, got {value!r}")
    return float(value)


def _names(options: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = options.get(name, [])
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"client option {name!r} must be a list of names, got {value!r}")
    if not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"client option {name!r} must hold non-empty strings only")
    return tuple(value)


@dataclass(frozen=True, kw_only=True)
class ClientOptions:
    proximal_mu: float = 0.0
    local_parameters: tuple[str, ...] = ()
    scaffold: bool = False
    dp_clip: float | None = None
    dp_noise_std: float = 0.0
    dp_sgd: DpSgd | None = None
    local_dp_delta: float = DEFAULT_LOCAL_DP_DELTA
    models: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> ClientOptions:
        """The options in ``options``; ValueError naming the one that is wrong."""
        scaffold = options.get("scaffold", False)
        if not isinstance(scaffold, bool):
            raise ValueError(f"client option 'scaffold' must be true or false, got {scaffold!r}")
        dp_clip = _number(options, "dp_clip", positive=True)
        dp_noise_std = _number(options, "dp_noise_std", positive=False) or 0.0
        if dp_noise_std and dp_clip is None:
            raise ValueError("client option 'dp_noise_std' needs 'dp_clip': noise is calibrated")
        dp_sgd, delta = None, DEFAULT_LOCAL_DP_DELTA
        if "dp_sgd" in options:
            described = options["dp_sgd"]
            if not isinstance(described, Mapping):
                raise ValueError("client option 'dp_sgd' must be an object")
            unknown = sorted(set(described) - {"noise_multiplier", "max_grad_norm", "delta"})
            if unknown:
                raise ValueError(f"client option 'dp_sgd' has unknown settings {unknown}")
            noise = _number(described, "noise_multiplier", positive=False)
            clip = _number(described, "max_grad_norm", positive=True)
            if noise is None or clip is None:
                raise ValueError("client option 'dp_sgd' needs noise_multiplier and max_grad_norm")
            dp_sgd = DpSgd(noise_multiplier=noise, max_grad_norm=clip)
            delta = _number(described, "delta", positive=True) or DEFAULT_LOCAL_DP_DELTA
            if not delta < 1:
                raise ValueError(f"client option 'dp_sgd' delta must be below 1, got {delta}")
        return cls(
            proximal_mu=_number(options, "proximal_mu", positive=False) or 0.0,
            local_parameters=_names(options, "local_parameters"),
            scaffold=scaffold,
            dp_clip=dp_clip,
            dp_noise_std=dp_noise_std,
            dp_sgd=dp_sgd,
            local_dp_delta=delta,
            models=_names(options, "models"),
        )
