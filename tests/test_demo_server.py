"""`make demo`'s server: uvicorn on the embedded default, with no services at all."""

import json
import subprocess
import sys
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
