"""Embedded mode trains the clients of a round at once (FEDLENS_EMBEDDED_CONCURRENCY) and
ends with the same final weights as one client at a time, for the same seed and the same
PyTorch threads per client. Real `run_experiment` processes on their own SQLite ledger.
The speed-up is measured in benchmarks/embedded_concurrency.py, not asserted here."""

import hashlib
import sqlite3
import subprocess
import sys
from datetime import datetime
from itertools import combinations

import numpy as np
import pytest

from flproject import machine
from tests.conftest import PROJECT_ROOT, service_env

SITES, ROUNDS = 4, 3


def manage(env, *args):
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=PROJECT_ROOT, env=env, check=True,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def query(database, sql, *parameters):
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as ledger:
        return ledger.execute(sql, parameters).fetchall()


def write_images(path, count, size=28):
    """A learnable .npz set: each of four classes brightens its own quadrant."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=count)
    images = rng.normal(0.0, 1.0, size=(count, size, size)).astype(np.float32)
    half = size // 2
    for index, label in enumerate(labels):
        row, column = divmod(int(label), 2)
        images[index, row * half : (row + 1) * half, column * half : (column + 1) * half] += 1
    np.savez(path, train_images=images, train_labels=labels.astype(np.int64),
             test_images=images[:50], test_labels=labels[:50].astype(np.int64))  # fmt: skip


@pytest.fixture
def embedded_install(tmp_path):
    env = service_env(
        DJANGO_SETTINGS_MODULE="flproject.settings.local",
        DATABASE_URL=None,
        REDIS_URL=None,
        FEDLENS_DATA_DIR=str(tmp_path),
        DJANGO_SUPERUSER_PASSWORD="a long enough password",
        # The kernels' sums depend on the threads per client, not on the clients at once.
        FEDLENS_TORCH_THREADS="1",
    )
    manage(env, "migrate", "--noinput")
    manage(env, "createsuperuser", "--noinput", "--username", "admin",
           "--email", "admin@example.org")  # fmt: skip
    (tmp_path / "datasets").mkdir()
    write_images(tmp_path / "datasets" / "quadrants.npz", SITES * 60)
    manage(env, "register_dataset", "--name", "quadrants",
           "--path", str(tmp_path / "datasets" / "quadrants.npz"))  # fmt: skip
    return env, tmp_path


def run_experiment(env, concurrency):
    manage({**env, "FEDLENS_EMBEDDED_CONCURRENCY": str(concurrency)}, "run_experiment",
           "--dataset", "quadrants", "--clients", str(SITES), "--rounds", str(ROUNDS),
           "--local-epochs", "2", "--seed", "7")  # fmt: skip


def final_checkpoint(database, experiment_id):
    """The last round's global model: its file and the SHA-256 the ledger recorded."""
    return query(
        database,
        "SELECT c.file, c.sha256 FROM training_checkpoint c JOIN training_round r "
        "ON c.round_id = r.id WHERE c.experiment_id = ? AND r.kind = 'train' "
        "ORDER BY r.number DESC LIMIT 1",
        experiment_id,
    )[0]


def overlapping_clients(database, experiment_id):
    """Pairs of clients of the same round whose training ran at the same time."""
    rows = query(
        database,
        "SELECT u.round_id, u.started_at, u.finished_at FROM training_clientupdate u "
        "JOIN training_round r ON u.round_id = r.id WHERE r.experiment_id = ?",
        experiment_id,
    )
    spans = [(round_id, datetime.fromisoformat(a), datetime.fromisoformat(b))
             for round_id, a, b in rows]  # fmt: skip
    return [
        (one, other)
        for one, other in combinations(spans, 2)
        if one[0] == other[0] and one[1] < other[2] and other[1] < one[2]
    ]


@pytest.mark.e2e
def test_clients_trained_at_once_end_with_the_sequential_runs_weights(embedded_install):
    env, data_dir = embedded_install
    database = data_dir / "fedlens.sqlite3"

    run_experiment(env, concurrency=1)
    run_experiment(env, concurrency=2)

    recorded, on_disk = [], []
    for experiment_id in (1, 2):
        file_name, sha256 = final_checkpoint(database, experiment_id)
        recorded.append(sha256)
        on_disk.append(hashlib.sha256((data_dir / "models" / file_name).read_bytes()).hexdigest())
    assert recorded[1] == recorded[0]
    assert on_disk == recorded
    assert query(database, "SELECT status FROM training_experiment ORDER BY id") == [
        ("completed",),
        ("completed",),
    ]
    assert overlapping_clients(database, 1) == []
    assert overlapping_clients(database, 2), "no two clients of a round trained at once"


def test_available_cpus_is_capped_by_a_cgroup_quota(tmp_path, monkeypatch):
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(machine, "CGROUP_V2_CPU_MAX", cpu_max)
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(range(8)))

    cpu_max.write_text("max 100000\n")
    unlimited = machine.available_cpus()
    cpu_max.write_text("150000 100000\n")
    one_and_a_half = machine.available_cpus()
    cpu_max.write_text("50000 100000\n")
    half = machine.available_cpus()

    assert (unlimited, one_and_a_half, half) == (8, 2, 1)
