"""Log lines: JSON with the request and the Celery task they belong to, federated events with
their ids, an optional rotating file."""

import io
import json
import logging
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from flproject.celery import app
from flproject.observability.logs import LogContextFilter, json_formatter
from tests.conftest import (
    PROJECT_ROOT,
    free_port,
    needs_redis,
    service_env,
    start_celery_worker,
    stop_process,
    wait_for_worker,
)
from tests.factories import ClientUpdateFactory, ExperimentFactory, RoundFactory, claim
from training import services
from training.models import ExperimentStatus
from training.queues import site_queue
from workers.embedded import EmbeddedWorker
from workers.tasks import ping


@pytest.fixture
def json_lines():
    """Returns `capture(logger_name)`, which sends that logger's records through the project's
    JSON formatter and context filter, and gives back a function that reads the lines."""
    attached = []

    def capture(name: str):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(json_formatter())
        handler.addFilter(LogContextFilter())
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        attached.append((logger, handler))
        return lambda: [json.loads(line) for line in stream.getvalue().splitlines()]

    yield capture
    for logger, handler in attached:
        logger.removeHandler(handler)


def manage_shell(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", code],
        cwd=PROJECT_ROOT, env=service_env(**env), capture_output=True, encoding="utf-8",
        timeout=120,
    )  # fmt: skip


@pytest.mark.django_db
def test_a_request_log_line_is_json_with_timestamp_level_logger_and_request_id(client, json_lines):
    lines = json_lines("django.request")

    response = client.get("/no-such-page/")

    (line,) = lines()
    assert response.status_code == 404
    assert line["message"] == "Not Found: /no-such-page/"
    assert line["level"] == "WARNING"
    assert line["logger"] == "django.request"
    assert line["timestamp"].endswith("+00:00")
    assert line["request_id"] == response["X-Request-ID"]
    assert len(line["request_id"]) == 32


@pytest.mark.django_db
def test_a_sane_incoming_request_id_is_kept_and_echoed(client, json_lines):
    lines = json_lines("django.request")

    response = client.get("/no-such-page/", HTTP_X_REQUEST_ID="nginx-7f3a9c.01")

    assert response["X-Request-ID"] == "nginx-7f3a9c.01"
    assert lines()[0]["request_id"] == "nginx-7f3a9c.01"


@pytest.mark.django_db
def test_an_incoming_request_id_that_is_not_an_id_is_replaced(client):
    response = client.get("/healthz", HTTP_X_REQUEST_ID='x" injected="yes')

    assert response["X-Request-ID"] != 'x" injected="yes'
    assert len(response["X-Request-ID"]) == 32


@pytest.mark.django_db
def test_a_federated_event_line_carries_event_experiment_round_and_site(
    json_lines, django_capture_on_commit_callbacks
):
    lines = json_lines("training.services")
    experiment = ExperimentFactory(status=ExperimentStatus.RUNNING, current_round=1)
    update = ClientUpdateFactory(round=RoundFactory(experiment=experiment, number=1))

    with django_capture_on_commit_callbacks(execute=True):
        claimed = claim(update, worker="gpu0@node")
        services.record_client_result(claimed, error="RuntimeError: CUDA out of memory")

    events = {line["event"]: line for line in lines()}
    assert set(events) == {"client.started", "client.failed", "experiment.failed"}
    failed = events["client.failed"]
    assert (failed["experiment"], failed["round"], failed["site"]) == (
        experiment.pk,
        1,
        update.site.slug,
    )
    assert failed["level"] == "WARNING"
    assert failed["error"] == "RuntimeError: CUDA out of memory"
    assert events["client.started"]["level"] == "INFO"
    assert events["client.started"]["worker"] == "gpu0@node"


@pytest.mark.django_db
def test_a_federated_event_is_not_logged_when_its_transaction_rolls_back(json_lines):
    lines = json_lines("training.services")
    experiment = ExperimentFactory(status=ExperimentStatus.RUNNING, current_round=1)
    update = ClientUpdateFactory(round=RoundFactory(experiment=experiment, number=1))

    claim(update, worker="gpu0@node")  # the test never commits

    assert lines() == []


def test_log_format_json_makes_every_line_a_json_object():
    result = manage_shell(
        "import logging; logging.getLogger('fedlens.check').warning('disk %s', 'low')",
        LOG_FORMAT="json",
    )

    assert result.returncode == 0, result.stderr
    line = json.loads(result.stderr.strip().splitlines()[-1])
    assert line["message"] == "disk low"
    assert line["level"] == "WARNING"
    assert line["logger"] == "fedlens.check"
    assert {"timestamp", "request_id", "task_id", "task_name"} <= set(line)


def test_an_unknown_log_format_stops_start_up_naming_it():
    result = manage_shell("pass", LOG_FORMAT="xml")

    assert result.returncode != 0
    assert "FedLens cannot start: LOG_FORMAT must be json or plain" in result.stderr


def test_uvicorns_access_lines_are_json_lines_too():
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "flproject.asgi:application", "--port", str(port)],
        cwd=PROJECT_ROOT, env=service_env(LOG_FORMAT="json"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, encoding="utf-8", errors="replace",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "uvicorn did not answer within 60 s"
                time.sleep(0.3)
    finally:
        stop_process(server)
    output = server.stdout.read()

    access = [
        json.loads(line) for line in output.splitlines() if '"logger": "uvicorn.access"' in line
    ]
    assert access, output
    assert "GET /healthz" in access[-1]["message"]


def test_log_file_adds_a_rotating_file_of_10_mb_kept_10_times(tmp_path):
    log_file = tmp_path / "logs" / "fedlens.log"
    script = (
        "import logging; from logging.handlers import RotatingFileHandler; "
        "(handler,) = [h for h in logging.getLogger().handlers "
        "if isinstance(h, RotatingFileHandler)]; "
        "print(handler.baseFilename, handler.maxBytes, handler.backupCount); "
        "logging.getLogger('fedlens.check').warning('written to the file')"
    )

    result = manage_shell(script, LOG_FORMAT="json", LOG_FILE=str(log_file))

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(log_file), str(10 * 1024 * 1024), "10"]
    line = json.loads(log_file.read_text().splitlines()[-1])
    assert line["message"] == "written to the file"


def test_a_task_log_line_carries_the_task_id_and_name(in_memory_app, json_lines):
    with EmbeddedWorker(in_memory_app, name="logging-test@local", beat=False):
        # Captured from now: the worker's start sets Django's logging up again.
        lines = json_lines("celery.app.trace")
        result = in_memory_app.tasks["workers.tasks.ping"].delay()
        result.get(timeout=10)

    (succeeded,) = [line for line in lines() if "succeeded" in line["message"]]
    assert succeeded["task_id"] == result.id
    assert succeeded["task_name"] == "workers.tasks.ping"


@pytest.mark.redis
@pytest.mark.worker
@needs_redis
def test_a_real_workers_log_is_json_lines_and_its_task_lines_carry_the_task_id():
    name = f"logs-{uuid.uuid4().hex[:8]}@test"
    queue = site_queue(f"logs-{uuid.uuid4().hex[:8]}")
    worker = start_celery_worker(name, queue, service_env(LOG_FORMAT="json"))
    try:
        wait_for_worker(app, name, worker)
        result = ping.apply_async(queue=queue)
        result.get(timeout=30)
    finally:
        stop_process(worker)
    output = worker.stdout.read()

    # Celery prints its banner on stdout; every log line is a JSON object.
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(line["logger"].startswith("celery.worker") for line in lines)
    task_lines = [line for line in lines if line["task_id"] == result.id]
    assert any("succeeded" in line["message"] for line in task_lines), output
    assert {line["task_name"] for line in task_lines} == {"workers.tasks.ping"}
