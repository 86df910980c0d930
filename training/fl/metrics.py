"""Classification metrics as plain JSON-serialisable values (floats, ints, lists, None)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.metrics import confusion_matrix, precision_score, roc_auc_score, roc_curve

__all__ = ["MAX_ROC_POINTS", "classification_metrics"]

MAX_ROC_POINTS = 101

# Probabilities are clipped before the log so that a confident mistake costs a large but
# finite loss.
_LOG_EPSILON = 1e-12


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def _downsample(values: npt.NDArray[np.float64], positions: npt.NDArray[np.int64]) -> list[float]:
    return [float(value) for value in values[positions]]


def classification_metrics(
    y_true: Sequence[int] | npt.NDArray[np.integer],
    probabilities: npt.NDArray[np.floating] | Sequence[Sequence[float]],
    *,
    num_classes: int,
) -> dict[str, Any]:
    """Metrics for predicted class ``probabilities`` (shape (N, num_classes)).

    Returns ``num_samples``, ``loss`` (mean cross-entropy), ``accuracy``,
    ``balanced_accuracy`` (mean recall over the classes present), per-class
    ``precision`` and ``recall`` lists, and ``confusion_matrix`` (rows: true class).
    Binary tasks add ``sensitivity``, ``specificity``, ``roc_auc`` (None when only one
    class is present) and ``roc_curve`` (``fpr``/``tpr`` lists of at most 101 points).
    """
    labels = np.asarray(y_true, dtype=np.int64).reshape(-1)
    probs = np.asarray(probabilities, dtype=np.float64)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if probs.shape != (len(labels), num_classes):
        raise ValueError(
            f"probabilities must have shape ({len(labels)}, {num_classes}), got {probs.shape}"
        )
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on zero samples")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")

    predictions = probs.argmax(axis=1)
    classes = list(range(num_classes))
    matrix = confusion_matrix(labels, predictions, labels=classes)
    support = matrix.sum(axis=1)
    recall = [_ratio(matrix[c, c], support[c]) for c in classes]
    precision = precision_score(labels, predictions, labels=classes, average=None, zero_division=0)
    true_class_probability = probs[np.arange(len(labels)), labels]
    metrics: dict[str, Any] = {
        "num_samples": len(labels),
        "loss": float(-np.log(np.clip(true_class_probability, _LOG_EPSILON, 1.0)).mean()),
        "accuracy": float((predictions == labels).mean()),
        "balanced_accuracy": float(np.mean([recall[c] for c in classes if support[c] > 0])),
        "precision": [float(value) for value in precision],
        "recall": recall,
        "confusion_matrix": matrix.astype(int).tolist(),
    }
    if num_classes == 2:
        metrics.update(_binary_metrics(labels, probs[:, 1], matrix))
    return metrics


def _binary_metrics(
    labels: npt.NDArray[np.int64],
    positive_scores: npt.NDArray[np.float64],
    matrix: npt.NDArray[np.int64],
) -> dict[str, Any]:
    (true_negatives, false_positives), (false_negatives, true_positives) = matrix
    result: dict[str, Any] = {
        "sensitivity": _ratio(true_positives, true_positives + false_negatives),
        "specificity": _ratio(true_negatives, true_negatives + false_positives),
        "roc_auc": None,
        "roc_curve": None,
    }
    if len(np.unique(labels)) == 2:
        fpr, tpr, _ = roc_curve(labels, positive_scores)
        # Evenly spaced picks along the curve always include both end points.
        positions = np.unique(np.linspace(0, len(fpr) - 1, MAX_ROC_POINTS).round().astype(int))
        result["roc_auc"] = float(roc_auc_score(labels, positive_scores))
        result["roc_curve"] = {
            "fpr": _downsample(fpr, positions),
            "tpr": _downsample(tpr, positions),
        }
    return result
