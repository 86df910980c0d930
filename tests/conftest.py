"""Shared fixtures. Which services the suite uses is decided by flproject/settings/test.py."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from celery import Celery
from django.conf import settings
from django.db import connection
from rest_framework.test import APIClient

from flproject.celery import app
from tests.factories import SiteFactory, UserFactory
from training import federation
from training.fl.data import generate_synthetic_dataset
from training.models import Dataset, Experiment

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def uses_redis() -> bool:
    return not settings.FEDLENS_EMBEDDED


def pytest_report_header(config):
    database = settings.DATABASES["default"]
    if database["ENGINE"].endswith("sqlite3"):
        where = database["NAME"]
    else:
        where = f"{database['HOST']}:{database['PORT']}, database {database['TEST'].get('NAME')}"
    broker = settings.REDIS_URL or "memory:// (embedded mode; Redis tests skipped)"
    return [
        f"FedLens database: {database['ENGINE'].rsplit('.', 1)[-1]} {where}",
        f"FedLens broker and channel layer: {broker}",
    ]


@pytest.fixture(scope="session", autouse=True)
def clean_test_redis_database():
    """The suite owns its Redis database number: empty at start, emptied at the end."""
    if not uses_redis():
        yield
        return
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.flushdb()
    yield
    client.flushdb()
    client.close()


@pytest.fixture(autouse=True)
def model_store_in_tmp(settings, tmp_path):
    """Each test writes checkpoints into its own folder."""
    settings.STORAGES = {
        **settings.STORAGES,
        "models": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(tmp_path / "models")},
        },
    }


@pytest.fixture(autouse=True)
def forget_ledger_reads_cached_by_id():
    """A worker process keeps what it read of an experiment by its id; a test's rolled-back
    rows free their ids for the next test."""
    yield
    federation.forget_ledger_reads()


@pytest.fixture
def dataset_root(settings):
    """A folder under FEDLENS_DATASET_ROOTS for datasets registered through the API."""
    root = Path(settings.FEDLENS_DATASET_ROOTS[-1]) / uuid.uuid4().hex
    root.mkdir(parents=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def api_client():
    return APIClient()


@pytest.fixture
def staff_user(db):
    return UserFactory(username="staff", is_staff=True)


def client_for(user) -> APIClient:
    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    return client


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def service_env(**overrides: str) -> dict[str, str]:
    """The environment for a process the suite starts: the suite's own settings by default."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.update(overrides)
    return {key: value for key, value in env.items() if value is not None}


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`manage.py ARGS` in a process of its own with `env`; its output captured."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT_ROOT, env=env, capture_output=True, encoding="utf-8", timeout=600,
    )  # fmt: skip


@pytest.fixture
def embedded_env(tmp_path) -> dict[str, str]:
    """The environment of a migrated project on the embedded default (SQLite, the
    in-process worker) in `tmp_path`, with its administrator."""
    env = service_env(
        DJANGO_SETTINGS_MODULE="flproject.settings.local",
        DATABASE_URL=None,
        REDIS_URL=None,
        FEDLENS_DATA_DIR=str(tmp_path),
    )
    for step in (("migrate", "--noinput"), ("bootstrap_admin",)):
        result = manage(*step, env=env)
        assert result.returncode == 0, result.stderr
    return env


def stop_process(process: subprocess.Popen, timeout: float = 15) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_celery_worker(name: str, queues: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "flproject",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            "1",
            "--queues",
            queues,
            "--hostname",
            name,
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
        errors="replace",
    )


# A loaded two-core machine starting PyTorch, Opacus and Django in a fresh process.
WORKER_START_SECONDS = 120


def wait_for_worker(app, name: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise RuntimeError(f"worker {name} exited early:\n{output}")
        if app.control.ping(destination=[name], timeout=0.5):
            return
    raise RuntimeError(f"worker {name} did not answer within {timeout} s")


needs_redis = pytest.mark.skipif(
    settings.FEDLENS_EMBEDDED, reason="needs Redis (CI=true makes it required)"
)


@pytest.fixture
def lesions_dataset(dataset_root):
    path = generate_synthetic_dataset(dataset_root / "lesions", sites=3, per_site=40, size=32)
    return Dataset.objects.create(
        name=f"lesions-{uuid.uuid4().hex[:6]}", owner=UserFactory(), storage_format="folder",
        num_classes=2, channels=1, image_shape=[32, 32], path=str(path),
    )  # fmt: skip


@pytest.fixture
def worker_env(tmp_path):
    """Worker processes see the test database and this test's model store."""
    database = connection.settings_dict
    url = f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"
    return service_env(
        DATABASE_URL=url, FEDLENS_DATA_DIR=str(tmp_path), FEDLENS_WATCHDOG_INTERVAL_SECONDS="1"
    )


class WorkerProcess:
    """A real `celery worker` in its own process group, so SIGKILL takes its children too."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        *,
        beat: bool = False,
        queues: str = "training,aggregation",
    ) -> None:
        self.name = name
        command = [
            sys.executable, "-m", "celery", "-A", "flproject", "worker", "--pool", "prefork",
            "--concurrency", "1", "--queues", queues, "--hostname", name,
            "--loglevel", "INFO", "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        if beat:
            command += ["--beat", "--schedule", str(Path(env["FEDLENS_DATA_DIR"]) / "beat")]
        # Its log goes to a file: a pipe nobody reads fills up and blocks the worker's next
        # log line, and with it every task.
        self.log = Path(env["FEDLENS_DATA_DIR"]) / f"worker-{name}.log"
        with self.log.open("a") as output:
            self.process = subprocess.Popen(
                command, cwd=PROJECT_ROOT, env=env, stdout=output,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            wait_for_worker(app, name, self.process, timeout=WORKER_START_SECONDS)
        except RuntimeError as error:
            # A worker left running would take the next test's tasks with this test's settings.
            if self.process.poll() is None:
                self.kill()
            raise RuntimeError(f"{error}\n{self.log.read_text(errors='replace')}") from None

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        stop_process(self.process)


def wait_until_finished(experiment: Experiment, timeout: float = 240) -> Experiment:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        experiment.refresh_from_db()
        if experiment.is_terminal:
            return experiment
        time.sleep(0.2)
    raise AssertionError(f"experiment still {experiment.status} after {timeout} s")


def new_experiment(dataset, **fields) -> Experiment:
    experiment = Experiment.objects.create(
        owner=dataset.owner, dataset=dataset, name="distributed", partition="iid", seed=0,
        batch_size=16, learning_rate=0.05, **fields,
    )  # fmt: skip
    experiment.sites.set(SiteFactory.create_batch(fields["clients_per_round"]))
    return experiment


@pytest.fixture
def in_memory_app():
    """A Celery app with the project's settings on the in-memory transport (embedded mode)."""
    embedded = Celery("fedlens-embedded-test", set_as_current=False)
    embedded.config_from_object("django.conf:settings", namespace="CELERY")
    embedded.conf.update(
        broker_url="memory://",
        result_backend="cache+memory://",
        broker_transport_options={"polling_interval": 0.005},
    )
    yield embedded
    embedded.close()
    # The embedded worker makes its app the process's default, as a real worker does.
    app.set_current()
    app.set_default()
