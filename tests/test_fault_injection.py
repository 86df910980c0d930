"""Faults injected into real processes: a Celery worker SIGKILLed, the broker (a Redis
server of the test's own) killed and restarted empty, the database connections terminated.
Each experiment must still complete with every round counted exactly once, recovered by the
watchdog (every second here) rather than by the broker's visibility timeout (an hour).

Each test prints how long the recovery took, from the fault to the faulted round's closing
(`pytest -s`, lines starting with "recovery:"); the numbers are not asserted.
"""

import os
import signal
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from django.db import connection
from kombu import pools as kombu_pools

from flproject.celery import app
from tests.conftest import (
    WorkerProcess,
    free_port,
    needs_redis,
    new_experiment,
    wait_until_finished,
)
from training import services
from training.models import (
    Checkpoint,
    ClientUpdate,
    ClientUpdateStatus,
    Experiment,
    ExperimentStatus,
    Round,
    RoundStatus,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.worker,
    needs_redis,
    pytest.mark.django_db(transaction=True),
]


class RedisServer:
    """A redis-server of the test's own that keeps nothing on disk: a restart starts empty."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def restart_empty(self) -> None:
        self.kill()
        self.start()


@contextmanager
def project_broker(url: str):
    """Point this process's Celery app (sending tasks, pinging workers) at `url`."""

    def use(broker_url: str) -> None:
        if app._pool is not None:
            app._pool.force_close_all()
        app._pool = None
        app.amqp._producer_pool = None
        # kombu's process-wide producer pools held connections of the pool closed above;
        # later tests would acquire from them ("Acquire on closed pool").
        kombu_pools.reset()
        app.conf.broker_url = broker_url

    previous = app.conf.broker_url
    use(url)
    try:
        yield
    finally:
        use(previous)


@pytest.fixture
def own_redis(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    with project_broker(server.url):
        yield server
    if server.process.poll() is None:
        server.kill()


@pytest.fixture
def fault_env(worker_env, own_redis):
    """Workers on the test's own Redis, whose watchdog looks every second."""
    return {**worker_env, "REDIS_URL": own_redis.url, "FEDLENS_RECOVERY_CONFIRM_SECONDS": "1"}


@pytest.fixture
def workers(fault_env):
    """Start workers by name prefix; all are stopped (or killed) at the end."""
    started: list[WorkerProcess] = []

    def start(prefix: str, **options) -> WorkerProcess:
        worker = WorkerProcess(f"{prefix}-{uuid.uuid4().hex[:6]}@test", fault_env, **options)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None:
            worker.kill()


def small_experiment(dataset, **fields) -> Experiment:
    options = {"num_rounds": 2, "clients_per_round": 2, "min_clients": 2, "local_epochs": 3}
    return new_experiment(dataset, **{**options, **fields})


def wait_for(condition, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


def client_running(experiment: Experiment, number: int = 1) -> bool:
    return ClientUpdate.objects.filter(
        round__experiment=experiment, round__number=number, status=ClientUpdateStatus.RUNNING
    ).exists()


def round_status(experiment: Experiment, number: int) -> str | None:
    return (
        Round.objects.filter(experiment=experiment, number=number)
        .values_list("status", flat=True)
        .first()
    )


def measure_recovery(name: str, experiment: Experiment, number: int, fault_at: float) -> float:
    """Seconds from the fault until round `number` closed, printed for the report."""
    wait_for(lambda: round_status(experiment, number) == RoundStatus.CLOSED, f"round {number}")
    seconds = time.monotonic() - fault_at
    print(f"\nrecovery: {name}: round {number} closed {seconds:.1f} s after the fault")
    return seconds


def assert_counted_exactly_once(experiment: Experiment, model_store: Path) -> None:
    """Completed; two training rounds and the cross-site round closed, each with one
    succeeded update per client; one checkpoint per training round and the initial one."""
    experiment.refresh_from_db()
    ledger = list(
        ClientUpdate.objects.filter(round__experiment=experiment).values_list(
            "round__number", "site_id", "status", "attempts", "error"
        )
    )
    assert experiment.status == ExperimentStatus.COMPLETED, (experiment.failure_reason, ledger)
    rounds = list(experiment.rounds.order_by("number").values_list("number", "kind", "status"))
    assert rounds == [(1, "train", "closed"), (2, "train", "closed"), (3, "evaluate", "closed")]
    for number in (1, 2):
        updates = [row for row in ledger if row[0] == number]
        assert len(updates) == 2 and {row[2] for row in updates} == {"succeeded"}, ledger
    checkpoints = Checkpoint.objects.filter(experiment=experiment)
    assert checkpoints.count() == 3
    assert sorted(checkpoints.exclude(round=None).values_list("round__number", flat=True)) == [
        1,
        2,
    ]
    assert checkpoints.filter(is_best=True).count() == 1
    for checkpoint in checkpoints:
        assert (model_store / checkpoint.file.name).is_file()


def test_a_worker_killed_during_training_is_replaced_and_its_task_sent_again(
    lesions_dataset, workers, tmp_path
):
    experiment = small_experiment(lesions_dataset, local_epochs=10)
    victim = workers("victim", beat=True)
    services.start_experiment(experiment.pk)
    wait_for(lambda: client_running(experiment), "a client of round 1 running")
    killed = ClientUpdate.objects.get(
        round__experiment=experiment, status=ClientUpdateStatus.RUNNING
    )

    victim.kill()
    fault_at = time.monotonic()
    workers("replacement", beat=True)
    measure_recovery("worker SIGKILL during training", experiment, 1, fault_at)
    wait_until_finished(experiment)

    assert_counted_exactly_once(experiment, tmp_path / "models")
    killed.refresh_from_db()
    assert killed.attempts == 2  # its task was sent once more, not waited for an hour
    assert experiment.rounds.get(number=1).recoveries >= 1


def test_a_worker_killed_during_aggregation_is_replaced_and_the_aggregation_sent_again(
    lesions_dataset, workers, tmp_path
):
    experiment = small_experiment(lesions_dataset)
    victim = workers("victim", beat=True)
    services.start_experiment(experiment.pk)
    wait_for(lambda: round_status(experiment, 1) == RoundStatus.AGGREGATING, "round 1 aggregating")
    # Frozen at once, so the aggregation cannot end before the kill.
    os.killpg(victim.process.pid, signal.SIGSTOP)
    victim.kill()
    fault_at = time.monotonic()
    first_round = experiment.rounds.get(number=1)
    assert first_round.status == RoundStatus.AGGREGATING
    workers("replacement", beat=True)
    measure_recovery("worker SIGKILL during aggregation", experiment, 1, fault_at)
    wait_until_finished(experiment)

    assert_counted_exactly_once(experiment, tmp_path / "models")
    first_round.refresh_from_db()
    # Sent again unless the victim had not taken it from the queue yet.
    print(f"recovery: aggregation of round 1 sent again {first_round.recoveries} time(s)")


def test_the_broker_restarted_empty_during_training_loses_no_client(
    lesions_dataset, workers, tmp_path, own_redis
):
    experiment = small_experiment(lesions_dataset, local_epochs=10)
    workers("worker", beat=True)
    services.start_experiment(experiment.pk)
    wait_for(lambda: client_running(experiment), "a client of round 1 running")

    own_redis.restart_empty()  # the other client's task waited in it
    fault_at = time.monotonic()
    measure_recovery("Redis restarted empty during training", experiment, 1, fault_at)
    wait_until_finished(experiment)

    assert_counted_exactly_once(experiment, tmp_path / "models")
    assert experiment.rounds.get(number=1).recoveries >= 1


def test_the_broker_down_when_the_last_client_reports_delays_the_aggregation_only(
    lesions_dataset, workers, tmp_path, own_redis
):
    experiment = small_experiment(lesions_dataset, local_epochs=10)
    workers("worker", beat=True)
    services.start_experiment(experiment.pk)
    updates = ClientUpdate.objects.filter(round__experiment=experiment, round__number=1)
    wait_for(
        lambda: set(updates.values_list("status", flat=True)) == {"succeeded", "running"},
        "one client of round 1 finished and the last one running",
    )

    own_redis.kill()
    fault_at = time.monotonic()
    wait_for(
        lambda: round_status(experiment, 1) == RoundStatus.AGGREGATING,
        "the last report recorded and round 1 closed without the broker",
    )
    # Down for longer than a publisher's retries (about a second), so the send failed.
    time.sleep(3)
    own_redis.start()  # empty: the aggregation task could not be sent
    measure_recovery("Redis down when the last client reports", experiment, 1, fault_at)
    wait_until_finished(experiment)

    assert_counted_exactly_once(experiment, tmp_path / "models")
    assert experiment.rounds.get(number=1).recoveries >= 1


def terminate_other_database_connections() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def test_database_connections_terminated_during_training_keep_the_clients_reports(
    lesions_dataset, workers, tmp_path
):
    experiment = small_experiment(lesions_dataset, local_epochs=30)
    workers("worker", beat=True)
    services.start_experiment(experiment.pk)
    wait_for(lambda: client_running(experiment), "a client of round 1 running")
    time.sleep(0.5)  # into its training, past the reads that follow the claim

    assert terminate_other_database_connections() >= 1
    fault_at = time.monotonic()
    measure_recovery("database connections terminated during a report", experiment, 1, fault_at)
    wait_until_finished(experiment)

    assert_counted_exactly_once(experiment, tmp_path / "models")
    # The report was written on a new connection: no client's work was done twice.
    sends = ClientUpdate.objects.filter(round__experiment=experiment).values_list(
        "round__number", "site_id", "attempts", "error"
    )
    assert {row[2] for row in sends} == {1}, list(sends)


def test_database_connections_terminated_during_aggregation_keep_the_round(
    lesions_dataset, workers, tmp_path
):
    experiment = small_experiment(lesions_dataset)
    workers("worker", beat=True)
    services.start_experiment(experiment.pk)
    wait_for(lambda: round_status(experiment, 1) == RoundStatus.AGGREGATING, "round 1 aggregating")

    terminate_other_database_connections()
    fault_at = time.monotonic()
    measure_recovery("database connections terminated during aggregation", experiment, 1, fault_at)
    wait_until_finished(experiment)

    assert_counted_exactly_once(experiment, tmp_path / "models")
