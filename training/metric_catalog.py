"""One definition per metric: what the dashboard, the report, the exports, the comparison
and the best-checkpoint choice know about the numbers the engine reports.

The engine (training/fl/metrics.py, training/fl/evaluation.py) computes the values; this
module says what each is called, which task reports it, which way is better, whether it
holds one value per class and how to print it. Plain Python: training, visualization and
workers import it, and the page receives it as JSON (``catalogue_json``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CLASSIFICATION",
    "METRICS",
    "SEGMENTATION",
    "TASKS",
    "Metric",
    "catalogue_json",
    "format_value",
    "get_metric",
    "is_better",
    "lower_is_better",
    "metric_label",
    "per_class_metrics",
    "primary_metric",
    "scalar_metrics",
]

# The values of training.models.Task, repeated here so that this module needs no Django.
CLASSIFICATION = "classification"
SEGMENTATION = "segmentation"
TASKS = (CLASSIFICATION, SEGMENTATION)
BOTH = (CLASSIFICATION, SEGMENTATION)


@dataclass(frozen=True)
class Metric:
    name: str  # the key in the metric dicts the engine reports
    label: str  # what people read
    tasks: tuple[str, ...]  # the tasks whose evaluations report it
    higher_is_better: bool
    per_class: bool = False  # a list with one value per class instead of one number
    # In [0, 1]: charts fix their axis there and heatmaps colour against it.
    bounded: bool = True
    digits: int = 3  # decimals when printed
    unit: str = ""  # "mm" for distances; printed after the number
    column: str = ""  # its name in CSV columns and text tables when shorter than `name`

    @property
    def column_name(self) -> str:
        return self.column or self.name

    def format(self, value: Any) -> str:
        """The value as text ("-" for a missing or non-finite value)."""
        return format_value(value, digits=self.digits, unit=self.unit)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "tasks": list(self.tasks),
            "higher_is_better": self.higher_is_better,
            "per_class": self.per_class,
            "bounded": self.bounded,
            "digits": self.digits,
            "unit": self.unit,
            "column": self.column_name,
        }


# Display order: within a task, the catalogue's order (after the primary metric) is the
# order of table columns, chart lines and heatmap choices; the loss comes last.
_DEFINITIONS = (
    Metric("accuracy", "accuracy", (CLASSIFICATION,), higher_is_better=True),
    Metric("balanced_accuracy", "balanced accuracy", (CLASSIFICATION,), higher_is_better=True),
    Metric("roc_auc", "AUC", (CLASSIFICATION,), higher_is_better=True, column="auc"),
    Metric("sensitivity", "sensitivity", (CLASSIFICATION,), higher_is_better=True),
    Metric("specificity", "specificity", (CLASSIFICATION,), higher_is_better=True),
    Metric("precision", "precision", (CLASSIFICATION,), higher_is_better=True, per_class=True),
    Metric("recall", "recall", (CLASSIFICATION,), higher_is_better=True, per_class=True),
    Metric("dice", "Dice", (SEGMENTATION,), higher_is_better=True),
    Metric(
        "dice_per_class", "Dice per class", (SEGMENTATION,), higher_is_better=True, per_class=True
    ),
    Metric(
        "hd95", "HD95", (SEGMENTATION,), higher_is_better=False, bounded=False, digits=2, unit="mm"
    ),
    Metric(
        "hd95_per_class",
        "HD95 per class",
        (SEGMENTATION,),
        higher_is_better=False,
        per_class=True,
        bounded=False,
        digits=2,
        unit="mm",
    ),
    Metric("loss", "loss", BOTH, higher_is_better=False, bounded=False),
    # Privacy spent up to a round (client-level DP): a property of the run, not of a model.
    Metric("epsilon", "ε", BOTH, higher_is_better=False, bounded=False, digits=3),
)

METRICS: dict[str, Metric] = {metric.name: metric for metric in _DEFINITIONS}

# The number that ranks models of a task: the best checkpoint, the sparkline, the heatmap.
_PRIMARY = {CLASSIFICATION: "accuracy", SEGMENTATION: "dice"}
# Metrics that describe models; epsilon describes the run and is shown on its own.
_MODEL_METRICS = tuple(name for name in METRICS if name != "epsilon")


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; use one of {', '.join(TASKS)}.")
    return task


def get_metric(name: str) -> Metric:
    """The definition of ``name``; KeyError naming the known metrics for any other."""
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"Unknown metric {name!r}; known: {', '.join(METRICS)}.") from None


def primary_metric(task: str) -> str:
    """ "accuracy" for classification, "dice" for segmentation."""
    return _PRIMARY[_check_task(task)]


def scalar_metrics(task: str) -> list[str]:
    """The task's one-number model metrics, primary first, then in catalogue order."""
    primary = primary_metric(task)
    names = [
        name
        for name in _MODEL_METRICS
        if task in METRICS[name].tasks and not METRICS[name].per_class and name != primary
    ]
    return [primary, *names]


def per_class_metrics(task: str) -> list[str]:
    """The task's metrics that hold one value per class (Dice per class, precision, ...)."""
    _check_task(task)
    return [
        name for name in _MODEL_METRICS if task in METRICS[name].tasks and METRICS[name].per_class
    ]


def lower_is_better(name: str) -> bool:
    """Whether smaller values of ``name`` are better; a name outside the catalogue counts as
    a loss when it ends in "loss" (the engine's extra losses), else as a score."""
    metric = METRICS.get(name)
    return not metric.higher_is_better if metric is not None else name.endswith("loss")


def is_better(name: str, candidate: float, incumbent: float) -> bool:
    """Whether ``candidate`` is strictly better than ``incumbent`` for metric ``name``."""
    return candidate < incumbent if lower_is_better(name) else candidate > incumbent


def metric_label(name: str) -> str:
    """The catalogue's label, or the key with spaces for a metric it does not define."""
    metric = METRICS.get(name)
    return metric.label if metric is not None else name.replace("_", " ")


def format_value(value: Any, *, digits: int = 3, unit: str = "") -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "-"
    text = f"{value:.{digits}f}"
    return f"{text} {unit}" if unit else text


def catalogue_json(task: str) -> dict[str, Any]:
    """What a page needs to draw a task's metrics: the task, its primary metric, its scalar
    and per-class metric names in display order, and every definition they use."""
    scalars = scalar_metrics(task)
    per_class = per_class_metrics(task)
    return {
        "task": task,
        "primary": primary_metric(task),
        "scalar": scalars,
        "per_class": per_class,
        "metrics": {name: METRICS[name].as_json() for name in [*scalars, *per_class, "epsilon"]},
    }
