"""A single-process federated simulation: every client trains in turn on one model.

Reference loop for tests and benchmarks; the Celery tasks run the same steps
(``train_local`` per client, ``Strategy`` on the server) across processes. Client ``k``
trains with ``client_seed(config.seed, k)`` and, in round ``r``, ``start_epoch = r *
config.epochs``, so a run is reproducible from its seed alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from training.fl.local import LocalResult, Sample, TrainConfig, client_seed, evaluate, train_local
from training.fl.strategies import FedAvg, Strategy

__all__ = ["RoundSummary", "SimulationResult", "run_simulation"]


@dataclass(frozen=True, kw_only=True)
class RoundSummary:
    """``train_metrics`` are the strategy's sample-weighted client metrics."""

    round_index: int
    clients: list[LocalResult]
    train_metrics: dict[str, float]
    eval_metrics: dict[str, Any] | None


@dataclass(frozen=True, kw_only=True)
class SimulationResult:
    rounds: list[RoundSummary]
    final_weights: dict[str, torch.Tensor]


def run_simulation(
    *,
    model: nn.Module,
    dataset: Dataset[Sample],
    partitions: Sequence[Sequence[int]],
    rounds: int,
    config: TrainConfig,
    strategy: Strategy | None = None,
    eval_dataset: Dataset[Sample] | None = None,
    eval_indices: Sequence[int] | None = None,
    eval_batch_size: int = 256,
    device: torch.device | None = None,
    on_round_end: Callable[[RoundSummary], None] | None = None,
) -> SimulationResult:
    """Run ``rounds`` federated rounds from ``model``'s current weights (FedAvg by default).

    ``model`` ends up holding the final global weights. With ``eval_dataset`` the global
    model is evaluated after every round.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not partitions or any(len(part) == 0 for part in partitions):
        raise ValueError("need at least one client, and every client needs samples")
    strategy = strategy or FedAvg()
    summaries: list[RoundSummary] = []
    for round_index in range(rounds):
        global_weights = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
        strategy.begin_round(global_weights)
        client_results = []
        for client_index, indices in enumerate(partitions):
            model.load_state_dict(global_weights)
            result = train_local(
                model,
                dataset,
                indices,
                replace(config, seed=client_seed(config.seed, client_index)),
                device=device,
                start_epoch=round_index * config.epochs,
            )
            strategy.accumulate(
                model.state_dict(),
                num_samples=result.num_samples,
                metrics={"loss": result.loss, "accuracy": result.accuracy},
            )
            client_results.append(result)
        model.load_state_dict(strategy.finish_round())
        eval_metrics = None
        if eval_dataset is not None:
            eval_metrics = evaluate(
                model, eval_dataset, eval_indices, batch_size=eval_batch_size, device=device
            )
        summary = RoundSummary(
            round_index=round_index,
            clients=client_results,
            train_metrics=dict(strategy.round_metrics),
            eval_metrics=eval_metrics,
        )
        summaries.append(summary)
        if on_round_end is not None:
            on_round_end(summary)
    final_weights = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    return SimulationResult(rounds=summaries, final_weights=final_weights)
