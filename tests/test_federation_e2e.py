"""Whole experiments: embedded (the CLI, no services) and distributed (real Celery workers
over the real Redis and PostgreSQL), including a worker killed in the middle of a round."""

import hashlib
import json
import sqlite3
import time
import uuid
from pathlib import Path

import pytest
from django.utils import timezone

from tests.broker import tasks_waiting_in_the_broker
from tests.conftest import (
    WorkerProcess,
    manage,
    needs_redis,
    new_experiment,
    service_env,
    wait_until_finished,
)
from training import services
from training.models import (
    Checkpoint,
    ClientUpdate,
    ClientUpdateStatus,
    ExperimentStatus,
    Round,
    RoundStatus,
)

pytestmark = pytest.mark.e2e


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def embedded_project(tmp_path):
    """A project on the embedded default with a registered 3-site dataset `lesions`;
    returns the environment its commands run in."""
    env = service_env(
        DJANGO_SETTINGS_MODULE="flproject.settings.local",
        DATABASE_URL=None,
        REDIS_URL=None,
        FEDLENS_DATA_DIR=str(tmp_path),
    )
    dataset_dir = tmp_path / "datasets" / "lesions"
    for step in (
        ("migrate", "--noinput"),
        ("bootstrap_admin",),
        ("make_synthetic_dataset", "--out", str(dataset_dir), "--sites", "3", "--per-site", "40",
         "--size", "32"),
        ("register_dataset", "--name", "lesions", "--path", str(dataset_dir)),
    ):  # fmt: skip
        result = manage(*step, env=env)
        assert result.returncode == 0, result.stderr
    return env


def test_an_embedded_experiment_runs_to_the_end_from_the_command_line(embedded_project, tmp_path):
    env = embedded_project

    result = manage(
        "run_experiment", "--dataset", "lesions", "--clients", "3", "--rounds", "2",
        "--local-epochs", "1", "--batch-size", "16", "--lr", "0.05", "--partition", "iid",
        "--seed", "0", "--json", str(tmp_path / "summary.json"), env=env,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [r["number"] for r in summary["rounds"]] == [1, 2]
    for fl_round in summary["rounds"]:
        assert [c["status"] for c in fl_round["clients"]] == ["succeeded"] * 3
        assert all(c["worker"] == "embedded-cli@fedlens" for c in fl_round["clients"])
        assert 0.0 <= fl_round["global"]["accuracy"] <= 1.0
        assert fl_round["global"]["roc_auc"] is not None
    assert set(summary["timing_seconds"]) == {"local_training", "aggregation", "evaluation",
                                              "total"}  # fmt: skip
    assert "round" in result.stdout and "accuracy" in result.stdout  # the metrics table
    # Each round's global model on the sites' validation data, then every model on every
    # site's data in the cross-site round that follows the last training round
    for fl_round in summary["rounds"]:
        assert sorted(fl_round["federated_evaluation"]["sites"]) == ["sim-1", "sim-2", "sim-3"]
        assert 0.0 <= fl_round["federated_evaluation"]["weighted"]["accuracy"] <= 1.0
    cross_site = summary["cross_site"]
    assert (cross_site["round"], cross_site["status"]) == (3, "closed")
    assert cross_site["models"] == ["global", "sim-1", "sim-2", "sim-3"]
    assert all(cell is not None for row in cross_site["cells"].values() for cell in row.values())
    assert "Cross-site evaluation" in result.stdout
    ledger = sqlite3.connect(tmp_path / "fedlens.sqlite3")
    stored = ledger.execute("SELECT file, sha256 FROM training_checkpoint").fetchall()
    assert len(stored) == 3  # the initial model and one per round
    for name, digest in stored:
        assert sha256_of(tmp_path / "models" / name) == digest


def test_a_seeded_embedded_run_repeats_its_metrics(embedded_project, tmp_path):
    """Two runs with the same seed give the same global metrics, round by round."""
    env = embedded_project
    summaries = []
    for run in ("first", "second"):
        result = manage(
            "run_experiment", "--dataset", "lesions", "--clients", "3", "--rounds", "2",
            "--partition", "dirichlet:0.5", "--seed", "7",
            "--json", str(tmp_path / f"{run}.json"), env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        summaries.append(json.loads((tmp_path / f"{run}.json").read_text()))

    first, second = ([r["global"] for r in s["rounds"]] for s in summaries)
    assert first == second


@pytest.mark.redis
@pytest.mark.worker
@needs_redis
@pytest.mark.django_db(transaction=True)
def test_a_distributed_experiment_runs_on_a_real_worker_over_redis(
    lesions_dataset, worker_env, tmp_path
):
    experiment = new_experiment(lesions_dataset, num_rounds=2, clients_per_round=3, min_clients=3)
    worker = WorkerProcess(f"gpu0-{uuid.uuid4().hex[:6]}@test", worker_env)
    try:
        services.start_experiment(experiment.pk)
        wait_until_finished(experiment)
    finally:
        worker.stop()

    assert experiment.status == ExperimentStatus.COMPLETED, experiment.failure_reason
    rounds = list(experiment.rounds.order_by("number"))
    assert [(r.number, r.kind, r.status) for r in rounds] == [
        (1, "train", "closed"), (2, "train", "closed"), (3, "evaluate", "closed"),
    ]  # fmt: skip
    evaluations = ClientUpdate.objects.filter(round=rounds[2])
    assert set(evaluations.values_list("status", "worker")) == {("succeeded", worker.name)}
    assert all(len(update.evaluation) == 4 for update in evaluations)  # global and 3 sites
    rounds = rounds[:2]
    updates = ClientUpdate.objects.filter(round__in=rounds)
    assert updates.count() == 6
    assert set(updates.values_list("status", "worker")) == {("succeeded", worker.name)}
    for update in updates:
        assert sha256_of(tmp_path / "models" / update.update_file.name) == update.update_sha256
        assert update.num_samples > 0
    checkpoints = Checkpoint.objects.filter(experiment=experiment)
    assert checkpoints.count() == 3
    for checkpoint in checkpoints:
        assert sha256_of(tmp_path / "models" / checkpoint.file.name) == checkpoint.sha256
        assert checkpoint.size_bytes == (tmp_path / "models" / checkpoint.file.name).stat().st_size
    assert checkpoints.filter(is_best=True).count() == 1
    assert all(r.metrics["global"]["num_samples"] > 0 for r in rounds)


@pytest.mark.redis
@pytest.mark.worker
@needs_redis
@pytest.mark.django_db(transaction=True)
def test_an_experiment_completes_after_a_worker_is_killed_in_the_middle_of_a_round(
    lesions_dataset, worker_env
):
    # Long enough local training that the victim is surely killed while training.
    experiment = new_experiment(
        lesions_dataset, num_rounds=2, clients_per_round=3, min_clients=2, local_epochs=10,
        round_timeout_seconds=30,
    )  # fmt: skip
    victim = WorkerProcess(f"victim-{uuid.uuid4().hex[:6]}@test", worker_env)
    survivor = WorkerProcess(f"survivor-{uuid.uuid4().hex[:6]}@test", worker_env, beat=True)
    try:
        services.start_experiment(experiment.pk)
        deadline = time.monotonic() + 60
        while not ClientUpdate.objects.filter(
            round__experiment=experiment, worker=victim.name, status=ClientUpdateStatus.RUNNING
        ).exists():
            assert time.monotonic() < deadline, "the victim never started a task"
            time.sleep(0.05)
        victim.kill()
        wait_until_finished(experiment)
    finally:
        victim.stop()
        survivor.stop()

    ledger = list(
        ClientUpdate.objects.filter(round__experiment=experiment).values_list(
            "round__number", "status", "worker", "started_at", "finished_at", "error"
        )
    )
    assert experiment.status == ExperimentStatus.COMPLETED, (experiment.failure_reason, ledger)
    assert set(experiment.rounds.values_list("status", flat=True)) == {RoundStatus.CLOSED}
    # The watchdog noticed that no live worker held the victim's task(s) and sent them again:
    # the survivor trained them, and round 1 counted all three clients, each once.
    first_round = experiment.rounds.get(number=1)
    resent = set(
        ClientUpdate.objects.filter(round=first_round, attempts__gt=1).values_list(
            "status", "worker"
        )
    )
    assert resent == {(ClientUpdateStatus.SUCCEEDED, survivor.name)}
    assert first_round.recoveries >= 1
    assert first_round.checkpoint.metrics["clients"]["num_clients"] == 3
    assert set(
        ClientUpdate.objects.filter(round__number=2, round__experiment=experiment).values_list(
            "status", "worker"
        )
    ) == {("succeeded", survivor.name)}


@pytest.mark.redis
@pytest.mark.worker
@needs_redis
@pytest.mark.django_db(transaction=True)
def test_an_experiment_completes_after_the_broker_lost_a_rounds_aggregation_task(
    lesions_dataset, worker_env
):
    experiment = new_experiment(lesions_dataset, num_rounds=2, clients_per_round=2, min_clients=2)
    # Nobody consumes the aggregation queue at first, so its message can be taken away.
    trainer = WorkerProcess(f"trainer-{uuid.uuid4().hex[:6]}@test", worker_env, queues="training")
    watchdog = None
    try:
        services.start_experiment(experiment.pk)
        deadline = time.monotonic() + 120
        while not Round.objects.filter(
            experiment=experiment, number=1, status=RoundStatus.AGGREGATING
        ).exists():
            assert time.monotonic() < deadline, "round 1 never closed for aggregation"
            time.sleep(0.1)
        first_round = experiment.rounds.get(number=1)
        lost = tasks_waiting_in_the_broker("aggregation", "workers.tasks.aggregate_round")
        assert lost == [[first_round.pk]]
        # As if the broker's redelivery wait (an hour by default) had passed since it closed.
        Round.objects.filter(pk=first_round.pk).update(aggregation_deadline=timezone.now())
        watchdog = WorkerProcess(
            f"watchdog-{uuid.uuid4().hex[:6]}@test", worker_env, queues="aggregation", beat=True
        )
        wait_until_finished(experiment)
    finally:
        trainer.stop()
        if watchdog is not None:
            watchdog.stop()

    assert experiment.status == ExperimentStatus.COMPLETED, experiment.failure_reason
    rounds = list(experiment.rounds.filter(kind="train").order_by("number"))
    assert [(r.number, r.status) for r in rounds] == [(1, "closed"), (2, "closed")]
    assert Checkpoint.objects.filter(experiment=experiment, round__number=1).count() == 1
