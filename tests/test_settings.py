"""Settings come from the environment; a bad value stops start-up with one clear sentence."""

import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT, service_env

PRODUCTION_ENV = {
    "DJANGO_SETTINGS_MODULE": "flproject.settings.production",
    "DJANGO_SECRET_KEY": "k3y-" + "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ" * 2,
    "DJANGO_ALLOWED_HOSTS": "fedlens.example.org",
}


def manage(*args: str, **env: str | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT_ROOT,
        env=service_env(**env),
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=120,
    )


@pytest.mark.parametrize(
    ("env", "sentence"),
    [
        (
            {**PRODUCTION_ENV, "DJANGO_SECRET_KEY": None},
            "DJANGO_SECRET_KEY must be set in production",
        ),
        ({**PRODUCTION_ENV, "DJANGO_SECRET_KEY": "short"}, "DJANGO_SECRET_KEY is too weak"),
        ({**PRODUCTION_ENV, "DJANGO_ALLOWED_HOSTS": ""}, "DJANGO_ALLOWED_HOSTS must list"),
        ({"FEDLENS_MAX_UPLOAD_MB": "lots"}, "FEDLENS_MAX_UPLOAD_MB must be a whole number"),
        ({"FEDLENS_MAX_REQUEST_MB": "0"}, "FEDLENS_MAX_REQUEST_MB must be a whole number"),
        ({"FEDLENS_MAX_JSON_DEPTH": "deep"}, "FEDLENS_MAX_JSON_DEPTH must be a whole number"),
        (
            {"FEDLENS_DATASET_ROOTS": "/srv/datasets", "FEDLENS_UPLOADS_DIR": "/srv/uploads"},
            "FEDLENS_UPLOADS_DIR (/srv/uploads) must lie under one of FEDLENS_DATASET_ROOTS",
        ),
        ({"DJANGO_DEBUG": "ture"}, "DJANGO_DEBUG must be true or false"),
        ({"DATABASE_URL": "mysql://db/fedlens"}, "DATABASE_URL must be a postgres://"),
        ({"REDIS_URL": "http://cache"}, "REDIS_URL must be a redis://"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL must be one of"),
        ({"FEDLENS_TASK_TIME_LIMIT": "5"}, "FEDLENS_TASK_TIME_LIMIT must be a whole number"),
    ],
)
def test_a_bad_variable_stops_start_up_naming_it(env, sentence):
    env.setdefault("DJANGO_SETTINGS_MODULE", "flproject.settings.local")

    result = manage("check", **env)

    assert result.returncode != 0
    assert result.stderr.strip().startswith(f"FedLens cannot start: {sentence}")
    assert "Traceback" not in result.stderr


def test_production_settings_pass_the_deployment_check():
    result = manage("check", "--deploy", "--fail-level", "WARNING", **PRODUCTION_ENV)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_no_redis_url_means_embedded_mode(tmp_path):
    script = (
        "from django.conf import settings as s; "
        "print(s.FEDLENS_EMBEDDED, s.CELERY_BROKER_URL, s.CHANNEL_LAYERS['default']['BACKEND'],"
        " s.DATABASES['default']['NAME'])"
    )
    result = manage(
        "shell",
        "--no-imports",
        "-c",
        script,
        DJANGO_SETTINGS_MODULE="flproject.settings.local",
        REDIS_URL=None,
        DATABASE_URL=None,
        FEDLENS_DATA_DIR=str(tmp_path),
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "True",
        "memory://localhost/",
        "channels.layers.InMemoryChannelLayer",
        str(tmp_path / "fedlens.sqlite3"),
    ]


def test_redis_url_means_distributed_mode():
    script = (
        "from django.conf import settings as s; "
        "print(s.FEDLENS_EMBEDDED, s.CELERY_BROKER_URL, s.CELERY_RESULT_BACKEND,"
        " s.CHANNEL_LAYERS['default']['BACKEND'])"
    )
    result = manage(
        "shell",
        "--no-imports",
        "-c",
        script,
        DJANGO_SETTINGS_MODULE="flproject.settings.local",
        REDIS_URL="redis://cache:6379/3",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "False",
        "redis://cache:6379/3",
        "redis://cache:6379/3",
        "channels_redis.core.RedisChannelLayer",
    ]
