"""Report figures and metric exports of one experiment, read from its round ledger.

Figures are drawn with matplotlib's object API (a `Figure` on its own Agg canvas), never
through pyplot: pyplot keeps a global "current figure" that every thread of the web process
would share.

Every metric in the ledger is optional. Rounds that are open, aggregating or failed carry
empty metrics, clients that failed carry none, and keys such as ``update_norm`` appear only
from some version on, so each value is read with a fallback and a panel without data says so.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from django.db.models import Prefetch

from training import faults, metric_catalog
from training.differential_privacy import privacy_settings, uses_client_level_dp
from training.models import ClientUpdate, Dataset, Experiment, Round, RoundKind, RoundStatus
from visualization import evaluations

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# matplotlib is imported by the functions that draw: a web process loads it with the first
# figure it serves, not at start-up.

REPORT_CONTENT_TYPES = {"png": "image/png", "svg": "image/svg+xml", "pdf": "application/pdf"}
PNG_DPI = 150
FIGURE_INCHES = (12.0, 18.0)  # 1800 x 2700 pixels at PNG_DPI

# The columns of `metrics_rows`, in the order the CSV export writes them. One row stands for
# one client update (one site in one round); the round's held-out evaluation is repeated on
# each of its rows so that a spreadsheet can plot either without a join. The metric columns
# depend on the experiment's task (see `metric_columns`).
CLIENT_COLUMNS = (
    "experiment",  # the experiment's id
    "round",  # the round's number, from 1
    "round_status",  # open, aggregating, closed or failed
    "site",  # the site's slug
    "client_status",  # pending, running, succeeded, failed or late
    "worker",  # the Celery worker that trained, empty until one claims the task
    "num_samples",  # training samples the site used
    "train_loss",  # the site's mean training loss in the round
    # train_<primary metric>: the site's training accuracy (Dice) in the round
)
TRAINING_COLUMNS = (
    "train_seconds",  # time spent in local training
    "update_norm",  # L2 norm of the site's update, when recorded
    "distance_to_aggregate",  # distance of the site's model to the aggregate, when recorded
    "started_at",  # ISO 8601, when a worker claimed the task
    "finished_at",  # ISO 8601, when the result (or the failure) was recorded
    # global_<metric>: the round's held-out evaluation of the aggregated model, each of the
    # task's one-number metrics (loss first); Dice per class as one column per foreground
    # class, global_dice_<class name>
)
ROUND_COLUMNS = (
    "epsilon",  # privacy spent up to the round (ε for the experiment's δ), with client-level DP
    "client_error",  # why the client failed or was late (empty when it succeeded)
)

NO_DATA = "no data yet"
Series = tuple[list[int], list[float]]  # round numbers and their values
# Beyond these sizes, cell counts and class names would only overprint each other.
MAX_ANNOTATED_CLASSES = 12
MAX_LABELLED_CLASSES = 30
MAX_SITES_IN_LEGEND = 12
MAX_CLASS_NAME_CHARACTERS = 18
REPORT_LINE_CHARACTERS = 160
MAX_FAILURES_IN_REPORT = 12


def column_slug(name: str) -> str:
    """A class name as a column suffix: lower case, runs of other characters as "_"."""
    return "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split()) or "class"


def global_metric_columns(
    task: str, names: Sequence[str] = ()
) -> dict[str, tuple[str, int | None]]:
    """Column name to (catalogue metric, class index or None) for the round's held-out
    evaluation: the loss, the task's other one-number metrics, then, for segmentation, the
    Dice of each foreground class named in `names` (all class names, background first)."""
    scalars = metric_catalog.scalar_metrics(task)
    ordered = ["loss", *(name for name in scalars if name != "loss")]
    columns: dict[str, tuple[str, int | None]] = {
        f"global_{metric_catalog.get_metric(name).column_name}": (name, None) for name in ordered
    }
    if task == metric_catalog.SEGMENTATION:
        # dice_per_class lists the foreground classes 1..K-1: the background has no Dice.
        for position, name in enumerate(names[1:]):
            column = f"global_dice_{column_slug(str(name))}"
            while column in columns:  # two names with the same slug
                column += "_"
            columns[column] = ("dice_per_class", position)
    return columns


def metric_columns(task: str, names: Sequence[str] = ()) -> tuple[str, ...]:
    """The CSV's columns for an experiment of `task` whose dataset's classes are `names`."""
    primary = metric_catalog.primary_metric(task)
    return (
        *CLIENT_COLUMNS,
        f"train_{primary}",
        *TRAINING_COLUMNS,
        *global_metric_columns(task, names),
        *ROUND_COLUMNS,
    )


# A classification experiment's columns (the API's schema names these).
METRIC_COLUMNS = metric_columns(metric_catalog.CLASSIFICATION)


class UnknownRound(ValueError):
    """A report was asked for a round that the experiment does not have."""


# --- Reading the ledger ---------------------------------------------------------------------


def ledger_rounds(experiment: Experiment) -> list[Round]:
    """The experiment's training rounds by number, each with its client updates and their
    sites (the cross-site round is read by visualization/evaluations.py).

    Two queries whatever the number of rounds and clients.
    """
    updates = ClientUpdate.objects.select_related("site").order_by("site__slug")
    return list(
        experiment.rounds.filter(kind=RoundKind.TRAIN)
        .order_by("number")
        .prefetch_related(Prefetch("client_updates", queryset=updates))
    )


def as_mapping(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one (metrics may be null or missing)."""
    return value if isinstance(value, dict) else {}


def as_number(value: Any) -> float | None:
    """A finite number for plotting, or None for anything else (null, text, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def held_out_metrics(fl_round: Round) -> dict[str, Any]:
    """The round's evaluation of the aggregated model; empty when there is none (yet)."""
    return as_mapping(as_mapping(fl_round.metrics).get("global"))


def iso_time(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def class_names(dataset: Dataset, count: int) -> list[str]:
    """Names for classes 0..count-1; "class i" where the dataset names none."""
    named = dataset.class_names if isinstance(dataset.class_names, list) else []
    return [
        str(named[index])
        if index < len(named) and named[index] not in (None, "")
        else f"class {index}"
        for index in range(count)
    ]


# --- Metric exports -------------------------------------------------------------------------


def experiment_class_names(experiment: Experiment) -> list[str]:
    dataset = experiment.dataset
    return class_names(dataset, dataset.num_classes)


def metric_value(evaluation: dict[str, Any], name: str, position: int | None) -> Any:
    value = evaluation.get(name)
    if position is None:
        return value
    return value[position] if isinstance(value, list) and position < len(value) else None


def client_rows(experiment: Experiment, rounds: Iterable[Round]) -> list[dict[str, Any]]:
    task = experiment.task
    primary = metric_catalog.primary_metric(task)
    global_columns = global_metric_columns(task, experiment_class_names(experiment))
    rows = []
    for fl_round in rounds:
        evaluation = held_out_metrics(fl_round)
        round_columns = {
            **{
                column: metric_value(evaluation, name, position)
                for column, (name, position) in global_columns.items()
            },
            "epsilon": fl_round.epsilon,
        }
        for update in fl_round.client_updates.all():
            training = as_mapping(update.metrics)
            rows.append(
                {
                    "experiment": experiment.pk,
                    "round": fl_round.number,
                    "round_status": fl_round.status,
                    "site": update.site.slug,
                    "client_status": update.status,
                    "worker": update.worker,
                    "num_samples": update.num_samples,
                    "train_loss": training.get("loss"),
                    f"train_{primary}": training.get(primary),
                    "train_seconds": training.get("train_seconds"),
                    "update_norm": training.get("update_norm"),
                    "distance_to_aggregate": training.get("distance_to_aggregate"),
                    "started_at": iso_time(update.started_at),
                    "finished_at": iso_time(update.finished_at),
                    **round_columns,
                    "client_error": update.error,
                }
            )
    return rows


def metrics_rows(experiment: Experiment) -> list[dict[str, Any]]:
    """One row per client update (a site in a round), keyed by `metric_columns` of the
    experiment's task (METRIC_COLUMNS for classification).

    Rows run by round number, then site slug. A metric the ledger lacks is None; times are
    ISO 8601 strings. Two queries, however many rounds and clients.
    """
    return client_rows(experiment, ledger_rounds(experiment))


def metrics_csv(experiment: Experiment) -> str:
    """`metrics_rows` as CSV with a header row; a missing value is an empty cell."""
    output = io.StringIO()
    columns = metric_columns(experiment.task, experiment_class_names(experiment))
    writer = csv.DictWriter(output, fieldnames=columns, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(metrics_rows(experiment))
    return output.getvalue()


def metrics_json(experiment: Experiment) -> dict[str, Any]:
    """The experiment's set-up, each round's aggregated metrics, and `metrics_rows`.

    ``rounds[i]["global"]`` is the round's full held-out evaluation as recorded (confusion
    matrix and ROC curve included; for segmentation ``dice``, ``dice_per_class`` and
    ``hd95``) or None; ``rounds[i]["clients"]`` the sample-weighted
    means of its clients' training metrics or None.
    """
    rounds = ledger_rounds(experiment)
    dataset = experiment.dataset
    return {
        "experiment": {
            "id": experiment.pk,
            "name": experiment.name,
            "status": experiment.status,
            "failure_reason": experiment.failure_reason,
            "task": experiment.task,
            "dataset": {
                "id": dataset.pk,
                "name": dataset.name,
                "num_classes": dataset.num_classes,
                "class_names": class_names(dataset, dataset.num_classes),
            },
            "network": experiment.network,
            "strategy": experiment.strategy,
            "strategy_params": experiment.strategy_params,
            "partition": experiment.partition,
            "num_rounds": experiment.num_rounds,
            "clients_per_round": experiment.clients_per_round,
            "min_clients": experiment.min_clients,
            "local_epochs": experiment.local_epochs,
            "batch_size": experiment.batch_size,
            "learning_rate": experiment.learning_rate,
            "optimizer": experiment.optimizer,
            "seed": experiment.seed,
            "differential_privacy": privacy_settings(experiment),
            "current_round": experiment.current_round,
            "created_at": iso_time(experiment.created_at),
            "started_at": iso_time(experiment.started_at),
            "finished_at": iso_time(experiment.finished_at),
        },
        "rounds": [round_summary(fl_round) for fl_round in rounds],
        "clients": client_rows(experiment, rounds),
        # Sites that succeeded in none of the rounds they were picked for.
        "sites_lost_every_round": [asdict(site) for site in faults.lost_sites(experiment)],
    }


def round_summary(fl_round: Round) -> dict[str, Any]:
    metrics = as_mapping(fl_round.metrics)
    return {
        "number": fl_round.number,
        "status": fl_round.status,
        "opened_at": iso_time(fl_round.opened_at),
        "closed_at": iso_time(fl_round.closed_at),
        "global": held_out_metrics(fl_round) or None,
        "clients": as_mapping(metrics.get("clients")) or None,
        "aggregation_seconds": metrics.get("aggregation_seconds"),
        "evaluation_seconds": metrics.get("evaluation_seconds"),
        "wall_seconds": metrics.get("wall_seconds"),
        "epsilon": fl_round.epsilon,
        # Its global model on each site's validation split ("sites") and their mean.
        "federated_evaluation": fl_round.federated_evaluation or None,
    }


# --- The report figure ----------------------------------------------------------------------


def render_report(experiment: Experiment, fmt: str, *, round_number: int | None = None) -> bytes:
    """The experiment's report as one figure in `fmt` (png, svg or pdf).

    Panels: held-out loss and quality (the task's bounded metrics: accuracy, balanced
    accuracy, AUC; Dice) per round; each site's training loss and primary metric per round;
    for classification, the confusion matrix and ROC curve (or, for more than two classes,
    per-class precision and recall) of one round: `round_number`, by default the last closed
    round with a held-out evaluation; for segmentation instead, Dice per class and HD95 per
    round; the sites' federated evaluation per round by the primary metric and the
    cross-site evaluation's heatmap. Raises UnknownRound when the experiment has no training
    round `round_number`.
    """
    if fmt not in REPORT_CONTENT_TYPES:
        formats = ", ".join(REPORT_CONTENT_TYPES)
        raise ValueError(f"Unknown report format {fmt!r}; use one of {formats}.")
    rounds = ledger_rounds(experiment)
    shown = chosen_round(experiment, rounds, round_number)
    dataset = experiment.dataset

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_INCHES, layout="constrained")
    FigureCanvasAgg(figure)
    (
        (loss_axes, quality_axes),
        (site_loss_axes, site_accuracy_axes),
        (matrix_axes, curve_axes),
        (federated_axes, cross_site_axes),
    ) = figure.subplots(4, 2)
    figure.suptitle(report_title(experiment, rounds), fontsize=13, parse_math=False)
    failures = failures_text(experiment)
    if failures:  # below the panels; constrained layout makes room for it
        figure.supxlabel(failures, x=0.01, ha="left", fontsize=8, parse_math=False)
    task = experiment.task
    primary = metric_catalog.get_metric(metric_catalog.primary_metric(task))
    draw_held_out_loss(loss_axes, rounds)
    draw_held_out_quality(quality_axes, rounds, task)
    draw_privacy_spent(quality_axes, experiment, rounds)
    draw_site_metric(site_loss_axes, rounds, "loss", "Training loss per site")
    draw_site_metric(site_accuracy_axes, rounds, primary.name, f"Training {primary.label} per site")
    if task == metric_catalog.SEGMENTATION:
        # A model that labels voxels has no confusion matrix or ROC curve of images.
        draw_dice_per_class(matrix_axes, rounds, dataset)
        draw_hd95(curve_axes, rounds)
    else:
        draw_confusion_matrix(matrix_axes, shown, dataset)
        if dataset.num_classes == 2:
            draw_roc_curve(curve_axes, shown)
        else:
            draw_per_class_scores(curve_axes, shown, dataset)
    evaluations.draw_federated_evaluation(federated_axes, rounds, NO_DATA, primary.name)
    evaluations.draw_heatmap(cross_site_axes, evaluations.cross_site_document(experiment), NO_DATA)

    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=PNG_DPI, metadata=file_metadata(fmt, experiment))
    return buffer.getvalue()


def chosen_round(
    experiment: Experiment, rounds: Sequence[Round], round_number: int | None
) -> Round | None:
    """The round whose confusion matrix and ROC curve the report shows, if any."""
    if round_number is None:
        evaluated = [r for r in rounds if r.status == RoundStatus.CLOSED and held_out_metrics(r)]
        return evaluated[-1] if evaluated else None
    for fl_round in rounds:
        if fl_round.number == round_number:
            return fl_round
    if not rounds:
        raise UnknownRound(f"Experiment {experiment.pk} has no rounds yet.")
    raise UnknownRound(
        f"Experiment {experiment.pk} has no round {round_number}; "
        f"its rounds are {rounds[0].number} to {rounds[-1].number}."
    )


def report_title(experiment: Experiment, rounds: Sequence[Round]) -> str:
    closed = sum(1 for r in rounds if r.status == RoundStatus.CLOSED)
    details = (
        f"dataset {experiment.dataset.name}  ·  strategy {experiment.strategy}  ·  "
        f"network {experiment.network}  ·  {experiment.status}, "
        f"{closed} of {experiment.num_rounds} rounds closed"
    )
    title = f"{experiment.name} (experiment {experiment.pk})\n{details}"
    spent = [r.epsilon for r in rounds if r.epsilon is not None]
    if uses_client_level_dp(experiment):
        title += (
            f"\nclient-level DP: clip {experiment.dp_clip:g}, noise multiplier "
            f"{experiment.dp_noise:g} at the {experiment.dp_at}, "
            + (f"ε = {spent[-1]:.3g}" if spent else "no round closed yet")
            + f" for δ = {experiment.dp_delta:g}"
        )
    if experiment.failure_reason:
        title += "\n" + shortened_line(experiment.failure_reason, 110)
    lost = faults.lost_sites(experiment)
    if lost:
        sites = ", ".join(site.site for site in lost)
        title += f"\nWARNING: sites lost in every round: {sites} (reasons below)"
    return title


def shortened_line(text: str, limit: int = REPORT_LINE_CHARACTERS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failures_text(experiment: Experiment) -> str:
    """The report's list of client failures, by round and site with the reason; empty when
    every client succeeded. The CSV export has them all, with no limit."""
    failures = faults.client_failures(experiment)
    if not failures:
        return ""
    lines = [f"Client failures ({len(failures)}; round, site: reason):"]
    for failure in failures[:MAX_FAILURES_IN_REPORT]:
        where = "cross-site" if failure.kind == RoundKind.EVALUATE else f"round {failure.round}"
        reason = f"{failure.status}: {failure.error}" if failure.error else failure.status
        lines.append(shortened_line(f"{where}, {failure.site}: {reason}"))
    hidden = len(failures) - MAX_FAILURES_IN_REPORT
    if hidden > 0:
        lines.append(f"... and {hidden} more: see metrics.csv (column client_error)")
    return "\n".join(lines)


def file_metadata(fmt: str, experiment: Experiment) -> dict[str, Any]:
    """The file's title. No creation date: PNG and PDF files of an unchanged ledger stay
    byte-identical, which suits caches and comparisons."""
    title = f"FedLens report: {experiment.name}"
    if fmt == "svg":
        return {"Title": title, "Date": None}
    if fmt == "pdf":
        return {"Title": title, "Creator": "FedLens", "CreationDate": None}
    return {"Title": title, "Software": "FedLens"}


def show_no_data(axes: Axes, message: str = NO_DATA) -> None:
    axes.set_xticks([])
    axes.set_yticks([])
    axes.text(
        0.5,
        0.5,
        message,
        ha="center",
        va="center",
        color="grey",
        fontsize="large",
        transform=axes.transAxes,
        wrap=True,
        parse_math=False,
    )


def per_round_series(rounds: Iterable[Round], read: Callable[[Round], Any]) -> Series:
    """Round numbers and values of `read(round)`, skipping rounds where it is not a number."""
    numbers, values = [], []
    for fl_round in rounds:
        value = as_number(read(fl_round))
        if value is not None:
            numbers.append(fl_round.number)
            values.append(value)
    return numbers, values


def label_round_axis(axes: Axes, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.set_xlabel("round")
    axes.set_ylabel(ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)


def clients_mean(fl_round: Round) -> dict[str, Any]:
    """The sample-weighted means of the round's client training metrics; may be empty."""
    return as_mapping(as_mapping(fl_round.metrics).get("clients"))


def plot_per_round(axes: Axes, lines: Sequence[tuple[str, str, Series]]) -> bool:
    """Draw each (label, line style, series) that has points; False when none has any."""
    drawn = [(label, style, series) for label, style, series in lines if series[0]]
    if not drawn:
        show_no_data(axes)
        return False
    for label, style, (numbers, values) in drawn:
        axes.plot(numbers, values, linestyle=style, marker="o", markersize=4, label=label)
    return True


def draw_held_out_loss(axes: Axes, rounds: Sequence[Round]) -> None:
    axes.set_title("Loss per round")
    held_out = per_round_series(rounds, lambda r: held_out_metrics(r).get("loss"))
    training = per_round_series(rounds, lambda r: clients_mean(r).get("loss"))
    lines = [
        ("held-out loss (global model)", "-", held_out),
        ("training loss (clients' mean)", "--", training),
    ]
    if plot_per_round(axes, lines):
        label_round_axis(axes, "loss")
        axes.legend(loc="upper right", fontsize="small")


def draw_held_out_quality(
    axes: Axes, rounds: Sequence[Round], task: str = metric_catalog.CLASSIFICATION
) -> None:
    """The task's metrics in [0, 1] per round (the catalogue's), primary metric first."""
    bounded = [
        metric_catalog.get_metric(name)
        for name in metric_catalog.scalar_metrics(task)
        if metric_catalog.get_metric(name).bounded
    ]
    axes.set_title(f"Held-out {bounded[0].label} per round")
    lines = [
        (
            metric.label,
            "-",
            per_round_series(rounds, lambda r, key=metric.name: held_out_metrics(r).get(key)),
        )
        for metric in bounded
    ]
    if plot_per_round(axes, lines):
        label_round_axis(axes, "score")
        axes.set_ylim(0, 1.02)
        axes.legend(loc="lower right", fontsize="small")


def draw_privacy_spent(axes: Axes, experiment: Experiment, rounds: Sequence[Round]) -> None:
    """ε after each round on the right axis of the quality panel: what the accuracy cost."""
    numbers, values = per_round_series(rounds, lambda r: r.epsilon)
    if not numbers:
        return
    privacy_axes = axes.twinx()
    privacy_axes.plot(
        numbers,
        values,
        color="tab:purple",
        linestyle="-.",
        marker="s",
        markersize=4,
        label=f"ε spent (δ = {experiment.dp_delta:g}), right axis",
    )
    privacy_axes.set_ylabel("ε")
    privacy_axes.set_ylim(bottom=0)
    from matplotlib.ticker import MaxNLocator

    privacy_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    privacy_axes.legend(loc="center right", fontsize="small")


def draw_site_metric(axes: Axes, rounds: Sequence[Round], key: str, title: str) -> None:
    axes.set_title(title)
    by_site: dict[str, tuple[list[int], list[float]]] = {}
    for fl_round in rounds:
        for update in fl_round.client_updates.all():
            value = as_number(as_mapping(update.metrics).get(key))
            if value is not None:
                numbers, values = by_site.setdefault(update.site.slug, ([], []))
                numbers.append(fl_round.number)
                values.append(value)
    if not by_site:
        show_no_data(axes)
        return
    for slug, (numbers, values) in sorted(by_site.items()):
        axes.plot(numbers, values, marker="o", markersize=3, linewidth=1.2, label=slug)
    metric = metric_catalog.METRICS.get(key)
    label_round_axis(axes, metric_catalog.metric_label(key))
    if metric is not None and metric.bounded:
        axes.set_ylim(0, 1.02)
    if len(by_site) <= MAX_SITES_IN_LEGEND:
        axes.legend(fontsize="small", ncols=2 if len(by_site) > 6 else 1)
    else:
        axes.set_title(f"{title} ({len(by_site)} sites)")


def evaluated_round(axes: Axes, shown: Round | None, what: str) -> dict[str, Any] | None:
    """The held-out metrics of `shown`, or None after saying in `axes` why there are none."""
    if shown is None:
        axes.set_title(what)
        show_no_data(axes, f"{NO_DATA}: no round has a held-out evaluation")
        return None
    axes.set_title(f"{what}, round {shown.number}")
    evaluation = held_out_metrics(shown)
    if not evaluation:
        show_no_data(axes, f"{NO_DATA}: round {shown.number} is {shown.status}")
        return None
    return evaluation


def square_matrix(value: Any) -> np.ndarray | None:
    try:
        matrix = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        return None
    return matrix


def shortened(name: str) -> str:
    limit = MAX_CLASS_NAME_CHARACTERS
    return name if len(name) <= limit else name[: limit - 1] + "…"


def draw_confusion_matrix(axes: Axes, shown: Round | None, dataset: Dataset) -> None:
    evaluation = evaluated_round(axes, shown, "Confusion matrix (held-out)")
    if evaluation is None:
        return
    matrix = square_matrix(evaluation.get("confusion_matrix"))
    if matrix is None:
        show_no_data(axes, "no confusion matrix recorded")
        return
    count = matrix.shape[0]
    # Colour by the share of each true class, so that rare classes stay readable.
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    axes.figure.colorbar(image, ax=axes, label="share of the true class", shrink=0.85)
    if count <= MAX_LABELLED_CLASSES:
        names = [shortened(name) for name in class_names(dataset, count)]
        axes.set_xticks(range(count), labels=names, rotation=45, ha="right", parse_math=False)
        axes.set_yticks(range(count), labels=names, parse_math=False)
    if count <= MAX_ANNOTATED_CLASSES:
        for (true_class, predicted), cases in np.ndenumerate(matrix):
            share = shares[true_class, predicted]
            axes.text(
                predicted,
                true_class,
                f"{int(cases)}",
                ha="center",
                va="center",
                color="white" if share > 0.6 else "black",
                fontsize="large" if count <= 4 else "small",
            )
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")


def draw_roc_curve(axes: Axes, shown: Round | None) -> None:
    evaluation = evaluated_round(axes, shown, "ROC curve (held-out)")
    if evaluation is None:
        return
    curve = as_mapping(evaluation.get("roc_curve"))
    fpr, tpr = curve.get("fpr"), curve.get("tpr")
    if not isinstance(fpr, list) or not isinstance(tpr, list) or len(fpr) != len(tpr) or not fpr:
        show_no_data(axes, "no ROC curve: the held-out set lacks one of the two classes")
        return
    auc = as_number(evaluation.get("roc_auc"))
    auc_text = f"AUC = {auc:.3f}" if auc is not None else "AUC n/a"
    axes.plot(fpr, tpr, linewidth=2, label=f"round {shown.number} ({auc_text})")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance (AUC = 0.5)")
    sensitivity = as_number(evaluation.get("sensitivity"))
    specificity = as_number(evaluation.get("specificity"))
    if sensitivity is not None and specificity is not None:
        axes.plot(
            [1 - specificity],
            [sensitivity],
            marker="o",
            linestyle="none",
            color="black",
            label=f"predicted labels (sens. {sensitivity:.2f}, spec. {specificity:.2f})",
        )
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_aspect("equal")
    axes.set_xlabel("false positive rate (1 - specificity)")
    axes.set_ylabel("true positive rate (sensitivity)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")


def draw_per_class_scores(axes: Axes, shown: Round | None, dataset: Dataset) -> None:
    """Multi-class tasks have no single ROC curve: precision and recall per class instead."""
    evaluation = evaluated_round(axes, shown, "Precision and recall per class (held-out)")
    if evaluation is None:
        return
    precision = [as_number(v) for v in evaluation.get("precision") or []]
    recall = [as_number(v) for v in evaluation.get("recall") or []]
    count = max(len(precision), len(recall))
    if count == 0:
        show_no_data(axes, "no per-class metrics recorded")
        return
    positions = np.arange(count)
    for offset, label, values in ((-0.2, "precision", precision), (0.2, "recall", recall)):
        heights = [
            values[i] if i < len(values) and values[i] is not None else 0.0 for i in range(count)
        ]
        axes.bar(positions + offset, heights, width=0.4, label=label)
    if count <= MAX_LABELLED_CLASSES:
        names = [shortened(name) for name in class_names(dataset, count)]
        axes.set_xticks(positions, labels=names, rotation=45, ha="right", parse_math=False)
    axes.set_ylim(0, 1.02)
    axes.set_ylabel("score")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="best", fontsize="small")


def per_round_source(fl_round: Round) -> dict[str, Any]:
    """The round's held-out evaluation, else its sites' weighted federated evaluation."""
    held_out = held_out_metrics(fl_round)
    if held_out:
        return held_out
    return as_mapping(as_mapping(fl_round.federated_evaluation).get("weighted"))


def draw_dice_per_class(axes: Axes, rounds: Sequence[Round], dataset: Dataset) -> None:
    """Each foreground class's Dice per round, and the mean over them."""
    metric = metric_catalog.get_metric("dice_per_class")
    axes.set_title(f"{metric.label} per round (held-out, else the sites' weighted)")
    by_class: dict[int, tuple[list[int], list[float]]] = {}
    for fl_round in rounds:
        values = per_round_source(fl_round).get(metric.name)
        for position, value in enumerate(values if isinstance(values, list) else []):
            number = as_number(value)
            if number is not None:
                numbers, series = by_class.setdefault(position, ([], []))
                numbers.append(fl_round.number)
                series.append(number)
    mean = per_round_series(rounds, lambda r: per_round_source(r).get("dice"))
    # dice_per_class lists the foreground classes 1..K-1: names from position + 1.
    names = class_names(dataset, max(dataset.num_classes, len(by_class) + 1))
    lines = [("mean over the classes", "-", mean)] + [
        (shortened(names[position + 1]), "--", series)
        for position, series in sorted(by_class.items())
    ]
    if plot_per_round(axes, lines):
        label_round_axis(axes, "Dice")
        axes.set_ylim(0, 1.02)
        axes.legend(loc="lower right", fontsize="small")


def draw_hd95(axes: Axes, rounds: Sequence[Round]) -> None:
    """HD95 of the global model per round: held-out, and on each site's validation data."""
    metric = metric_catalog.get_metric("hd95")
    axes.set_title(f"{metric.label} per round ({metric.unit}, lower is better)")
    by_site: dict[str, tuple[list[int], list[float]]] = {}
    for fl_round in rounds:
        sites = as_mapping(as_mapping(fl_round.federated_evaluation).get("sites"))
        for slug, metrics in sorted(sites.items()):
            number = as_number(as_mapping(metrics).get(metric.name))
            if number is not None:
                numbers, values = by_site.setdefault(slug, ([], []))
                numbers.append(fl_round.number)
                values.append(number)
    held_out = per_round_series(rounds, lambda r: held_out_metrics(r).get(metric.name))
    lines = [("global model (held-out)", "-", held_out)] + [
        (slug, "--", series) for slug, series in list(by_site.items())[:MAX_SITES_IN_LEGEND]
    ]
    if plot_per_round(axes, lines):
        label_round_axis(axes, f"{metric.label} ({metric.unit})")
        axes.set_ylim(bottom=0)
        axes.legend(loc="upper right", fontsize="small")
