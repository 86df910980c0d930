"""A copy of each experiment in MLflow, for comparing runs in MLflow's tools.

Off unless MLFLOW_TRACKING_URI is set (a non-empty Django setting of that name wins over
the environment). Each FedLens experiment becomes one MLflow run, found again by its tag
`fedlens.experiment_id`, in the MLflow experiment MLFLOW_EXPERIMENT_NAME ("FedLens" by
default). The run holds the experiment's parameters, one step of metrics per closed round
(step = round number) and, once the experiment has ended, the best checkpoint's safetensors
file and the final status.

The ledger stays the source of truth: `export_experiment` compares the run with it and logs
only what the run lacks, so calling it again (a redelivered aggregation task) duplicates
nothing, and a call after an outage catches up. It never raises: a tracking server that is
down costs a warning, never a round. mlflow is imported on the first export, so processes
that do not track never load it.
"""

import hashlib
import logging
import math
import os
import tempfile
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings

from training import metric_catalog
from training.models import (
    Checkpoint,
    ClientUpdateStatus,
    Experiment,
    ExperimentStatus,
    Round,
    RoundKind,
    RoundStatus,
    model_store,
)

logger = logging.getLogger(__name__)

DEFAULT_MLFLOW_EXPERIMENT_NAME = "FedLens"
EXPERIMENT_ID_TAG = "fedlens.experiment_id"
# Logged for every round: its steps are the rounds the run already holds.
ROUND_MARKER_METRIC = "clients/succeeded"
CHECKPOINT_ARTIFACT_PATH = "checkpoint"
RUN_STATUS_BY_EXPERIMENT_STATUS = {
    ExperimentStatus.COMPLETED: "FINISHED",
    ExperimentStatus.FAILED: "FAILED",
    ExperimentStatus.STOPPED: "KILLED",
}
# MLflow's own defaults retry a failed request 7 times with growing pauses and wait up to
# 120 s for each answer: minutes of a worker's time per round while the server is down.
# These apply unless the operator sets the variables.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
MLFLOW_TAG_VALUE_LIMIT = 5000
READ_CHUNK_BYTES = 1 << 20


def configured(name: str) -> str:
    """A Django setting if the project sets it, else the environment variable."""
    return str(getattr(settings, name, None) or os.environ.get(name, "")).strip()


def tracking_uri() -> str:
    return configured("MLFLOW_TRACKING_URI")


def mlflow_experiment_name() -> str:
    return configured("MLFLOW_EXPERIMENT_NAME") or DEFAULT_MLFLOW_EXPERIMENT_NAME


def without_credentials(uri: str) -> str:
    """The URI as logs may show it: no user name or password."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def export_experiment(experiment_id: int) -> str | None:
    """Bring the experiment's MLflow run up to date with the ledger.

    Returns the run's id, or None when tracking is off or MLflow could not be reached (a
    warning is logged; the next export catches up).
    """
    uri = tracking_uri()
    if not uri:
        return None
    try:
        return export_to(uri, experiment_id)
    except Exception as exc:  # the copy in MLflow must never fail the caller's round
        logger.warning(
            "MLflow export of experiment %s to %s failed: %s: %s",
            experiment_id,
            without_credentials(uri),
            type(exc).__name__,
            exc,
        )
        return None


def export_to(uri: str, experiment_id: int) -> str:
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from mlflow.tracking import MlflowClient  # here: mlflow is only needed when tracking

    client = MlflowClient(tracking_uri=uri)
    experiment = Experiment.objects.select_related("dataset", "owner").get(pk=experiment_id)
    run = find_or_create_run(client, experiment)
    run_id = run.info.run_id
    if not run.data.params:  # also after a crash between creating the run and this
        log_parameters(client, run_id, experiment)
    log_new_rounds(client, run_id, experiment)
    if experiment.is_terminal and run.info.status == "RUNNING":
        finish_run(client, run_id, experiment)
    return run_id


def milliseconds(moment: datetime | None) -> int | None:
    return int(moment.timestamp() * 1000) if moment is not None else None


def mlflow_experiment_id(client: Any, name: str) -> str:
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name)
    except MlflowException:
        # Another worker created it in the meantime.
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


def find_or_create_run(client: Any, experiment: Experiment) -> Any:
    mlflow_experiment = mlflow_experiment_id(client, mlflow_experiment_name())
    runs = client.search_runs(
        [mlflow_experiment],
        filter_string=f"tags.`{EXPERIMENT_ID_TAG}` = '{experiment.pk}'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if runs:
        return runs[0]
    tags = {
        EXPERIMENT_ID_TAG: str(experiment.pk),
        "fedlens.owner": experiment.owner.get_username(),
        "fedlens.dataset": experiment.dataset.name,
    }
    if experiment.description:
        tags["mlflow.note.content"] = experiment.description[:MLFLOW_TAG_VALUE_LIMIT]
    return client.create_run(
        mlflow_experiment,
        start_time=milliseconds(experiment.started_at or experiment.created_at),
        tags=tags,
        run_name=experiment.name,
    )


def experiment_parameters(experiment: Experiment) -> dict[str, str]:
    parameters: dict[str, Any] = {
        "network": experiment.network,
        "strategy": experiment.strategy,
        "partition": experiment.partition,
        "num_rounds": experiment.num_rounds,
        "clients_per_round": experiment.clients_per_round,
        "min_clients": experiment.min_clients,
        "local_epochs": experiment.local_epochs,
        "batch_size": experiment.batch_size,
        "learning_rate": experiment.learning_rate,
        "optimizer": experiment.optimizer,
        "seed": experiment.seed,
        "dataset": experiment.dataset.name,
        "dataset_id": experiment.dataset_id,
        "round_timeout_seconds": experiment.round_timeout_seconds,
    }
    # One parameter per key, so that MLflow can compare runs by e.g. strategy.mu.
    for key, value in sorted(experiment.strategy_params.items()):
        parameters[f"strategy.{key}"] = value
    for key, value in sorted(experiment.network_params.items()):
        parameters[f"network.{key}"] = value
    return {key: str(value) for key, value in parameters.items()}


def log_parameters(client: Any, run_id: str, experiment: Experiment) -> None:
    from mlflow.entities import Param

    client.log_batch(
        run_id,
        params=[Param(key, value) for key, value in experiment_parameters(experiment).items()],
    )


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def round_metrics(fl_round: Round) -> dict[str, float]:
    """What one closed round adds to the run: the global model's held-out metrics, the
    clients' sample-weighted means, how many clients finished how, and the round's times."""
    recorded = fl_round.metrics or {}
    metrics: dict[str, float] = {}
    for key, value in (recorded.get("global") or {}).items():
        if is_number(value):  # not the confusion matrix, ROC curve and per-class lists
            metrics[f"global/{key}"] = float(value)
    clients = recorded.get("clients") or {}
    # The clients' means of the catalogue's metrics they report (loss, accuracy or Dice).
    for key, value in clients.items():
        if key in metric_catalog.METRICS and is_number(value):
            metrics[f"clients/mean_{key}"] = float(value)
    if is_number(clients.get("num_samples")):
        metrics["clients/num_samples"] = float(clients["num_samples"])
    for key in ("wall_seconds", "aggregation_seconds", "evaluation_seconds"):
        if is_number(recorded.get(key)):
            metrics[f"round/{key}"] = float(recorded[key])
    statuses = Counter(update.status for update in fl_round.client_updates.all())
    metrics["clients/failed"] = float(statuses[ClientUpdateStatus.FAILED])
    metrics["clients/late"] = float(statuses[ClientUpdateStatus.LATE])
    metrics[ROUND_MARKER_METRIC] = float(statuses[ClientUpdateStatus.SUCCEEDED])
    return metrics


def log_new_rounds(client: Any, run_id: str, experiment: Experiment) -> list[int]:
    """Log the closed rounds the run does not hold yet; returns their numbers."""
    from mlflow.entities import Metric

    logged = {metric.step for metric in client.get_metric_history(run_id, ROUND_MARKER_METRIC)}
    new_rounds = (
        # The cross-site round trains nothing: its results are not a step of the run.
        experiment.rounds.filter(status=RoundStatus.CLOSED, kind=RoundKind.TRAIN)
        .exclude(number__in=logged)
        .order_by("number")
        .prefetch_related("client_updates")
    )
    numbers = []
    for fl_round in new_rounds:
        timestamp = milliseconds(fl_round.closed_at or fl_round.opened_at)
        # The marker comes last: a batch cut short leaves the round to be logged again.
        metrics = sorted(
            round_metrics(fl_round).items(), key=lambda item: item[0] == ROUND_MARKER_METRIC
        )
        client.log_batch(
            run_id,
            metrics=[Metric(key, value, timestamp, fl_round.number) for key, value in metrics],
        )
        numbers.append(fl_round.number)
    return numbers


def checkpoint_filename(checkpoint: Checkpoint) -> str:
    """The name the API's download gives the file."""
    where = f"round-{checkpoint.round.number}" if checkpoint.round_id else "initial"
    return f"experiment-{checkpoint.experiment_id}-{where}.safetensors"


def log_checkpoint_artifact(client: Any, run_id: str, checkpoint: Checkpoint) -> None:
    """Upload the checkpoint's safetensors file, after checking it against the ledger."""
    with tempfile.TemporaryDirectory(prefix="fedlens-mlflow-") as folder:
        copy = Path(folder) / checkpoint_filename(checkpoint)
        digest = hashlib.sha256()
        with model_store().open(checkpoint.file.name, "rb") as source, copy.open("wb") as target:
            while chunk := source.read(READ_CHUNK_BYTES):
                digest.update(chunk)
                target.write(chunk)
        if digest.hexdigest() != checkpoint.sha256:
            raise ValueError(
                f"{checkpoint.file.name} does not have the SHA-256 the ledger recorded; "
                "not uploading it (run manage.py verify_model_store)"
            )
        client.log_artifact(run_id, str(copy), artifact_path=CHECKPOINT_ARTIFACT_PATH)


def finish_run(client: Any, run_id: str, experiment: Experiment) -> None:
    """The experiment ended: upload its best checkpoint, tag the outcome, close the run. The
    run is closed last, so that an export cut short before it is repeated whole."""
    from mlflow.entities import RunTag

    best = (
        Checkpoint.objects.filter(experiment=experiment, is_best=True)
        .select_related("round")
        .first()
    )
    tags = {"fedlens.status": experiment.status}
    if experiment.failure_reason:
        tags["fedlens.failure_reason"] = experiment.failure_reason[:MLFLOW_TAG_VALUE_LIMIT]
    if best is not None:
        log_checkpoint_artifact(client, run_id, best)
        tags["fedlens.best_checkpoint"] = f"{CHECKPOINT_ARTIFACT_PATH}/{checkpoint_filename(best)}"
        tags["fedlens.best_checkpoint_sha256"] = best.sha256
        tags["fedlens.best_round"] = str(best.round.number) if best.round_id else "0"
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    client.set_terminated(
        run_id,
        status=RUN_STATUS_BY_EXPERIMENT_STATUS[experiment.status],
        end_time=milliseconds(experiment.finished_at),
    )
