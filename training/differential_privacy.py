"""An experiment's differential-privacy settings applied: its strategy wrapped, its ε.

The engine (training/fl/privacy.py) knows nothing of the ledger; this module reads the
Experiment's fields: ``dp_clip``, ``dp_noise`` (z), ``dp_delta``, ``dp_at`` for client-level
DP-FedAvg, and ``local_dp_noise`` / ``local_dp_clip`` for DP-SGD in the clients' training.

Accounting (Opacus's RDP accountant, one step per round): the sampling rate is the clients
a round picks over the experiment's pool of sites, as configured (``clients_per_round`` or
``client_fraction``, see training/sampling.py); ε after round r is for r steps and
``dp_delta``. Clipping without noise gives no guarantee, and no ε is recorded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from training.models import Experiment, NoiseLocation
from training.sampling import clients_in_round

if TYPE_CHECKING:
    from training.fl.strategies import Strategy

# The engine's privacy (PyTorch, Opacus) is imported by the functions that apply it: the
# settings' summaries are also read by web processes, which do not load it.


def uses_client_level_dp(experiment: Experiment) -> bool:
    """Whether rounds are noised, so that each round spends privacy (ε is recorded)."""
    return experiment.dp_clip is not None and experiment.dp_noise > 0


def uses_local_dp_sgd(experiment: Experiment) -> bool:
    """Whether clients train with DP-SGD (the API takes its two settings together)."""
    return experiment.local_dp_noise is not None and experiment.local_dp_clip is not None


def uses_privacy(experiment: Experiment) -> bool:
    """Whether any DP setting is on: clipping, noise or local DP-SGD."""
    return (
        experiment.dp_clip is not None or experiment.dp_noise > 0 or uses_local_dp_sgd(experiment)
    )


def privacy_settings(experiment: Experiment) -> dict[str, Any] | None:
    """The experiment's DP settings as JSON (summaries, exports); None when all are off."""
    if not uses_privacy(experiment):
        return None
    return {
        "clip": experiment.dp_clip,
        "noise_multiplier": experiment.dp_noise,
        "delta": experiment.dp_delta,
        "noise_at": experiment.dp_at,
        "local_dp_sgd_noise_multiplier": experiment.local_dp_noise,
        "local_dp_sgd_clip": experiment.local_dp_clip,
    }


def client_sampling(experiment: Experiment) -> tuple[int, int]:
    """(clients a round picks, pool of sites) as the experiment is configured."""
    pool = experiment.sites.count()
    picked = clients_in_round(
        pool,
        clients_per_round=experiment.clients_per_round,
        client_fraction=experiment.client_fraction,
        min_clients=experiment.min_clients,
    )
    return picked, pool


def round_epsilon(experiment: Experiment, round_number: int) -> float | None:
    """ε for ``dp_delta`` after ``round_number`` rounds; None without client-level DP, and
    for δ = 0, where the Gaussian mechanism has no finite ε."""
    if not uses_client_level_dp(experiment) or not experiment.dp_delta > 0:
        return None
    picked, pool = client_sampling(experiment)
    if pool == 0:
        return None
    from training.fl.privacy import epsilon_spent

    return epsilon_spent(
        noise_multiplier=experiment.dp_noise,
        sample_rate=picked / pool,
        steps=round_number,
        delta=experiment.dp_delta,
    )


def with_privacy(
    strategy: Strategy, experiment: Experiment, *, round_number: int | None = None
) -> Strategy:
    """``strategy`` wrapped in the experiment's DP settings, or itself when it has none.

    ``round_number`` seeds the server's noise (with the experiment's seed) for aggregating
    that round; configuring clients needs none.
    """
    if not uses_privacy(experiment):
        return strategy
    from training.fl.privacy import DifferentiallyPrivate, server_noise_generator

    noise_at = experiment.dp_at
    expected_clients = None
    if noise_at == NoiseLocation.CLIENT:
        expected_clients, _ = client_sampling(experiment)
    local_dp_sgd = None
    if uses_local_dp_sgd(experiment):
        local_dp_sgd = {
            "noise_multiplier": experiment.local_dp_noise,
            "max_grad_norm": experiment.local_dp_clip,
        }
        if experiment.dp_delta > 0:  # else the clients report ε for their default δ
            local_dp_sgd["delta"] = experiment.dp_delta
    return DifferentiallyPrivate(
        strategy,
        clip_norm=experiment.dp_clip,
        noise_multiplier=experiment.dp_noise,
        generator=(
            server_noise_generator(experiment.seed, round_number)
            if round_number is not None
            else None
        ),
        noise_at=str(noise_at),
        expected_clients=expected_clients,
        local_dp_sgd=local_dp_sgd,
    )
