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
from django.conf import settings
from rest_framework.test import APIClient

from tests.factories import UserFactory

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def uses_redis() -> bool:
    return not settings.FEDLENS_EMBEDDED


def pytest_report_header(config):
    database = settings.DATABASES["default"]
    if database["ENGINE"].endswith("sqlite3"):
        where = database["NAME"]
    else:
        where = f"{database['HOST']}:{database['PORT']}, database {database['TEST']['NAME']}"
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


def wait_for_worker(app, name: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker {name} exited early:\n{process.stdout.read()}")
        if app.control.ping(destination=[name], timeout=0.5):
            return
    raise RuntimeError(f"worker {name} did not answer within {timeout} s")
