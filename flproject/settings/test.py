"""Settings for the test suite.

The suite runs against the real PostgreSQL and Redis when they answer (by default the
machine's 127.0.0.1:5432 database `test` and 127.0.0.1:6379), and falls back to SQLite and
embedded mode otherwise. With CI=true an unreachable service is an error, never a skip.
FEDLENS_TEST_SERVICES=embedded forces the fallback for a quick local run.
"""

import os
import socket
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

TEST_POSTGRES_URL = os.environ.get(
    "FEDLENS_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test"
)
# A Redis database of its own, flushed by the suite at start and end.
TEST_REDIS_URL = os.environ.get("FEDLENS_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=1):
            return True
    except OSError:
        return False


def _choose_services() -> None:
    """Point DATABASE_URL and REDIS_URL at the real services before base.py reads them."""
    in_ci = os.environ.get("CI", "").lower() == "true"
    forced_embedded = os.environ.get("FEDLENS_TEST_SERVICES", "auto") == "embedded"
    if forced_embedded and in_ci:
        raise ImproperlyConfigured("FEDLENS_TEST_SERVICES=embedded is not allowed with CI=true.")
    for variable, url, name in (
        ("DATABASE_URL", TEST_POSTGRES_URL, "PostgreSQL"),
        ("REDIS_URL", TEST_REDIS_URL, "Redis"),
    ):
        if forced_embedded:
            os.environ.pop(variable, None)
        elif variable not in os.environ:
            if _answers(url):
                os.environ[variable] = url
            elif in_ci:
                raise ImproperlyConfigured(
                    f"CI=true but {name} does not answer at {url}; start it or set {variable}."
                )


_choose_services()
# Everything the suite writes (model store, SQLite files) goes under test-output/, which the
# worker processes it starts inherit through the environment.
os.environ.setdefault(
    "FEDLENS_DATA_DIR",
    os.path.join(os.path.dirname(__file__), "..", "..", "test-output", "data"),
)

from .base import *  # noqa: E402, F403
from .base import FEDLENS_DATA_DIR  # noqa: E402

if DATABASES["default"]["ENGINE"].endswith("postgresql"):  # noqa: F405
    # A test database of this run's own, so that two runs on one server never collide;
    # pytest-django creates it and drops it at the end. (SQLite tests run in memory.)
    DATABASES["default"]["TEST"] = {"NAME": f"test_fedlens_{os.getpid()}"}  # noqa: F405
# Connections that threads (WebSocket consumers, executors) leave open would keep the test
# database from being dropped at the end.
DATABASES["default"]["CONN_MAX_AGE"] = 0  # noqa: F405
SECRET_KEY = "fedlens-test-key"  # noqa: S105 - only ever used by the test suite
DEBUG = False
# Hashing with a real algorithm takes ~0.3 s per user; tests create many users.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
FEDLENS_DATASET_ROOTS = [FEDLENS_DATA_DIR / "datasets", FEDLENS_DATA_DIR / "test-datasets"]
# Rates that no test reaches by accident; the throttling tests set low ones themselves.
REST_FRAMEWORK = {
    **REST_FRAMEWORK,  # noqa: F405
    "DEFAULT_THROTTLE_RATES": {
        **REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"],  # noqa: F405
        "anon": "100000/minute",
        "user": "100000/minute",
        "login": "100000/minute",
        "upload": "100000/minute",
    },
}
