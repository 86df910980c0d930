"""Evaluation at the sites, for people: the federated evaluation per round and the
cross-site matrix, as JSON, CSV and report panels (see training/site_evaluation.py).

The cross-site matrix has a row per model (the final global model, then each site's last
local model) and a column per site whose validation data they were evaluated on; each cell
holds that site's metrics of that model. Which metrics a cell offers, and how each is
labelled and coloured, follow the experiment's task (training/metric_catalog.py).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from training import metric_catalog, site_evaluation
from training.models import Experiment, Round

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# The CSV row of a model's sample-weighted mean over the sites (no slug has a space).
WEIGHTED_SITE = "all (weighted)"
MAX_ANNOTATED_CELLS = 144


def cell_metrics(task: str) -> tuple[str, ...]:
    """The metrics a cell offers in the CSV and the heatmaps, in this order: the task's
    one-number metrics from the catalogue."""
    return tuple(metric_catalog.scalar_metrics(task))


def csv_columns(task: str) -> tuple[str, ...]:
    return ("model", "site", "num_samples", *cell_metrics(task))


# A classification experiment's (the API's schema names these).
CELL_METRICS = cell_metrics(metric_catalog.CLASSIFICATION)
CSV_COLUMNS = csv_columns(metric_catalog.CLASSIFICATION)


def cross_site_document(experiment: Experiment) -> dict[str, Any]:
    """The cross-site evaluation as the API returns it. Before its round opened (or for an
    experiment that has none) `round` is None and the matrix is empty."""
    results = site_evaluation.cross_site_results(experiment)
    task = experiment.task
    header = {
        "experiment": experiment.pk,
        "task": task,
        "metrics": list(cell_metrics(task)),
        "primary_metric": metric_catalog.primary_metric(task),
    }
    if results is None:
        return {
            **header,
            "round": None,
            "status": None,
            "personalized": experiment.strategy in site_evaluation.PERSONALIZED_STRATEGIES,
            "models": [],
            "sites": [],
            "cells": {},
            "weighted": {},
            "clients": {},
        }
    return {**header, **results}


def csv_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model and site (a missing result leaves its metrics empty), then one per
    model over all sites, weighted by their validation samples."""
    names = ("num_samples", *document["metrics"])
    rows = []
    for model in document["models"]:
        for site in document["sites"]:
            cell = document["cells"][model][site] or {}
            rows.append({"model": model, "site": site, **metric_columns(cell, names)})
        weighted = document["weighted"][model]
        rows.append({"model": model, "site": WEIGHTED_SITE, **metric_columns(weighted, names)})
    return rows


def metric_columns(metrics: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {name: metrics.get(name) for name in names}


def cross_site_csv(experiment: Experiment) -> str:
    output = io.StringIO()
    columns = csv_columns(experiment.task)
    writer = csv.DictWriter(output, fieldnames=columns, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(csv_rows(cross_site_document(experiment)))
    return output.getvalue()


def metric_matrix(document: dict[str, Any], metric: str) -> np.ndarray:
    """Models x sites of one metric; NaN where a site has no (numeric) result."""
    matrix = np.full((len(document["models"]), len(document["sites"])), np.nan)
    for row, model in enumerate(document["models"]):
        for column, site in enumerate(document["sites"]):
            value = (document["cells"][model][site] or {}).get(metric)
            if isinstance(value, int | float) and not isinstance(value, bool):
                matrix[row, column] = value if math.isfinite(value) else np.nan
    return matrix


def draw_heatmap(
    axes: Axes, document: dict[str, Any], no_data: str, metric: str | None = None
) -> None:
    """The matrix of `metric` (by default the task's primary one) as a heatmap with each
    cell's value written in it."""
    metric = metric or document["primary_metric"]
    definition = metric_catalog.METRICS.get(metric)
    label = metric_catalog.metric_label(metric)
    title = f"Cross-site evaluation: {label} on each site's validation data"
    axes.set_title(title)
    matrix = metric_matrix(document, metric)
    if matrix.size == 0 or np.isnan(matrix).all():
        axes.set_xticks([])
        axes.set_yticks([])
        reason = (
            no_data
            if document["round"] is None
            else f"{no_data}: the cross-site round is {document['status']}"
        )
        axes.text(0.5, 0.5, reason, ha="center", va="center", color="grey",
                  fontsize="large", transform=axes.transAxes, wrap=True)  # fmt: skip
        return
    bounded = definition is not None and definition.bounded
    # Bright where better: viridis reversed for a metric where lower is better (loss, HD95).
    image = axes.imshow(
        np.ma.masked_invalid(matrix),
        cmap="viridis_r" if metric_catalog.lower_is_better(metric) else "viridis",
        vmin=0.0 if bounded else None,
        vmax=1.0 if bounded else None,
        interpolation="nearest",
        aspect="auto",
    )
    unit = f" ({definition.unit})" if definition is not None and definition.unit else ""
    axes.figure.colorbar(image, ax=axes, label=label + unit, shrink=0.85)
    models = [
        "global (personalized)" if model == "global" and document["personalized"] else model
        for model in document["models"]
    ]
    axes.set_yticks(range(len(models)), labels=models, parse_math=False)
    axes.set_xticks(range(len(document["sites"])), labels=document["sites"], rotation=30,
                    ha="right", parse_math=False)  # fmt: skip
    axes.set_ylabel("model")
    axes.set_xlabel("validation data of site")
    if matrix.size <= MAX_ANNOTATED_CELLS:
        for (row, column), value in np.ndenumerate(matrix):
            text = "n/a" if np.isnan(value) else f"{value:.2f}"
            # viridis is light at its top (its bottom reversed): dark text on the light end.
            if np.isnan(value):
                colour = "grey"
            else:
                light = float(image.norm(value))
                light = 1.0 - light if image.cmap.name.endswith("_r") else light
                colour = "black" if light > 0.6 else "white"
            axes.text(column, row, text, ha="center", va="center", color=colour)


def draw_federated_evaluation(
    axes: Axes, rounds: Sequence[Round], no_data: str, metric: str = "accuracy"
) -> None:
    """Each round's global model on each site's validation split, and their weighted mean,
    by `metric` (the experiment's primary metric: accuracy, Dice)."""
    # Drawn in a web process's first report: matplotlib is not loaded at start-up.
    from matplotlib.ticker import MaxNLocator

    definition = metric_catalog.get_metric(metric)
    axes.set_title(f"Federated evaluation: {definition.label} on the sites' validation data")
    by_site: dict[str, tuple[list[int], list[float]]] = {}
    weighted: tuple[list[int], list[float]] = ([], [])
    for fl_round in rounds:
        evaluation = fl_round.federated_evaluation or {}
        for site, metrics in sorted((evaluation.get("sites") or {}).items()):
            value = (metrics or {}).get(metric)
            if isinstance(value, int | float) and math.isfinite(value):
                numbers, values = by_site.setdefault(site, ([], []))
                numbers.append(fl_round.number)
                values.append(float(value))
        value = (evaluation.get("weighted") or {}).get(metric)
        if isinstance(value, int | float) and math.isfinite(value):
            weighted[0].append(fl_round.number)
            weighted[1].append(float(value))
    if not weighted[0]:
        axes.set_xticks([])
        axes.set_yticks([])
        axes.text(0.5, 0.5, no_data, ha="center", va="center", color="grey",
                  fontsize="large", transform=axes.transAxes)  # fmt: skip
        return
    for site, (numbers, values) in by_site.items():
        axes.plot(numbers, values, marker="o", markersize=3, linewidth=1, label=site)
    axes.plot(*weighted, color="black", linewidth=2.2, marker="o", label="weighted by samples")
    axes.set_xlabel("round")
    axes.set_ylabel(definition.label + (f" ({definition.unit})" if definition.unit else ""))
    if definition.bounded:
        axes.set_ylim(0, 1.02)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", ncols=2 if len(by_site) > 6 else 1)
