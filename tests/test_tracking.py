"""The MLflow copy of experiments (training/tracking.py), in MLflow's own local file store.

Experiments run here, in the test's process, through the real Celery task functions, so the
export is reached from its call site in workers/tasks.py; the tasks that start_experiment
and the rounds queue are never sent, because the test's transaction never commits.
"""

import hashlib
import logging
import os
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.broker import tasks_waiting_in_the_broker
from tests.conftest import new_experiment, service_env
from tests.factories import ExperimentFactory
from training import services, tracking
from training.models import Checkpoint, Experiment, ExperimentStatus, RoundKind
from workers import tasks

pytestmark = pytest.mark.django_db

ROUNDS = 2


@pytest.fixture(autouse=True)
def isolated_mlflow_environment(monkeypatch):
    """No tracking server from the developer's shell; and the HTTP defaults that an export
    sets for its process are taken back after each test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = {name: os.environ.get(name) for name in tracking.HTTP_DEFAULTS}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def mlflow_store(settings, monkeypatch, tmp_path):
    """MLFLOW_TRACKING_URI pointing at a local file store of this test's own."""
    uri = (tmp_path / "mlruns").as_uri()
    settings.MLFLOW_TRACKING_URI = uri
    settings.MLFLOW_EXPERIMENT_NAME = "FedLens tests"
    # MLflow 3 refuses its file store unless asked for it; it needs no server.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def run_in_process(experiment: Experiment) -> Experiment:
    """Train and aggregate every round here, in order, then evaluate across sites, as a
    worker would; then the export that the experiment's completion queues."""
    services.start_experiment(experiment.pk)
    experiment.refresh_from_db()
    while not experiment.is_terminal:
        fl_round = experiment.rounds.get(number=experiment.current_round)
        for update in fl_round.client_updates.all():
            assert tasks.train_client(update.pk, update.round_id, update.site_id) == "succeeded"
        if fl_round.kind == RoundKind.TRAIN:  # the cross-site round aggregates nothing
            assert tasks.aggregate_round(fl_round.pk) == "completed"
        experiment.refresh_from_db()
    tasks.export_to_tracking(experiment.pk)
    return experiment


@pytest.fixture
def draft_experiment(lesions_dataset):
    """Two rounds of two simulated clients on a small synthetic image set."""
    return new_experiment(
        lesions_dataset, num_rounds=ROUNDS, clients_per_round=2, min_clients=2,
        strategy_params={"server_learning_rate": 1.0},
    )  # fmt: skip


def runs_of(client: MlflowClient, experiment: Experiment):
    mlflow_experiment = client.get_experiment_by_name("FedLens tests")
    return client.search_runs(
        [mlflow_experiment.experiment_id],
        filter_string=f"tags.`fedlens.experiment_id` = '{experiment.pk}'",
    )


def test_a_finished_experiment_is_one_finished_run_with_its_parameters(
    mlflow_store, draft_experiment
):
    experiment = run_in_process(draft_experiment)

    [run] = runs_of(mlflow_store, experiment)
    assert run.info.run_name == "distributed"
    assert run.info.status == "FINISHED"
    assert run.data.tags["fedlens.status"] == ExperimentStatus.COMPLETED
    assert run.data.params == {
        "network": "cnn-small", "strategy": "fedavg", "strategy.server_learning_rate": "1.0",
        "partition": "iid", "num_rounds": "2", "clients_per_round": "2", "min_clients": "2",
        "local_epochs": "1", "batch_size": "16", "learning_rate": "0.05", "optimizer": "sgd",
        "seed": "0", "dataset": experiment.dataset.name,
        "dataset_id": str(experiment.dataset_id), "round_timeout_seconds": "3600",
    }  # fmt: skip


def test_each_round_is_one_step_of_metrics(mlflow_store, draft_experiment):
    experiment = run_in_process(draft_experiment)

    [run] = runs_of(mlflow_store, experiment)
    rounds = list(experiment.rounds.filter(kind=RoundKind.TRAIN).order_by("number"))
    for name, recorded in (
        ("global/accuracy", [r.metrics["global"]["accuracy"] for r in rounds]),
        ("global/loss", [r.metrics["global"]["loss"] for r in rounds]),
        ("global/roc_auc", [r.metrics["global"]["roc_auc"] for r in rounds]),
        ("global/balanced_accuracy", [r.metrics["global"]["balanced_accuracy"] for r in rounds]),
        ("clients/mean_loss", [r.metrics["clients"]["loss"] for r in rounds]),
        ("clients/mean_accuracy", [r.metrics["clients"]["accuracy"] for r in rounds]),
        ("clients/succeeded", [2, 2]),
    ):
        history = mlflow_store.get_metric_history(run.info.run_id, name)
        logged = sorted((metric.step, metric.value) for metric in history)
        assert logged == list(enumerate(recorded, start=1)), name


def test_the_best_checkpoint_is_the_runs_safetensors_artifact(
    mlflow_store, draft_experiment, tmp_path
):
    experiment = run_in_process(draft_experiment)

    [run] = runs_of(mlflow_store, experiment)
    best = Checkpoint.objects.get(experiment=experiment, is_best=True)
    artifacts = [a.path for a in mlflow_store.list_artifacts(run.info.run_id, "checkpoint")]
    filename = f"experiment-{experiment.pk}-round-{best.round.number}.safetensors"
    assert artifacts == [f"checkpoint/{filename}"]
    downloaded = mlflow_store.download_artifacts(run.info.run_id, artifacts[0], str(tmp_path))
    with open(downloaded, "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == best.sha256
    assert load_file(downloaded)  # tensors, no pickle
    assert run.data.tags["fedlens.best_checkpoint_sha256"] == best.sha256


def test_exporting_again_logs_no_round_twice(mlflow_store, draft_experiment):
    experiment = run_in_process(draft_experiment)
    last_round = experiment.rounds.get(number=ROUNDS)

    # A redelivered aggregation finds its round closed; a later export finds nothing new.
    assert tasks.aggregate_round(last_round.pk) == "skipped: not waiting for aggregation"
    tracking.export_experiment(experiment.pk)
    tracking.export_experiment(experiment.pk)

    [run] = runs_of(mlflow_store, experiment)
    for name in ("global/accuracy", "clients/succeeded", "round/wall_seconds"):
        steps = [m.step for m in mlflow_store.get_metric_history(run.info.run_id, name)]
        assert sorted(steps) == [1, 2], name
    assert len(mlflow_store.list_artifacts(run.info.run_id, "checkpoint")) == 1


def test_a_round_missed_by_an_export_is_caught_up_by_the_next(
    mlflow_store, draft_experiment, settings
):
    tracked_uri = settings.MLFLOW_TRACKING_URI
    settings.MLFLOW_TRACKING_URI = ""  # round 1 closes while tracking is off
    services.start_experiment(draft_experiment.pk)
    first_round = draft_experiment.rounds.get(number=1)
    for update in first_round.client_updates.all():
        tasks.train_client(update.pk, update.round_id, update.site_id)
    tasks.aggregate_round(first_round.pk)

    settings.MLFLOW_TRACKING_URI = tracked_uri
    tracking.export_experiment(draft_experiment.pk)

    [run] = runs_of(mlflow_store, draft_experiment)
    steps = [m.step for m in mlflow_store.get_metric_history(run.info.run_id, "global/accuracy")]
    assert steps == [1]
    assert run.info.status == "RUNNING"


def test_a_failed_experiment_ends_its_run_as_failed(mlflow_store):
    experiment = ExperimentFactory(
        status=ExperimentStatus.FAILED, failure_reason="Round 1: 0 of 2 clients succeeded."
    )

    run_id = tracking.export_experiment(experiment.pk)

    run = mlflow_store.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["fedlens.status"] == "failed"
    assert run.data.tags["fedlens.failure_reason"] == "Round 1: 0 of 2 clients succeeded."


def test_without_a_tracking_uri_nothing_is_logged_and_mlflow_is_never_imported(tmp_path):
    probe = (
        "import sys, django\n"
        "django.setup()\n"
        "from training import tracking\n"
        "import workers.tasks\n"
        "assert tracking.export_experiment(1) is None\n"
        "print(sorted(name for name in sys.modules if name.partition('.')[0] == 'mlflow'))\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path, env=service_env(MLFLOW_TRACKING_URI=None),
        capture_output=True, encoding="utf-8", timeout=120,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert list(tmp_path.iterdir()) == []  # no mlruns/ or mlflow.db appeared


def test_an_unreachable_tracking_server_fails_neither_the_export_nor_the_rounds(
    settings, draft_experiment, caplog
):
    settings.MLFLOW_TRACKING_URI = "http://127.0.0.1:1"
    started = time.monotonic()

    with caplog.at_level(logging.WARNING, logger="training.tracking"):
        experiment = run_in_process(draft_experiment)
        assert tracking.export_experiment(experiment.pk) is None

    assert experiment.status == ExperimentStatus.COMPLETED
    warnings = [r.getMessage() for r in caplog.records if r.name == "training.tracking"]
    assert len(warnings) == ROUNDS + 2  # each round's, the completion's and the one above
    assert all("http://127.0.0.1:1" in warning for warning in warnings)
    # The worker's time lost to a server that is down stays bounded (MLflow's own defaults
    # would retry for minutes per export).
    assert time.monotonic() - started < 120


def exports_waiting_in_the_broker() -> list[int]:
    """The experiments of the export_to_tracking messages in the aggregation queue."""
    waiting = tasks_waiting_in_the_broker("aggregation", "workers.tasks.export_to_tracking")
    return [arguments[0] for arguments in waiting]


@pytest.mark.parametrize("tracked", [True, False])
def test_stopping_an_experiment_sends_its_end_to_tracking_only_when_tracking_is_on(
    settings, django_capture_on_commit_callbacks, tracked
):
    settings.MLFLOW_TRACKING_URI = "file:///tmp/unused-mlruns" if tracked else ""
    experiment = ExperimentFactory(status=ExperimentStatus.RUNNING)
    exports_waiting_in_the_broker()  # start from an empty queue

    with django_capture_on_commit_callbacks(execute=True):
        services.stop_experiment(experiment.pk)

    assert exports_waiting_in_the_broker() == ([experiment.pk] if tracked else [])
