"""Schemathesis against the real ASGI server: every operation of /api/schema/ fuzzed as a
staff user and as a non-staff user, with all of schemathesis's checks (no server error, the
documented status codes, content types, headers and response schemas, and the rest).

The server is uvicorn on the embedded default (SQLite in the test's folder, the in-process
worker), seeded with two users, a small real dataset, a site and an experiment of each user.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, service_env
from tests.test_browser import Server, manage

pytestmark = pytest.mark.e2e

CONFIG = Path(__file__).with_name("schemathesis.toml")
SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
# Bounds the run (about 60 operations): a few examples each, per user, on a two-core machine.
EXAMPLES_PER_OPERATION = 8

# Excluded operations, each for a reason that no fixture can take away:
EXCLUDED_PATHS = [
    # Logging out revokes the very token the run signs in with; every later request would be
    # anonymous, and the run would test nothing but 401s. tests/test_tokens.py covers it.
    "/api/auth/logout/",
]

USERS = ("fuzz-staff", "fuzz-member")

SEED_USERS = """
from django.contrib.auth import get_user_model
get_user_model().objects.create_user("fuzz-staff", password="fuzz staff 42", is_staff=True)
get_user_model().objects.create_user("fuzz-member", password="fuzz member 42")
"""

# Each user owns a dataset and a one-round, two-client experiment on 32-pixel images: when
# the fuzzer starts or resumes one, the embedded worker finishes it in seconds.
SEED_EXPERIMENTS = """
import json
from knox.models import AuthToken
from django.contrib.auth import get_user_model
from training.models import Dataset, Experiment, Site
sites = [Site.objects.create(name=f"Fuzz site {n}", slug=f"sim-{n}") for n in (1, 2)]
tokens = {}
for owner in get_user_model().objects.filter(username__startswith="fuzz-"):
    experiment = Experiment.objects.create(
        owner=owner, name=f"{owner.username}-run", dataset=Dataset.objects.get(owner=owner),
        num_rounds=1, clients_per_round=2, min_clients=1, local_epochs=1, batch_size=8,
    )
    experiment.sites.set(sites)
    tokens[owner.username] = AuthToken.objects.create(user=owner)[1]
print(json.dumps(tokens))
"""


@pytest.fixture
def seeded_server(tmp_path):
    env = service_env(
        DJANGO_SETTINGS_MODULE="flproject.settings.local",
        DATABASE_URL=None,
        REDIS_URL=None,
        FEDLENS_DATA_DIR=str(tmp_path),
        LOG_FORMAT="plain",
        # As deployed: Django's debug pages (HTML, even under /api/) are for a developer.
        DJANGO_DEBUG="false",
    )
    manage(env, "migrate", "--noinput")
    manage(env, "shell", "--no-imports", "-c", SEED_USERS)
    for username in USERS:
        folder = tmp_path / "datasets" / username
        manage(env, "make_synthetic_dataset", "--out", str(folder), "--sites", "2",
               "--per-site", "8", "--size", "32")  # fmt: skip
        manage(env, "register_dataset", "--name", f"{username}-lesions", "--path", str(folder),
               "--owner", username)  # fmt: skip
    seeded = subprocess.run(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", SEED_EXPERIMENTS],
        cwd=PROJECT_ROOT, env=env, check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    tokens = json.loads(seeded.stdout.strip().splitlines()[-1])
    server = Server(env)
    server.start()
    yield server, tokens
    server.stop()


def fuzz(server: Server, token: str, report: Path) -> subprocess.CompletedProcess:
    command = [
        SCHEMATHESIS, "--config-file", str(CONFIG), "run", f"{server.url}/api/schema/",
        "--checks", "all",
        # Query filters follow django-filter's convention for the dashboard's forms: an empty
        # or "null" value means any, a number filter reads decimals. A request that the
        # schema calls wrong there is answered as a search that matches what it says, not
        # refused; bodies are refused field by field (tests/test_api_validation.py).
        "--exclude-checks", "negative_data_rejection",
        "--max-examples", str(EXAMPLES_PER_OPERATION),
        "--phases", "examples,coverage,fuzzing",
        "--seed", "14",
        "--workers", "1",
        "--header", f"Authorization: Token {token}",
        "--request-timeout", "60",
        "--report", "junit",
        "--report-junit-path", str(report),
        "--generation-database", "none",  # nothing written into the checkout
        "--no-color",
    ]  # fmt: skip
    for path in EXCLUDED_PATHS:
        command += ["--exclude-path", path]
    return subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, encoding="utf-8", timeout=1500
    )


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("username", USERS)
def test_every_api_operation_conforms_to_its_schema_and_never_errors(
    seeded_server, username, tmp_path
):
    server, tokens = seeded_server

    run = fuzz(server, tokens[username], tmp_path / f"schemathesis-{username}.xml")
    server.stop()
    log = server.log.read_text(errors="replace")

    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert "Traceback" not in log, log[-20000:]
