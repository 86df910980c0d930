"""How the aggregation strategies compare on the synthetic lesion set, per data partition.

    .venv/bin/python benchmarks/strategies.py [--strategies fedavg,fedprox,...]
        [--partitions iid,dirichlet:0.1,site] [--seeds 3] [--rounds 10]
        [--poisoned-factor -10] [--per-site 80] [--json curves.json]
        [--network resnet18-small --network-params '{"width": 4, "stem_stride": 2}']

Every strategy runs with its default parameters through the pure engine
(training/fl/simulation.py: each client runs the real client protocol in memory, so
FedProx's proximal term, FedBN's local layers and SCAFFOLD's control variates are applied
as on a site). The set: 5 synthetic sites ("scanners") of 80 images of 32x32 pixels,
a stratified quarter held out for evaluation, the rest split among 5 clients by the
partition (``site``: one client per scanner). Local training: cnn-small, one epoch of
plain SGD (lr 0.1, batch 16, no momentum: SCAFFOLD's option II assumes SGD steps) per
round. Seeds change the partition, the initial model and the clients' data order.
cnn-small has no batch normalization, so there FedBN is FedAvg; give a network that has
(``--network resnet18-small``) to compare them.

The table gives the held-out accuracy after the last round (mean ± std over seeds) and
the first round whose accuracy reached the target (mean over the seeds that reached it,
with how many did; "-" when none). A run ends early when the global model is ruined (every
client's training diverges from it, or its outputs are NaN); its seed is counted as
"div." and left out of the mean.
FedBN's accuracy is personalized: each client's model
(global weights with its own batch-norm layers) on the held-out data (with the ``site``
partition, on its own site's held-out images), sample-weighted over clients.
``--poisoned-factor F`` makes client 0 send its update scaled by F
(start + F * (trained - start)) in every round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.fl.data import generate_synthetic_dataset
from training.fl.data.datasets import ImageFolderDataset
from training.fl.data.partition import holdout_split, partition_indices
from training.fl.local import TrainConfig
from training.fl.networks import build_network
from training.fl.simulation import RoundSummary, run_simulation, scaled_update
from training.fl.strategies import (
    StrategyContext,
    available_strategies,
    batch_norm_parameters,
    build_strategy,
)

SITES = 5
IMAGE_SIZE = 32
HOLDOUT = 0.25
CONFIG = TrainConfig(epochs=1, batch_size=16, lr=0.1, optimizer="sgd", momentum=0.0)
CPU = torch.device("cpu")


def fresh_model(network: str, params: dict[str, object], seed: int) -> torch.nn.Module:
    return build_network(network, in_channels=1, num_classes=2, seed=seed, **params)


def run_one(
    dataset: ImageFolderDataset,
    kept: list[int],
    held_out: list[int],
    *,
    strategy_name: str,
    partition: str,
    seed: int,
    rounds: int,
    poisoned_factor: float | None,
    network: str,
    network_params: dict[str, object],
) -> list[float]:
    """Held-out accuracy after each round; shorter than ``rounds`` when a round's clients
    all failed (their training diverged from the global model)."""
    kept_labels = dataset.labels[kept]
    kept_sites = [dataset.sites[i] for i in kept] if dataset.sites is not None else None
    parts = partition_indices(
        partition, labels=kept_labels, num_clients=SITES, seed=seed, sites=kept_sites
    )
    partitions = [[kept[i] for i in part] for part in parts]
    model = fresh_model(network, network_params, seed)
    context = StrategyContext(num_sites=SITES, batch_norm_parameters=batch_norm_parameters(model))
    strategy = build_strategy(strategy_name, context=context)
    attacks = {0: scaled_update(poisoned_factor)} if poisoned_factor is not None else None
    # With one client per scanner, a client's personalized model is judged on its own site.
    personal = None
    if partition == "site" and dataset.sites is not None:
        site_names = sorted(set(dataset.sites))
        personal = [[i for i in held_out if dataset.sites[i] == name] for name in site_names]
    accuracies: list[float] = []

    def record(summary: RoundSummary) -> None:
        metrics = summary.personalized_eval_metrics or summary.eval_metrics or {}
        accuracies.append(float(metrics["accuracy"]))

    # A ruined global model ends the run: every client's training diverges from it
    # (RuntimeError) or its outputs are NaN, which the metrics refuse (ValueError).
    with contextlib.suppress(RuntimeError, ValueError):
        run_simulation(
            model=model,
            dataset=dataset,
            partitions=partitions,
            rounds=rounds,
            config=TrainConfig(**{**vars(CONFIG), "seed": seed}),
            strategy=strategy,
            eval_dataset=dataset,
            eval_indices=held_out,
            device=CPU,
            attacks=attacks,
            personal_eval_indices=personal,
            on_round_end=record,
        )
    return accuracies


def cell(curves: list[list[float]], target: float, rounds: int) -> tuple[str, str]:
    finals = [curve[-1] for curve in curves if len(curve) == rounds]
    diverged = len(curves) - len(finals)
    if finals:
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        accuracy = f"{statistics.mean(finals):.3f} ± {spread:.3f}"
        if diverged:
            accuracy += f" ({diverged} div.)"
    else:
        accuracy = "diverged"
    reached = [
        next(index + 1 for index, value in enumerate(curve) if value >= target)
        for curve in curves
        if curve and max(curve) >= target
    ]
    rounds = f"{statistics.mean(reached):.1f} ({len(reached)}/{len(curves)})" if reached else "-"
    return accuracy, rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default=",".join(available_strategies()))
    parser.add_argument("--partitions", default="iid,dirichlet:0.1,site")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--poisoned-factor", type=float, default=None)
    parser.add_argument("--per-site", type=int, default=80, help="images per synthetic site")
    parser.add_argument("--network", default="cnn-small")
    parser.add_argument("--network-params", type=json.loads, default={})
    parser.add_argument("--json", type=Path, help="write every accuracy curve to this file")
    args = parser.parse_args()
    strategies = [name.strip() for name in args.strategies.split(",") if name.strip()]
    unknown = sorted(set(strategies) - set(available_strategies()))
    if unknown:
        parser.error(f"unknown strategies {unknown}; known: {available_strategies()}")
    partitions = [spec.strip() for spec in args.partitions.split(",") if spec.strip()]

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-strategies-") as folder:
        data_dir = generate_synthetic_dataset(
            Path(folder), sites=SITES, per_site=args.per_site, size=IMAGE_SIZE, seed=0
        )
        dataset = ImageFolderDataset(data_dir)
        kept_array, held_array = holdout_split(dataset.labels, fraction=HOLDOUT, seed=0)
        kept, held_out = [int(i) for i in kept_array], [int(i) for i in held_array]
        curves: dict[str, dict[str, list[list[float]]]] = {}
        for name in strategies:
            for partition in partitions:
                for seed in range(args.seeds):
                    curve = run_one(
                        dataset, kept, held_out, strategy_name=name, partition=partition,
                        seed=seed, rounds=args.rounds, poisoned_factor=args.poisoned_factor,
                        network=args.network, network_params=args.network_params,
                    )  # fmt: skip
                    curves.setdefault(name, {}).setdefault(partition, []).append(curve)
                print(f"  {name:<14} {partition:<14} done", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started

    poisoned = (
        f"; client 0 sends its update scaled by {args.poisoned_factor:g}"
        if args.poisoned_factor is not None
        else ""
    )
    print(
        f"Strategies on the synthetic lesion set ({args.network}, {SITES} clients of "
        f"{args.per_site} images, {IMAGE_SIZE}x{IMAGE_SIZE}): {args.rounds} rounds, "
        f"{args.seeds} seeds{poisoned}. Held-out accuracy after the last round "
        f"(mean ± std) | rounds to reach {args.target:g} (mean, seeds that did)"
    )
    header = f"{'strategy':<14}" + "".join(f" | {p:^34}" for p in partitions)
    print(header)
    print("-" * len(header))
    for name in strategies:
        row = f"{name:<14}"
        for partition in partitions:
            accuracy, rounds = cell(curves[name][partition], args.target, args.rounds)
            row += f" | {accuracy:>22} {rounds:>11}"
        print(row)
    print(f"({elapsed / 60:.1f} minutes)")
    if args.json is not None:
        args.json.write_text(json.dumps(curves, indent=1))


if __name__ == "__main__":
    main()
