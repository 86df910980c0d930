"""What a comparison of experiments shows, defined once for the sweep's comparison (page and
JSON) and the compare page: final metrics, rounds to reach a target, final metrics per
site, and learning curves; for a sweep, grouped by its grid values except the seed, as
mean ± standard deviation over the seeds.

A round's metrics are the server's held-out evaluation when the server holds data, else
the sites' sample-weighted federated evaluation, else the clients' own training metrics;
each result says which ("source"). Which metrics are shown, their order and which way is
better come from training/metric_catalog.py, for the experiments' task (accuracy first for
classification, Dice for segmentation). The standard deviation is the sample one (n - 1), as
usual for a spread over seeds; it is None for a single run.
"""

import json
import statistics
from collections import defaultdict
from typing import Any

from training import metric_catalog
from training.models import (
    ClientUpdate,
    ClientUpdateStatus,
    Experiment,
    Round,
    RoundKind,
    RoundStatus,
    Sweep,
)

# Targets reached by default on the compare page (a sweep names its own).
DEFAULT_TARGET_VALUE = 0.8


def lower_is_better(metric: str) -> bool:
    return metric_catalog.lower_is_better(metric)


def comparison_task(experiments: list[Experiment]) -> str:
    """The task whose primary metric a comparison targets by default: the experiments'
    common task, classification when they mix tasks or there are none."""
    tasks = {experiment.task for experiment in experiments}
    return tasks.pop() if len(tasks) == 1 else metric_catalog.CLASSIFICATION


def round_metrics(fl_round: Round) -> tuple[str, dict[str, Any]]:
    """(source, metrics) of one closed training round."""
    if fl_round.metrics.get("global"):
        return "global", fl_round.metrics["global"]
    weighted = (fl_round.federated_evaluation or {}).get("weighted")
    if weighted:
        return "federated", weighted
    return "clients", fl_round.metrics.get("clients") or {}


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def mean_std(values: list[float]) -> dict[str, Any]:
    """{"mean", "std", "n"} of the values (None when there are none; std None for one)."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def rounds_to_reach(curve: list[tuple[int, float]], target: float, metric: str) -> int | None:
    """The first round whose metric reaches the target (at or above it; at or below for a
    loss), or None if none did."""
    for round_number, value in curve:
        reached = value <= target if lower_is_better(metric) else value >= target
        if reached:
            return round_number
    return None


def experiment_result(
    experiment: Experiment,
    rounds: list[Round],
    last_round_clients: list[ClientUpdate],
    *,
    target_metric: str,
    target_value: float,
) -> dict[str, Any]:
    """One experiment's final metrics, curve of every summary metric, rounds to reach the
    target and final metrics per site. `rounds`: its closed training rounds by number."""
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    source, final = "", {}
    task = experiment.task
    for fl_round in rounds:
        source, metrics = round_metrics(fl_round)
        for name, value in metrics.items():
            if number(value) is not None:
                curves[name].append((fl_round.number, float(value)))
        final = metrics
    return {
        "id": experiment.pk,
        "name": experiment.name,
        "status": experiment.status,
        "seed": experiment.seed,
        "task": task,
        "rounds_closed": len(rounds),
        "source": source,
        "final": {
            name: number(value) for name, value in final.items() if number(value) is not None
        },
        # One value per class (Dice per class, precision, ...) of the last round, as reported.
        "final_per_class": {
            name: final[name]
            for name in metric_catalog.per_class_metrics(task)
            if isinstance(final.get(name), list)
        },
        "rounds_to_target": rounds_to_reach(curves[target_metric], target_value, target_metric),
        "sites": site_metrics(rounds[-1] if rounds else None, last_round_clients),
        "curves": {name: [list(point) for point in points] for name, points in curves.items()},
    }


def site_metrics(last_round: Round | None, clients: list[ClientUpdate]) -> dict[str, Any]:
    """{"source", "values": {slug: {metric: value}}} of the last round: each site's
    evaluation of the global model on its own data, or, without federated evaluation, the
    metrics each client reported of its training."""
    sites = ((last_round.federated_evaluation or {}).get("sites") or {}) if last_round else {}
    if sites:
        source = "federated"
    else:
        source = "clients"
        sites = {update.site.slug: update.metrics for update in clients}
    values = {
        slug: {name: number(v) for name, v in metrics.items() if number(v) is not None}
        for slug, metrics in sites.items()
        if isinstance(metrics, dict)
    }
    return {"source": source, "values": values}


def load_results(
    experiments: list[Experiment], *, target_metric: str, target_value: float
) -> list[dict[str, Any]]:
    """experiment_result of each experiment, in three queries for all of them."""
    rounds_by_experiment: dict[int, list[Round]] = defaultdict(list)
    closed = Round.objects.filter(
        experiment__in=[e.pk for e in experiments],
        kind=RoundKind.TRAIN,
        status=RoundStatus.CLOSED,
    ).order_by("experiment_id", "number")
    for fl_round in closed:
        rounds_by_experiment[fl_round.experiment_id].append(fl_round)
    last_rounds = [rounds[-1].pk for rounds in rounds_by_experiment.values()]
    clients_by_round: dict[int, list[ClientUpdate]] = defaultdict(list)
    for update in ClientUpdate.objects.filter(
        round__in=last_rounds, status=ClientUpdateStatus.SUCCEEDED
    ).select_related("site"):
        clients_by_round[update.round_id].append(update)
    results = []
    for experiment in experiments:
        rounds = rounds_by_experiment[experiment.pk]
        results.append(
            experiment_result(
                experiment,
                rounds,
                clients_by_round[rounds[-1].pk] if rounds else [],
                target_metric=target_metric,
                target_value=target_value,
            )
        )
    return results


def summary_metrics(results: list[dict[str, Any]], target_metric: str) -> list[str]:
    """The columns of a comparison: the scalar metrics of the results' tasks that some
    result has, in catalogue order, and the target metric."""
    present = {name for result in results for name in result["final"]}
    names: list[str] = []
    for task in sorted({result["task"] for result in results}):
        names += [n for n in metric_catalog.scalar_metrics(task) if n in present and n not in names]
    if target_metric in present and target_metric not in names:
        names.append(target_metric)
    return names


def group_summary(
    label: str, settings: dict[str, Any], results: list[dict[str, Any]], metrics: list[str],
    target_metric: str,
) -> dict[str, Any]:  # fmt: skip
    """Mean ± std over the group's runs (its seeds) of every statistic of experiment_result."""
    reached = [r["rounds_to_target"] for r in results if r["rounds_to_target"] is not None]
    slugs = sorted({slug for r in results for slug in r["sites"]["values"]})
    per_site = {
        slug: {
            name: mean_std(
                [
                    r["sites"]["values"][slug][name]
                    for r in results
                    if name in r["sites"]["values"].get(slug, {})
                ]
            )
            for name in sorted({n for r in results for n in r["sites"]["values"].get(slug, {})})
        }
        for slug in slugs
    }
    by_round: dict[int, list[float]] = defaultdict(list)
    for result in results:
        for round_number, value in result["curves"].get(target_metric, []):
            by_round[round_number].append(value)
    return {
        "label": label,
        "settings": settings,
        "experiments": [{k: v for k, v in r.items() if k != "curves"} for r in results],
        "final": {
            name: mean_std([r["final"][name] for r in results if name in r["final"]])
            for name in metrics
        },
        "rounds_to_target": {**mean_std(reached), "reached": len(reached), "runs": len(results)},
        "sites": per_site,
        "site_sources": sorted({r["sites"]["source"] for r in results if r["sites"]["values"]}),
        "curve": [
            {"round": round_number, **mean_std(values)}
            for round_number, values in sorted(by_round.items())
        ],
        "runs": {str(r["id"]): r["curves"].get(target_metric, []) for r in results},
    }


def describe_value(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)


def sweep_comparison(sweep: Sweep) -> dict[str, Any]:
    """The comparison of a sweep: its experiments grouped by their grid values but the seed."""
    from training.sweeps import experiment_settings

    experiments = list(
        sweep.experiments.order_by("pk").select_related("dataset").prefetch_related("sites")
    )
    results = load_results(
        experiments, target_metric=sweep.target_metric, target_value=sweep.target_value
    )
    varied = [field for field in sweep.grid if field != "seed"]
    # A setting the grid gives one value says nothing about a group: left out of its label.
    labelled = [field for field in varied if len(sweep.grid[field]) > 1]
    groups: dict[str, tuple[str, dict[str, Any], list[dict[str, Any]]]] = {}
    for experiment, result in zip(experiments, results, strict=True):
        settings = experiment_settings(experiment)
        key = {field: settings[field] for field in varied}
        label = ", ".join(f"{field}={describe_value(key[field])}" for field in labelled)
        group_key = json.dumps(key, sort_keys=True, default=str)
        groups.setdefault(group_key, (label, key, []))[2].append(result)
    metrics = summary_metrics(results, sweep.target_metric)
    return {
        "sweep": sweep.pk,
        "name": sweep.name,
        "target_metric": sweep.target_metric,
        "target_value": sweep.target_value,
        "varied": varied,
        "metrics": metrics,
        "labels": {name: metric_catalog.metric_label(name) for name in metrics},
        "statuses": status_counts(experiments),
        "groups": [
            group_summary(label or sweep.name, key, members, metrics, sweep.target_metric)
            for label, key, members in groups.values()
        ],
    }


def experiments_comparison(
    experiments: list[Experiment],
    *,
    target_metric: str | None = None,
    target_value: float = DEFAULT_TARGET_VALUE,
) -> dict[str, Any]:
    """The compare page's table: each experiment a group of its own. The target metric is
    by default the primary metric of the experiments' task."""
    if target_metric is None:
        target_metric = metric_catalog.primary_metric(comparison_task(experiments))
    results = load_results(experiments, target_metric=target_metric, target_value=target_value)
    metrics = summary_metrics(results, target_metric)
    return {
        "target_metric": target_metric,
        "target_value": target_value,
        "metrics": metrics,
        "labels": {name: metric_catalog.metric_label(name) for name in metrics},
        "groups": [
            group_summary(result["name"], {"id": result["id"]}, [result], metrics, target_metric)
            for result in results
        ],
    }


def status_counts(experiments: list[Experiment]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for experiment in experiments:
        counts[experiment.status] += 1
    return dict(counts)


def format_statistic(statistic: dict[str, Any]) -> str:
    """mean ± std as text ("-" without values; the mean alone for one run)."""
    if statistic["mean"] is None:
        return "-"
    if statistic["std"] is None:
        return f"{statistic['mean']:.4f}"
    return f"{statistic['mean']:.4f} ± {statistic['std']:.4f}"


def format_rounds_to_target(statistic: dict[str, Any]) -> str:
    """Rounds to reach the target: mean ± std over the runs that reached it, and how many."""
    if not statistic["reached"]:
        return "not reached"
    spread = "" if statistic["std"] is None else f" ± {statistic['std']:.1f}"
    return f"{statistic['mean']:.1f}{spread} ({statistic['reached']}/{statistic['runs']})"


def format_comparison(result: dict[str, Any]) -> str:
    """The comparison as a text table: a row per group of the grid (seeds pooled)."""
    target = f"rounds to {result['target_metric']} {result['target_value']}"
    columns = ["group", "runs", *result["metrics"], target]
    rows = [
        [
            group["label"],
            str(len(group["experiments"])),
            *(format_statistic(group["final"][metric]) for metric in result["metrics"]),
            format_rounds_to_target(group["rounds_to_target"]),
        ]
        for group in result["groups"]
    ]
    widths = [max(len(row[i]) for row in [columns, *rows]) for i in range(len(columns))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(columns, widths, strict=True))]
    for row in rows:
        lines.append("  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)))
    return "\n".join(lines)
