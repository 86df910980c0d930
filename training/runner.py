"""Running an experiment from the command line: simulated sites, progress, the summary.

Used by `manage.py run_experiment` and `manage.py demo`. Progress is read from the ledger,
so it is the same whether the work runs in an embedded worker or on remote workers.
"""

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, TextIO

from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.core.management.base import OutputWrapper
from tqdm import tqdm

from training import faults, metric_catalog, site_evaluation
from training.differential_privacy import privacy_settings
from training.models import (
    TERMINAL_CLIENT_UPDATE_STATUSES,
    Checkpoint,
    ClientUpdate,
    Experiment,
    Round,
    RoundKind,
    RoundStatus,
    Site,
)

POLL_SECONDS = 0.1


class ExperimentInputError(ValueError):
    """The experiment's settings were refused; the message says which and why."""


@contextmanager
def quiet_task_logs(verbosity: int) -> Iterator[None]:
    """Keep Celery's and the ledger's line per task, and the in-process worker's start, out
    of the progress bars unless asked (-v 2); warnings (failed and late clients) still show.
    Levels are restored on exit.

    Celery's worker sets Django up again as it starts (its Django fix-up), which applies
    settings.LOGGING anew and with it the "celery" logger's configured level: the quiet
    level goes into that configuration too, for as long as the command runs."""
    names = ("celery", "training.services", "training.resume", "workers.embedded")
    loggers = [logging.getLogger(name) for name in names]
    levels = [each.level for each in loggers]
    configured = django_settings.LOGGING.get("loggers", {})
    configured_levels = {
        name: configured[name].get("level") for name in names if name in configured
    }
    if verbosity < 2:
        for each in loggers:
            each.setLevel(logging.WARNING)
        for name in configured_levels:
            configured[name]["level"] = "WARNING"
    try:
        yield
    finally:
        for each, level in zip(loggers, levels, strict=True):
            each.setLevel(level)
        for name, level in configured_levels.items():
            configured[name]["level"] = level


def simulated_sites(count: int) -> list[Site]:
    """Sites sim-1 ... sim-<count>, created on first use and reused by later runs."""
    sites = []
    for number in range(1, count + 1):
        site, _ = Site.objects.get_or_create(
            slug=f"sim-{number}",
            defaults={"name": f"Simulated site {number}", "description": "Simulated client."},
        )
        if not site.is_active:
            site.is_active = True
            site.save(update_fields=["is_active"])
        sites.append(site)
    return sites


def default_owner(username: str | None):
    users = get_user_model().objects
    if username:
        return users.get(username=username)
    owner = users.filter(is_superuser=True).order_by("pk").first()
    if owner is None:
        raise ExperimentInputError(
            "No user to own the experiment: run `manage.py bootstrap_admin` or pass --owner."
        )
    return owner


def create_experiment(owner, settings: dict[str, Any]) -> Experiment:
    """Validate `settings` exactly as the REST API does, then store a draft experiment."""
    from training.api.serializers import ExperimentSerializer

    serializer = ExperimentSerializer(
        data=settings, context={"request": SimpleNamespace(user=owner)}
    )
    if not serializer.is_valid():
        problems = "; ".join(
            f"{field}: {' '.join(map(str, messages))}"
            for field, messages in serializer.errors.items()
        )
        raise ExperimentInputError(problems)
    return serializer.save(owner=owner)


class _Unterminated:
    """Hands tqdm's carriage-return refreshes to a Django OutputWrapper without the line
    ending it appends to every write (which printed a new bar line per refresh)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def write(self, text: str) -> None:
        if isinstance(self._out, OutputWrapper):
            self._out.write(text, ending="")
        else:
            self._out.write(text)

    def flush(self) -> None:
        self._out.flush()


def watch_experiment(
    experiment_id: int,
    *,
    out: TextIO,
    on_round_closed: Callable[[Round], None] | None = None,
) -> Experiment:
    """Show a progress bar per round until the experiment ends; return it in its end state."""
    bar: tqdm | None = None
    shown_round = 0
    reported: set[int] = set()
    while True:
        experiment = Experiment.objects.get(pk=experiment_id)
        current = (
            Round.objects.filter(experiment_id=experiment_id, number=experiment.current_round)
            .only("pk", "number", "status", "kind")
            .first()
        )
        if current is not None and current.number != shown_round:
            if bar is not None:
                bar.close()
            clients = ClientUpdate.objects.filter(round=current).count()
            bar = tqdm(
                total=clients,
                desc="cross-site evaluation"
                if current.kind == RoundKind.EVALUATE
                else f"round {current.number}",
                unit="client",
                file=_Unterminated(out),
            )
            shown_round = current.number
        if bar is not None and current is not None:
            done = ClientUpdate.objects.filter(
                round=current, status__in=TERMINAL_CLIENT_UPDATE_STATUSES
            ).count()
            bar.update(done - bar.n)
        # Training rounds; the cross-site round's results are in summarize()'s "cross_site".
        for closed in Round.objects.filter(
            experiment_id=experiment_id, status=RoundStatus.CLOSED, kind=RoundKind.TRAIN
        ).exclude(pk__in=reported):
            reported.add(closed.pk)
            if on_round_closed is not None:
                on_round_closed(closed)
        if experiment.is_terminal:
            if bar is not None:
                bar.close()
            return experiment
        time.sleep(POLL_SECONDS)


def round_row(fl_round: Round) -> dict[str, Any]:
    """A closed round as a row of the command line's table: the clients' training loss and
    primary metric, then the held-out loss and the task's other one-number metrics (the
    metric catalogue's; classification: accuracy, ..., segmentation: dice, hd95)."""
    metrics = fl_round.metrics
    evaluation = metrics.get("global") or {}
    clients = metrics.get("clients") or {}
    task = fl_round.experiment.task
    primary = metric_catalog.primary_metric(task)
    scores = [name for name in metric_catalog.scalar_metrics(task) if name != "loss"]
    return {
        "round": fl_round.number,
        "clients": clients.get("num_clients"),
        "train_loss": clients.get("loss"),
        f"train_{primary}": clients.get(primary),
        "loss": evaluation.get("loss"),
        **{metric_catalog.get_metric(name).column_name: evaluation.get(name) for name in scores},
        "epsilon": fl_round.epsilon,
        "wall_seconds": metrics.get("wall_seconds"),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """`round_row`s as a text table, one column per key (the rows of one experiment)."""
    if not rows:
        return ""
    columns = list(rows[0])
    if all(row.get("epsilon") is None for row in rows):
        columns.remove("epsilon")  # an experiment without differential privacy

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    widths = {c: max(len(c), *(len(cell(row[c])) for row in rows)) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(row[c]).rjust(widths[c]) for c in columns) for row in rows]
    return "\n".join(lines)


def initial_federated_evaluation(experiment: Experiment) -> dict[str, Any] | None:
    initial = Checkpoint.objects.filter(experiment=experiment, round__isnull=True).first()
    return initial.metrics.get("federated_evaluation") if initial is not None else None


def format_cross_site(results: dict[str, Any], metric: str | None = None) -> str:
    """The cross-site matrix as text: a row per model, a column per site's validation data,
    and the sample-weighted mean over the sites; "-" where a site has no result. The cells
    hold `metric`, by default the task's primary one (accuracy, or Dice when the sites
    report Dice)."""
    if metric is None:
        # The matrix does not name its task: the sites reported Dice only for segmentation.
        dice = [weighted.get("dice") for weighted in results["weighted"].values()]
        segmented = any(value is not None for value in dice)
        task = metric_catalog.SEGMENTATION if segmented else metric_catalog.CLASSIFICATION
        metric = metric_catalog.primary_metric(task)
    columns = [*results["sites"], "weighted"]
    rows = [
        [model]
        + [
            cell.get(metric) if (cell := results["cells"][model][site]) else None
            for site in results["sites"]
        ]
        + [results["weighted"][model].get(metric)]
        for model in results["models"]
    ]
    texts = [
        [row[0]] + [f"{value:.4f}" if isinstance(value, float) else "-" for value in row[1:]]
        for row in rows
    ]
    header = [f"{metric}: model \\ site data", *columns]
    widths = [max(len(line[i]) for line in [header, *texts]) for i in range(len(header))]
    return "\n".join(
        "  ".join(text.rjust(width) for text, width in zip(line, widths, strict=True))
        for line in [header, *texts]
    )


def summarize(experiment: Experiment, *, wall_seconds: float) -> dict[str, Any]:
    """The JSON summary: configuration, per-round global and per-client metrics, timings."""
    rounds = []
    local_training = aggregation = evaluation = 0.0
    training_rounds = experiment.rounds.filter(kind=RoundKind.TRAIN).order_by("number")
    for fl_round in training_rounds.prefetch_related("client_updates__site"):
        clients = [
            {
                "site": update.site.slug,
                "status": update.status,
                "worker": update.worker,
                "num_samples": update.num_samples,
                "metrics": update.metrics,
                "error": update.error,
            }
            for update in fl_round.client_updates.all()
        ]
        local_training += sum(c["metrics"].get("train_seconds", 0.0) for c in clients)
        aggregation += fl_round.metrics.get("aggregation_seconds", 0.0)
        evaluation += fl_round.metrics.get("evaluation_seconds", 0.0)
        rounds.append(
            {
                "number": fl_round.number,
                "status": fl_round.status,
                "global": fl_round.metrics.get("global"),
                "clients_aggregate": fl_round.metrics.get("clients"),
                # Its global model on the sites' validation splits: per site slug, "weighted".
                "federated_evaluation": fl_round.federated_evaluation or None,
                "epsilon": fl_round.epsilon,
                "wall_seconds": fl_round.metrics.get("wall_seconds"),
                "clients": clients,
            }
        )
    return {
        "experiment": experiment.pk,
        "status": experiment.status,
        "failure_reason": experiment.failure_reason,
        "configuration": {
            "dataset": experiment.dataset.name,
            "task": experiment.task,
            "network": experiment.network,
            "strategy": experiment.strategy,
            "strategy_params": experiment.strategy_params,
            "partition": experiment.partition,
            "rounds": experiment.num_rounds,
            "clients_per_round": experiment.clients_per_round,
            "client_fraction": experiment.client_fraction,
            "min_clients": experiment.min_clients,
            "aggregation_weighting": experiment.aggregation_weighting,
            "local_epochs": experiment.local_epochs,
            "batch_size": experiment.batch_size,
            "learning_rate": experiment.learning_rate,
            "optimizer": experiment.optimizer,
            "seed": experiment.seed,
            "differential_privacy": privacy_settings(experiment),
            "cloned_from": experiment.cloned_from_id,
            "sweep": experiment.sweep_id,
        },
        "rounds": rounds,
        # The initial model on the sites' validation splits (round 1's clients evaluated it).
        "initial_federated_evaluation": initial_federated_evaluation(experiment),
        # Every model on every site's validation split (None when no cross-site round ran).
        "cross_site": site_evaluation.cross_site_results(experiment),
        # Failed and late clients with their reasons, and the sites that never contributed.
        **faults.failures_summary(experiment),
        "timing_seconds": {
            "local_training": local_training,
            "aggregation": aggregation,
            "evaluation": evaluation,
            "total": wall_seconds,
        },
    }
