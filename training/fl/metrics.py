"""Classification and segmentation metrics as plain JSON-serialisable values (floats,
ints, lists, None). Segmentation scores are MONAI's DiceMetric and 95th-percentile
HausdorffDistanceMetric, so that they equal what MONAI users compute."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

__all__ = [
    "MAX_ROC_POINTS",
    "classification_metrics",
    "segmentation_metrics",
    "segmentation_scores",
    "summarize_segmentation",
]

MAX_ROC_POINTS = 101

# Probabilities are clipped before the log so that a confident mistake costs a large but
# finite loss.
_LOG_EPSILON = 1e-12

# MONAI's Hausdorff distance warns of each empty class (scored below) and of a deprecated
# argument it passes to itself. The filters are process-wide, installed once: a
# warnings.catch_warnings() around the call is not thread-safe, and clients that train at
# once in embedded mode undid each other's filters, so the warnings reached the CLI.
warnings.filterwarnings("ignore", message=".*is all 0.*", category=UserWarning)
warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)


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
    # Counted with numpy: importing scikit-learn (and SciPy) for this would cost a process
    # more than a second at its first evaluation; it is still used for the ROC curve.
    matrix = np.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    recall = [_ratio(matrix[c, c], support[c]) for c in classes]
    precision = [_ratio(matrix[c, c], predicted[c]) for c in classes]
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
        # Imported here: scikit-learn (and the SciPy it loads) costs a process more than a
        # second, paid by binary tasks at their first evaluation only.
        from sklearn.metrics import roc_auc_score, roc_curve

        fpr, tpr, _ = roc_curve(labels, positive_scores)
        # Evenly spaced picks along the curve always include both end points.
        positions = np.unique(np.linspace(0, len(fpr) - 1, MAX_ROC_POINTS).round().astype(int))
        result["roc_auc"] = float(roc_auc_score(labels, positive_scores))
        result["roc_curve"] = {
            "fpr": _downsample(fpr, positions),
            "tpr": _downsample(tpr, positions),
        }
    return result


Spacing = Sequence[float] | Sequence[Sequence[float]]


def _label_maps(masks: torch.Tensor | npt.NDArray[np.integer]) -> torch.Tensor:
    """Label maps as int64 (N, 1, *spatial). Four axes with a second of size 1 read as
    (N, 1, H, W): a volume one slice deep is taken for an image."""
    tensor = masks if isinstance(masks, torch.Tensor) else torch.as_tensor(np.asarray(masks))
    tensor = tensor.detach().cpu().long()
    if tensor.ndim == 3 or (tensor.ndim == 4 and tensor.shape[1] != 1):
        tensor = tensor.unsqueeze(1)
    if tensor.ndim not in (4, 5) or tensor.shape[1] != 1:
        raise ValueError(
            "masks must be label maps shaped (N, *spatial) or (N, 1, *spatial) with 2 or 3 "
            f"spatial axes, got shape {tuple(tensor.shape)}"
        )
    return tensor


def _per_sample_spacing(
    spacing: Spacing | None, count: int, spatial_dims: int
) -> list[list[float]]:
    if spacing is None:
        return [[1.0] * spatial_dims] * count
    one_for_all = all(isinstance(value, int | float) for value in spacing)
    values = np.asarray([spacing] * count if one_for_all else spacing, dtype=np.float64)
    if values.shape != (count, spatial_dims):
        raise ValueError(
            f"spacing must give {spatial_dims} values, or {spatial_dims} values for each of the "
            f"{count} samples, got {spacing!r}"
        )
    return [[float(step) for step in row] for row in values]


def _scores(result: Any) -> npt.NDArray[np.float64]:
    """A MONAI metric's (N, classes) result as float64 (it returns one tensor when called
    with tensors)."""
    return np.asarray(torch.as_tensor(result).double().numpy(), dtype=np.float64)


def segmentation_scores(
    predictions: torch.Tensor | npt.NDArray[np.integer],
    targets: torch.Tensor | npt.NDArray[np.integer],
    *,
    num_classes: int,
    spacing: Spacing | None = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Dice and HD95 of each sample and foreground class, as two (N, num_classes - 1)
    arrays, NaN where the class is in neither mask.

    ``predictions`` and ``targets`` are label maps, (N, *spatial) or (N, 1, *spatial).
    ``spacing`` is the voxel size along each spatial axis (one for all samples, or one per
    sample), so that HD95 is in mm; without it HD95 is in voxels. A class in only one of
    the two masks has Dice 0 and, since no surface distance exists, the largest distance
    the image allows: its diagonal (in mm with ``spacing``).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
    target_maps = _label_maps(targets)
    spatial_dims = target_maps.ndim - 2
    predicted_maps = _label_maps(predictions)
    if predicted_maps.shape != target_maps.shape:
        raise ValueError(
            f"predictions {tuple(predicted_maps.shape)} and targets "
            f"{tuple(target_maps.shape)} must have the same shape"
        )
    for name, maps in (("predictions", predicted_maps), ("targets", target_maps)):
        if maps.numel() and (int(maps.min()) < 0 or int(maps.max()) >= num_classes):
            raise ValueError(f"{name} hold labels outside 0..{num_classes - 1}")
    # Imported here: ``import monai`` loads all of MONAI (MLflow's handler included).
    from monai.metrics import DiceMetric, HausdorffDistanceMetric
    from monai.networks.utils import one_hot

    predicted = one_hot(predicted_maps, num_classes)
    expected = one_hot(target_maps, num_classes)
    steps = _per_sample_spacing(spacing, len(target_maps), spatial_dims)
    # ignore_empty=False scores a class predicted where the target has none as 0, not NaN.
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    dice_values = _scores(dice(predicted, expected))
    hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    hd_values = _scores(hd95(predicted, expected, spacing=steps))
    in_prediction = predicted[:, 1:].flatten(2).any(dim=2).numpy()
    in_target = expected[:, 1:].flatten(2).any(dim=2).numpy()
    spatial_shape = target_maps.shape[2:]
    diagonals = np.array(
        [math.hypot(*(size * step for size, step in zip(spatial_shape, steps[i], strict=True)))
         for i in range(len(target_maps))]
    )  # fmt: skip
    only_one = in_prediction != in_target
    hd_values = np.where(only_one, diagonals[:, None], hd_values)
    absent = ~(in_prediction | in_target)
    dice_values[absent] = np.nan
    hd_values[absent] = np.nan
    return dice_values, hd_values


def summarize_segmentation(
    dice: npt.NDArray[np.float64], hd95: npt.NDArray[np.float64]
) -> dict[str, Any]:
    """Per-sample scores from :func:`segmentation_scores` (rows may come from several
    calls, stacked) as metrics: each class's mean over the samples that have it, and their
    mean over the classes that occur anywhere. ``dice_per_class`` holds None for a class
    in no sample; ``dice`` and ``hd95`` are None when no foreground class occurs at all."""

    def class_means(values: npt.NDArray[np.float64]) -> list[float | None]:
        means = []
        for column in values.T:
            present = column[~np.isnan(column)]
            means.append(float(present.mean()) if len(present) else None)
        return means

    def overall(means: list[float | None]) -> float | None:
        present = [value for value in means if value is not None]
        return float(np.mean(present)) if present else None

    dice_per_class = class_means(dice)
    hd95_per_class = class_means(hd95)
    return {
        "num_samples": len(dice),
        "dice": overall(dice_per_class),
        "dice_per_class": dice_per_class,
        "hd95": overall(hd95_per_class),
        "hd95_per_class": hd95_per_class,
    }


def segmentation_metrics(
    predictions: torch.Tensor | npt.NDArray[np.integer],
    targets: torch.Tensor | npt.NDArray[np.integer],
    *,
    num_classes: int,
    spacing: Spacing | None = None,
) -> dict[str, Any]:
    """Segmentation metrics of predicted label maps against target ones.

    Returns ``num_samples``, ``dice`` (mean over the foreground classes), ``dice_per_class``
    (classes 1..num_classes-1 in order), ``hd95`` (mean over the foreground classes, in mm
    with ``spacing``) and ``hd95_per_class``. A class absent from both masks of a sample is
    skipped for that sample; present in only one it counts Dice 0 and HD95 the image's
    diagonal (see :func:`segmentation_scores`). No NaN: a class that occurs in no sample
    is None in the per-class lists and left out of the means.
    """
    dice, hd95 = segmentation_scores(predictions, targets, num_classes=num_classes, spacing=spacing)
    return summarize_segmentation(dice, hd95)
