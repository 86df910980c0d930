"""The project's own checks, run by the suite so that CI enforces them."""

import subprocess
import sys

from tests.conftest import PROJECT_ROOT, service_env


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        env=service_env(),
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
    )


def test_models_and_migrations_agree():
    result = run(sys.executable, "manage.py", "makemigrations", "--check", "--dry-run")

    assert result.returncode == 0, result.stdout + result.stderr


def test_openapi_schema_is_valid_without_warnings():
    result = run(
        sys.executable,
        "manage.py",
        "spectacular",
        "--validate",
        "--fail-on-warn",
        "--file",
        "/dev/null",
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_finds_nothing():
    lint = run(sys.executable, "-m", "ruff", "check", ".")
    formatting = run(sys.executable, "-m", "ruff", "format", "--check", ".")

    assert lint.returncode == 0, lint.stdout
    assert formatting.returncode == 0, formatting.stdout


def test_the_engine_is_mypy_clean():
    result = run(sys.executable, "-m", "mypy")

    assert result.returncode == 0, result.stdout
