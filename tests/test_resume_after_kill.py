"""SIGKILL an embedded `run_experiment` in the middle of a round, then `run_experiment
--resume ID`: the experiment completes and every round, client update and checkpoint is
there exactly once. Real processes on their own SQLite ledger, no services (embedded mode).

The recovery time (the resume command's start to the interrupted round's closing) is
printed, not asserted: run with -s to see it.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from tests.conftest import PROJECT_ROOT, service_env
from training.fl.data import generate_synthetic_dataset

pytestmark = pytest.mark.e2e

SITES, ROUNDS = 3, 3
# Long enough local training that the kill lands inside round 2 on a fast machine.
LOCAL_EPOCHS = 100


def manage(env, *args, timeout=300, **options):
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=PROJECT_ROOT, env=env, check=True,
        capture_output=True, text=True, timeout=timeout, **options,
    )  # fmt: skip


def query(database, sql, *parameters):
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as ledger:
        return ledger.execute(sql, parameters).fetchall()


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s")


@pytest.fixture
def embedded_install(tmp_path):
    """A fresh embedded installation: its own SQLite ledger, an admin, a registered set."""
    env = service_env(
        DJANGO_SETTINGS_MODULE="flproject.settings.local",
        DATABASE_URL=None,
        REDIS_URL=None,
        FEDLENS_DATA_DIR=str(tmp_path),
        DJANGO_SUPERUSER_PASSWORD="a long enough password",
    )
    manage(env, "migrate", "--noinput")
    manage(env, "createsuperuser", "--noinput", "--username", "admin",
           "--email", "admin@example.org")  # fmt: skip
    images = generate_synthetic_dataset(
        tmp_path / "datasets" / "lesions", sites=SITES, per_site=40, size=32
    )
    manage(env, "register_dataset", "--name", "lesions", "--path", str(images))
    return env, tmp_path / "fedlens.sqlite3"


def test_a_killed_embedded_run_resumes_and_counts_every_round_once(embedded_install, tmp_path):
    env, database = embedded_install
    first_log = tmp_path / "first-run.log"
    with first_log.open("w") as output:
        first = subprocess.Popen(
            [sys.executable, "manage.py", "run_experiment", "--dataset", "lesions",
             "--clients", str(SITES), "--rounds", str(ROUNDS),
             "--local-epochs", str(LOCAL_EPOCHS)],
            cwd=PROJECT_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(
            lambda: query(database, "SELECT 1 FROM training_round WHERE status = 'closed'"),
            timeout=240,
            what="round 1 closed",
        )
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    killed_at = time.time()
    [(experiment_id, status)] = query(database, "SELECT id, status FROM training_experiment")
    assert status == "running", first_log.read_text()
    [(interrupted_round, interrupted_number)] = query(
        database,
        "SELECT id, number FROM training_round WHERE experiment_id = ? AND status = 'open'",
        experiment_id,
    )
    unfinished = {
        update_id
        for (update_id,) in query(
            database,
            "SELECT id FROM training_clientupdate WHERE round_id = ? "
            "AND status IN ('pending', 'running')",
            interrupted_round,
        )
    }
    assert unfinished, "the kill came after the round's clients had all reported"

    summary_file = tmp_path / "summary.json"
    resumed_at = time.time()
    resumed = manage(env, "run_experiment", "--resume", str(experiment_id),
                     "--json", str(summary_file), timeout=600)  # fmt: skip
    finished_at = time.time()

    [(status,)] = query(database, "SELECT status FROM training_experiment")
    assert status == "completed", resumed.stdout + resumed.stderr
    rounds = query(
        database,
        "SELECT number, kind, status, recoveries FROM training_round "
        "WHERE experiment_id = ? ORDER BY number",
        experiment_id,
    )
    # Training rounds 1..ROUNDS then the cross-site round, each once and closed; only the
    # interrupted round was sent again.
    assert [(number, kind, status) for number, kind, status, _ in rounds] == [
        *((number, "train", "closed") for number in range(1, ROUNDS + 1)),
        (ROUNDS + 1, "evaluate", "closed"),
    ]
    assert {number: recoveries for number, _, _, recoveries in rounds} == {
        number: int(number == interrupted_number) for number in range(1, ROUNDS + 2)
    }
    updates = query(
        database,
        "SELECT u.id, r.number, u.status, u.attempts FROM training_clientupdate u "
        "JOIN training_round r ON r.id = u.round_id WHERE r.experiment_id = ?",
        experiment_id,
    )
    per_round = {number: [u for u in updates if u[1] == number] for number in range(1, 5)}
    assert all(len(round_updates) == SITES for round_updates in per_round.values())
    assert {status for _, _, status, _ in updates} == {"succeeded"}
    assert {update_id: attempts for update_id, _, _, attempts in updates} == {
        update_id: 2 if update_id in unfinished else 1 for update_id, _, _, _ in updates
    }
    checkpoints = query(
        database,
        "SELECT r.number FROM training_checkpoint c LEFT JOIN training_round r "
        "ON r.id = c.round_id WHERE c.experiment_id = ? ORDER BY r.number",
        experiment_id,
    )
    # The initial model, then one per training round.
    assert checkpoints == [(None,), *((number,) for number in range(1, ROUNDS + 1))]
    summary = json.loads(summary_file.read_text())
    assert [entry["number"] for entry in summary["rounds"]] == list(range(1, ROUNDS + 1))
    assert f"Experiment {experiment_id} resumed: sent {len(unfinished)} client task(s)" in (
        resumed.stdout
    )
    # The command's output is its progress and summary, not Celery's line per task.
    assert "celery.app.trace" not in resumed.stdout + resumed.stderr
    assert "succeeded in" not in resumed.stdout + resumed.stderr

    [(closed_at,)] = query(
        database, "SELECT closed_at FROM training_round WHERE id = ?", interrupted_round
    )
    [(first_claimed,)] = query(
        database,
        "SELECT MIN(started_at) FROM training_clientupdate WHERE round_id = ?",
        interrupted_round,
    )
    print(
        f"\nresume after SIGKILL: round {interrupted_number} of {ROUNDS} interrupted "
        f"({len(unfinished)} of {SITES} clients unfinished); --resume started "
        f"{resumed_at - killed_at:.1f} s after the kill; its first client trained again "
        f"{utc(first_claimed) - resumed_at:.1f} s, the interrupted round closed "
        f"{utc(closed_at) - resumed_at:.1f} s and the experiment completed "
        f"{finished_at - resumed_at:.1f} s after --resume started"
    )
