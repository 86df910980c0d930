"""`make demo`'s server: uvicorn on the embedded default, with no services at all."""

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import PROJECT_ROOT, free_port, service_env, stop_process

pytestmark = pytest.mark.e2e


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - local test server
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_the_embedded_server_starts_and_is_healthy_without_services(tmp_path):
    env = service_env(
        DJANGO_SETTINGS_MODULE="flproject.settings.local",
        DATABASE_URL=None,
        REDIS_URL=None,
        FEDLENS_DATA_DIR=str(tmp_path),
    )
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=PROJECT_ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "flproject.asgi:application", "--port", str(port)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
        errors="replace",
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = get(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "the server did not answer within 60 s"
                time.sleep(0.3)
        login_status, login_page = get(f"http://127.0.0.1:{port}/accounts/login/")
    finally:
        stop_process(server)
    log = server.stdout.read()

    assert status == 200, body
    health = json.loads(body)
    assert health["mode"] == "embedded"
    assert health["checks"]["database"]["vendor"] == "sqlite"
    assert login_status == 200 and b"Log in" in login_page
    assert "Embedded Celery worker" in log


def test_the_demo_command_runs_its_experiment_with_only_its_own_lines(embedded_env):
    env = embedded_env
    port = free_port()
    demo = subprocess.Popen(
        [sys.executable, "manage.py", "demo", "--port", str(port), "--sites", "2", "--rounds", "1"],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        encoding="utf-8", errors="replace",
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(demo.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any("completed" in line for line in lines):
            assert demo.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        status, _ = get(f"http://127.0.0.1:{port}/health")  # and it keeps serving
    finally:
        stop_process(demo)
        reader.join(timeout=10)
    output = "".join(lines)

    assert status == 200
    assert "Experiment 1 started; open" in output
    assert "Experiment 1 completed. The site keeps serving" in output
    # Its own lines and progress bars only: no log records of the ledger, Celery's tasks or
    # the worker's start, and none of uvicorn's notices (lifespan, start, requests).
    assert '"level"' not in output, output
    assert "INFO:" not in output, output
    assert "lifespan" not in output, output
