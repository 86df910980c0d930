"""Evaluation where the data is: each site's validation split and the metrics on it.

A site keeps a seeded share of its samples out of training (``validation_split``) and
evaluates models on it (``evaluate_model``): the round's starting global model before it
trains, and every model of the cross-site round. The server combines what the sites
report (``weighted_metrics``, ``cross_site_matrix``); only metrics leave a site.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from training.fl.local import Indices, Sample

__all__ = [
    "WEIGHTED_METRICS",
    "cross_site_matrix",
    "evaluate_model",
    "validation_split",
    "weighted_metrics",
]

# The scalar metrics that are averaged over sites, each site weighted by its samples.
WEIGHTED_METRICS = (
    "loss",
    "accuracy",
    "balanced_accuracy",
    "roc_auc",
    "sensitivity",
    "specificity",
    "dice",
    "hd95",
)
# Per-class lists (segmentation) averaged class by class in the same way.
WEIGHTED_CLASS_METRICS = ("dice_per_class", "hd95_per_class")


def split_seed(seed_text: str) -> int:
    """A 64-bit seed that depends on ``seed_text`` only (not on Python's hash salt)."""
    return int.from_bytes(hashlib.sha256(seed_text.encode("utf-8")).digest()[:8], "big")


def validation_split(
    indices: Indices, fraction: float, seed_text: str
) -> tuple[list[int], list[int]]:
    """Split a site's sample ``indices`` into (training, validation) indices.

    The split depends only on the set of indices, ``fraction`` and ``seed_text``
    (``f"{dataset name}/{site slug}"``), so every experiment on the same data evaluates on
    the same samples. ``round(fraction * n)`` samples are kept for validation, at least one
    when ``fraction > 0`` and at most ``n - 1``, so that training keeps one too; a site
    with a single sample, or ``fraction == 0``, has no validation split. Both lists keep
    the order of ``indices``.
    """
    if not (0.0 <= fraction < 1.0 and math.isfinite(fraction)):
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    ordered = [int(index) for index in indices]
    unique = sorted(set(ordered))
    if len(unique) != len(ordered):
        raise ValueError("validation_split needs distinct sample indices")
    count = len(unique)
    if fraction == 0.0 or count < 2:
        return ordered, []
    wanted = min(max(round(fraction * count), 1), count - 1)
    order = np.random.default_rng(split_seed(seed_text)).permutation(count)
    held_out = {unique[position] for position in order[:wanted].tolist()}
    training = [index for index in ordered if index not in held_out]
    validation = [index for index in ordered if index in held_out]
    return training, validation


def evaluate_model(
    model: nn.Module,
    dataset: Dataset[Sample],
    indices: Indices,
    *,
    batch_size: int,
    device: torch.device | None = None,
    patch_size: Sequence[int] = (),
) -> dict[str, Any]:
    """Metrics of ``model`` on ``dataset[indices]``: ``loss`` (mean cross-entropy),
    ``accuracy``, ``num_samples`` and the rest of
    :func:`training.fl.metrics.classification_metrics`; for a segmentation dataset
    ``loss``, ``dice``, ``dice_per_class``, ``hd95`` and ``num_samples`` (sliding windows
    of ``patch_size`` when it is given).

    The same evaluation as the server's held-out one (:func:`training.fl.local.evaluate`),
    so that a site's numbers and the server's compare. Raises ValueError without indices.
    """
    # PyTorch is imported here: the server's side of this module (combining what the sites
    # report) runs in web processes, which have no use for it.
    from training.fl.local import evaluate

    return evaluate(
        model, dataset, indices, batch_size=batch_size, device=device, patch_size=patch_size
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _samples(metrics: Mapping[str, Any]) -> int:
    count = metrics.get("num_samples")
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 0


def _weighted_mean(pairs: Sequence[tuple[int, Any]]) -> float | None:
    """The mean of the numbers among ``pairs`` (weight, value), None when there are none."""
    numbers = [
        (weight, number) for weight, value in pairs if (number := _number(value)) is not None
    ]
    total = sum(weight for weight, _ in numbers)
    return sum(weight * number for weight, number in numbers) / total if total else None


def weighted_metrics(by_site: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The sites' metrics combined, each site weighted by its ``num_samples``.

    Each of WEIGHTED_METRICS is the weighted mean over the sites that report it (None when
    none does), and each entry of WEIGHTED_CLASS_METRICS's per-class lists likewise (a
    class a site has no value for is left out of its mean); ``num_samples`` is the total
    and ``num_sites`` the number of sites with samples. The confusion matrices are summed
    when every site has one of the same shape, so the pooled ``accuracy`` equals its trace
    over its sum.
    """
    reporting = {site: metrics for site, metrics in by_site.items() if _samples(metrics)}
    combined: dict[str, Any] = {
        "num_samples": sum(_samples(metrics) for metrics in reporting.values()),
        "num_sites": len(reporting),
    }
    for key in WEIGHTED_METRICS:
        combined[key] = _weighted_mean(
            [(_samples(metrics), metrics.get(key)) for metrics in reporting.values()]
        )
    for key in WEIGHTED_CLASS_METRICS:
        lists = [
            (_samples(metrics), metrics[key])
            for metrics in reporting.values()
            if isinstance(metrics.get(key), list)
        ]
        if lists and all(len(values) == len(lists[0][1]) for _, values in lists):
            combined[key] = [
                _weighted_mean([(weight, values[position]) for weight, values in lists])
                for position in range(len(lists[0][1]))
            ]
    matrices = [metrics.get("confusion_matrix") for metrics in reporting.values()]
    try:
        arrays = [np.asarray(matrix, dtype=np.int64) for matrix in matrices]
    except (TypeError, ValueError):
        arrays = []
    if arrays and all(array.ndim == 2 and array.shape == arrays[0].shape for array in arrays):
        combined["confusion_matrix"] = np.sum(arrays, axis=0).tolist()
    return combined


def cross_site_matrix(
    models: Sequence[str], evaluations: Mapping[str, Mapping[str, Any] | None]
) -> dict[str, Any]:
    """The cross-site evaluation as a matrix: a row per model, a column per site.

    ``evaluations`` maps each site asked to evaluate to what it reported, model label to
    metrics (None for a site that failed or did not report). ``cells[model][site]`` is
    those metrics, or None where the site has no result for that model. ``weighted`` holds,
    per model, the metrics over all sites weighted by their validation samples.
    """
    sites = sorted(evaluations)
    cells: dict[str, dict[str, Any]] = {}
    for model in models:
        row = {}
        for site in sites:
            reported = evaluations[site] or {}
            metrics = reported.get(model)
            row[site] = dict(metrics) if isinstance(metrics, Mapping) else None
        cells[model] = row
    weighted = {
        model: weighted_metrics({site: m for site, m in row.items() if m is not None})
        for model, row in cells.items()
    }
    return {"models": list(models), "sites": sites, "cells": cells, "weighted": weighted}
