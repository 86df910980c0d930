"""Evaluation at the sites, for people: the federated evaluation per round and the
cross-site matrix, as JSON, CSV and report panels (see training/site_evaluation.py).

The cross-site matrix has a row per model (the final global model, then each site's last
local model) and a column per site whose validation data they were evaluated on; each cell
holds that site's metrics of that model.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from training import site_evaluation
from training.models import Experiment, Round

# The metrics a cell offers in the CSV and the heatmaps, in this order.
CELL_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "loss",
    "roc_auc",
    "sensitivity",
    "specificity",
)
CSV_COLUMNS = ("model", "site", "num_samples", *CELL_METRICS)
# The CSV row of a model's sample-weighted mean over the sites (no slug has a space).
WEIGHTED_SITE = "all (weighted)"
HEATMAP_METRIC = "accuracy"
MAX_ANNOTATED_CELLS = 144


def cross_site_document(experiment: Experiment) -> dict[str, Any]:
    """The cross-site evaluation as the API returns it. Before its round opened (or for an
    experiment that has none) `round` is None and the matrix is empty."""
    results = site_evaluation.cross_site_results(experiment)
    header = {"experiment": experiment.pk, "metrics": list(CELL_METRICS)}
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
    rows = []
    for model in document["models"]:
        for site in document["sites"]:
            cell = document["cells"][model][site] or {}
            rows.append({"model": model, "site": site, **metric_columns(cell)})
        rows.append(
            {"model": model, "site": WEIGHTED_SITE, **metric_columns(document["weighted"][model])}
        )
    return rows


def metric_columns(metrics: dict[str, Any]) -> dict[str, Any]:
    return {name: metrics.get(name) for name in ("num_samples", *CELL_METRICS)}


def cross_site_csv(experiment: Experiment) -> str:
    output = io.StringIO()
    writer = csv.DictWriter(output, fieldnames=CSV_COLUMNS, lineterminator="\r\n")
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
    axes: Axes, document: dict[str, Any], no_data: str, metric: str = HEATMAP_METRIC
) -> None:
    """The matrix of `metric` as a heatmap with each cell's value written in it."""
    title = f"Cross-site evaluation: {metric.replace('_', ' ')} on each site's validation data"
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
    bounded = metric != "loss"
    image = axes.imshow(
        np.ma.masked_invalid(matrix),
        cmap="viridis",
        vmin=0.0 if bounded else None,
        vmax=1.0 if bounded else None,
        interpolation="nearest",
        aspect="auto",
    )
    axes.figure.colorbar(image, ax=axes, label=metric.replace("_", " "), shrink=0.85)
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
            # viridis is light at its top: dark text there, light text below.
            if np.isnan(value):
                colour = "grey"
            else:
                colour = "black" if float(image.norm(value)) > 0.6 else "white"
            axes.text(column, row, text, ha="center", va="center", color=colour)


def draw_federated_evaluation(axes: Axes, rounds: Sequence[Round], no_data: str) -> None:
    """Each round's global model on each site's validation split, and their weighted mean."""
    axes.set_title("Federated evaluation: accuracy on the sites' validation data")
    by_site: dict[str, tuple[list[int], list[float]]] = {}
    weighted: tuple[list[int], list[float]] = ([], [])
    for fl_round in rounds:
        evaluation = fl_round.federated_evaluation or {}
        for site, metrics in sorted((evaluation.get("sites") or {}).items()):
            value = (metrics or {}).get("accuracy")
            if isinstance(value, int | float) and math.isfinite(value):
                numbers, values = by_site.setdefault(site, ([], []))
                numbers.append(fl_round.number)
                values.append(float(value))
        value = (evaluation.get("weighted") or {}).get("accuracy")
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
    axes.set_ylabel("accuracy")
    axes.set_ylim(0, 1.02)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", ncols=2 if len(by_site) > 6 else 1)
