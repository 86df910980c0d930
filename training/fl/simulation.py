"""A single-process federated simulation: every client trains in turn on one model.

Reference loop for tests and benchmarks. Each client runs the real client protocol
(:func:`training.fl.client.run_client_task`) through an in-memory connection, so the
strategy's client options (FedProx's proximal term, FedBN's local layers, SCAFFOLD's
control variates and its payload) are applied exactly as on a worker or a site; each
simulated site keeps its own site state between rounds. Client ``k`` is the site
``site-k``, trains with ``client_seed(config.seed, k)`` and, in round ``r``,
``start_epoch = r * config.epochs``, so a run is reproducible from its seed alone.

``attacks`` replaces what chosen clients send (see :func:`scaled_update`), to study
robust aggregation; the client's own site state is kept as if it had sent its update.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.data import Dataset

from training.fl.client import (
    FEDBN_LOCAL,
    GLOBAL_MODEL,
    ClientReport,
    ClientTask,
    DataSpec,
    NetworkSpec,
    run_client_task,
)
from training.fl.local import Sample, TrainConfig, client_seed, evaluate
from training.fl.strategies import FedAvg, Strategy
from training.fl.weights import sha256_hex, weights_to_bytes

__all__ = ["Attack", "RoundSummary", "SimulationResult", "run_simulation", "scaled_update"]

Weights = Mapping[str, torch.Tensor]
# What an attacking client sends instead, from the round's global and its trained weights.
Attack = Callable[[Weights, Weights], dict[str, torch.Tensor]]


def scaled_update(factor: float) -> Attack:
    """A client that sends ``start + factor * (trained - start)`` for every floating entry
    (its own update scaled by ``factor``; -10 points ten times as far the other way)."""

    def attack(start: Weights, trained: Weights) -> dict[str, torch.Tensor]:
        return {
            name: start[name] + factor * (tensor - start[name])
            if tensor.dtype.is_floating_point
            else tensor.clone()
            for name, tensor in trained.items()
        }

    return attack


@dataclass(frozen=True, kw_only=True)
class RoundSummary:
    """``train_metrics`` are the strategy's sample-weighted client metrics; ``clients``
    each successful client's report. ``personalized_eval_metrics`` (strategies that keep
    layers at the sites) is the sample-weighted mean over clients of each one's model, with
    its own layers, on its own evaluation samples (see :func:`run_simulation`)."""

    round_index: int
    clients: list[ClientReport]
    train_metrics: dict[str, float]
    eval_metrics: dict[str, Any] | None
    personalized_eval_metrics: dict[str, float] | None = None
    # Client index to why it failed; failed clients are not in ``clients``.
    failures: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class SimulationResult:
    rounds: list[RoundSummary]
    final_weights: dict[str, torch.Tensor]


@dataclass
class _SiteState:
    """A simulated site's state, in memory."""

    kept: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        return self.kept.get(name)

    def save(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        self.kept[name] = {key: tensor.detach().clone() for key, tensor in tensors.items()}


class _InMemoryConnection:
    """The client protocol between a simulated client and the loop's strategy."""

    def __init__(
        self,
        global_weights: Weights,
        payload: Weights,
        site_state: _SiteState,
        attack: Attack | None,
    ) -> None:
        self.global_weights = global_weights
        self.payload = payload
        self.state = site_state
        self.attack = attack
        self.sent: tuple[dict[str, torch.Tensor], ClientReport] | None = None
        self.failure = ""

    def starting_weights(self, task: ClientTask) -> Weights:
        return self.global_weights

    def strategy_payload(self, task: ClientTask) -> Weights:
        return self.payload

    def site_state(self, task: ClientTask) -> _SiteState:
        return self.state

    def evaluation_weights(self, task: ClientTask, label: str) -> Weights:
        if label != GLOBAL_MODEL:
            raise LookupError(f"the simulation evaluates only the {GLOBAL_MODEL!r} model")
        return self.global_weights

    def send_update(self, task: ClientTask, weights: Weights, report: ClientReport) -> bool:
        sent = (
            self.attack(self.global_weights, weights)
            if self.attack is not None
            else {name: tensor.detach().clone() for name, tensor in weights.items()}
        )
        self.sent = (sent, report)
        return True

    def send_evaluation(self, task: ClientTask, report: ClientReport) -> bool:
        raise NotImplementedError("the simulation sends only training tasks")

    def send_failure(self, task: ClientTask, error: str) -> bool:
        self.failure = error
        return True


Value = TypeVar("Value")


def _constant(value: Value) -> Callable[[ClientTask], Value]:
    """What every simulated client gets whatever its task: the one model, its own data."""
    return lambda task: value


def _task(
    *,
    client_index: int,
    round_index: int,
    config: TrainConfig,
    options: Mapping[str, Any],
    weights_sha256: str,
    payload_sha256: str,
    task: str,
) -> ClientTask:
    # The network and data descriptions are for clients that build their own; the
    # simulation hands every client the one model and dataset, so they are placeholders.
    return ClientTask(
        client_update=client_index,
        round_id=round_index,
        round_number=round_index + 1,
        experiment=0,
        site=f"site-{client_index}",
        kind="train",
        network=NetworkSpec(name="simulation", in_channels=1, num_classes=2, spatial_dims=2),
        data=DataSpec(
            name="simulation",
            num_classes=2,
            class_names=(),
            channels=1,
            image_shape=(),
            task=task,
        ),
        train=replace(config, seed=client_seed(config.seed, client_index)),
        start_epoch=round_index * config.epochs,
        options=dict(options),
        weights_sha256=weights_sha256,
        payload_sha256=payload_sha256,
    )


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
    attacks: Mapping[int, Attack] | None = None,
    personal_eval_indices: Sequence[Sequence[int]] | None = None,
) -> SimulationResult:
    """Run ``rounds`` federated rounds from ``model``'s current weights (FedAvg by default).

    ``model`` ends up holding the final global weights. With ``eval_dataset`` the global
    model is evaluated after every round (on ``device``; clients train on their default
    device), and, when the strategy keeps layers at the sites (FedBN), so is each client's
    personalized model: on ``personal_eval_indices[k]`` for client k (a site's own
    held-out samples), else on ``eval_indices``. ``attacks`` maps a client's index to what
    it sends instead of its update.
    A client that fails (its training diverged, say) is left out of its round, as the
    server leaves it out, and its reason recorded in the round's ``failures``; a round
    whose clients all fail raises RuntimeError with their reasons.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not partitions or any(len(part) == 0 for part in partitions):
        raise ValueError("need at least one client, and every client needs samples")
    if personal_eval_indices is not None and len(personal_eval_indices) != len(partitions):
        raise ValueError("personal_eval_indices needs one list of indices per client")
    strategy = strategy or FedAvg()
    attacks = attacks or {}
    site_states = [_SiteState() for _ in partitions]
    summaries: list[RoundSummary] = []
    for round_index in range(rounds):
        global_weights = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
        weights_sha256 = sha256_hex(weights_to_bytes(global_weights))
        payload = strategy.client_payload()
        payload_sha256 = sha256_hex(weights_to_bytes(payload)) if payload else ""
        strategy.begin_round(global_weights)
        reports: list[ClientReport] = []
        failures: dict[int, str] = {}
        for client_index, indices in enumerate(partitions):
            task = _task(
                client_index=client_index,
                round_index=round_index,
                config=config,
                options=strategy.configure_client(
                    round_number=round_index + 1, site=f"site-{client_index}"
                ),
                weights_sha256=weights_sha256,
                payload_sha256=payload_sha256,
                task=getattr(dataset, "task", "classification"),
            )
            connection = _InMemoryConnection(
                global_weights, payload, site_states[client_index], attacks.get(client_index)
            )
            run_client_task(
                task,
                connection,
                local_data=_constant((dataset, list(indices))),
                network=_constant(model),
            )
            if connection.sent is None:
                failures[client_index] = connection.failure
                continue
            weights, report = connection.sent
            strategy.accumulate(
                weights,
                num_samples=report.num_samples,
                metrics=report.metrics,
                extras=report.extras,
            )
            reports.append(report)
        if not reports:
            raise RuntimeError(f"every client of round {round_index} failed: {failures}")
        model.load_state_dict(strategy.finish_round())
        eval_metrics, personalized = None, None
        if eval_dataset is not None:
            personalized = _personalized_evaluation(
                model,
                site_states,
                eval_dataset,
                personal_eval_indices or [eval_indices] * len(partitions),
                eval_batch_size,
                device,
                config.patch_size,
            )
            eval_metrics = evaluate(
                model,
                eval_dataset,
                eval_indices,
                batch_size=eval_batch_size,
                device=device,
                patch_size=config.patch_size,
            )
        summary = RoundSummary(
            round_index=round_index,
            clients=reports,
            failures=failures,
            train_metrics=dict(strategy.round_metrics),
            eval_metrics=eval_metrics,
            personalized_eval_metrics=personalized,
        )
        summaries.append(summary)
        if on_round_end is not None:
            on_round_end(summary)
    final_weights = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    return SimulationResult(rounds=summaries, final_weights=final_weights)


def _personalized_evaluation(
    model: nn.Module,
    site_states: Sequence[_SiteState],
    eval_dataset: Dataset[Sample],
    eval_indices: Sequence[Sequence[int] | None],
    batch_size: int,
    device: torch.device | None,
    patch_size: Sequence[int] = (),
) -> dict[str, float] | None:
    """Sample-weighted mean accuracy (Dice for segmentation) and loss of each site's model
    (the global one with the layers the site kept) on its evaluation samples; None when no
    site keeps layers."""
    if not any(FEDBN_LOCAL in state.kept for state in site_states):
        return None
    global_weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
    per_site = []
    for state, indices in zip(site_states, eval_indices, strict=True):
        model.load_state_dict({**global_weights, **state.kept.get(FEDBN_LOCAL, {})})
        per_site.append(
            evaluate(
                model,
                eval_dataset,
                indices,
                batch_size=batch_size,
                device=device,
                patch_size=patch_size,
            )
        )
    model.load_state_dict(global_weights)
    total = sum(int(metrics["num_samples"]) for metrics in per_site)
    # Dice is None for a site whose samples hold no foreground: averaged where all have it.
    reported = [
        key
        for key in ("accuracy", "dice", "loss")
        if all(isinstance(m.get(key), int | float) for m in per_site)
    ]
    return {
        key: sum(float(m[key]) * int(m["num_samples"]) for m in per_site) / total
        for key in reported
    }
