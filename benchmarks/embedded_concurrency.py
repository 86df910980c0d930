"""Embedded mode on the whole machine: `run_experiment` with one client at a time against
several at once.

    .venv/bin/python benchmarks/embedded_concurrency.py [--cases tiny,compute] [--repeats 3]
        [--concurrency N]

Cases (the same as benchmarks/vs_plain.py): ``tiny`` is cnn-small on 28x28 images, 10
clients of 200 samples, 10 rounds; ``compute`` is resnet18-small on 64x64 images, 8 clients
of 64 samples, 5 rounds, where the network's arithmetic dominates. Each case gets its own
embedded installation (SQLite ledger, model store) under data/, a synthetic .npz set
registered with --validation-fraction 0, and a one-round warm-up run that is not timed.

Each timed run is a whole `manage.py run_experiment` process, from its start to its exit,
in three settings taken in turn, ``--repeats`` times each:

- ``1 x 1``: one client at a time with one PyTorch thread (the embedded worker before
  FEDLENS_EMBEDDED_CONCURRENCY: its solo pool set FEDLENS_TORCH_THREADS, 1, in its host);
- ``1 x N``: one client at a time with N PyTorch threads;
- ``N x 1``: N clients at a time with one thread each (the default on an N-CPU machine).

The table: the median seconds of each, their speed-up over ``1 x 1``, and whether the final
weights (the SHA-256 of the last checkpoint) equal those of ``1 x 1``. They must for
``N x 1``: the same threads per client, only more clients at once. ``1 x N`` may differ in
the last bits, since PyTorch's CPU kernels split their sums by thread. The machine is
shared: the load average (`uptime`) is printed before and after each case.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Under the project, as round_overhead.py explains: file creation in this /tmp is slow.
DATA_ROOT = PROJECT_ROOT / "data"
SEED = 0


@dataclass(frozen=True)
class Case:
    name: str
    network: str
    size: int
    clients: int
    rounds: int
    per_client: int
    test: int


CASES = {
    "tiny": Case("tiny", "cnn-small", 28, 10, 10, 200, 500),
    "compute": Case("compute", "resnet18-small", 64, 8, 5, 64, 128),
}


def available_cpus() -> int:
    sys.path.insert(0, str(PROJECT_ROOT))
    from flproject.machine import available_cpus as cpus

    return cpus()


def write_dataset(case: Case, path: Path) -> None:
    """A learnable synthetic set: each of four classes brightens its own quadrant."""
    import numpy as np

    rng = np.random.default_rng(SEED)

    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 4, size=count)
        images = rng.normal(0.0, 1.0, size=(count, case.size, case.size)).astype(np.float32)
        half = case.size // 2
        for index, label in enumerate(labels):
            row, column = divmod(int(label), 2)
            images[index, row * half : (row + 1) * half, column * half : (column + 1) * half] += 1
        return images, labels.astype(np.int64)

    train_images, train_labels = split(case.clients * case.per_client)
    test_images, test_labels = split(case.test)
    np.savez(path, train_images=train_images, train_labels=train_labels,
             test_images=test_images, test_labels=test_labels)  # fmt: skip


def base_env(data_dir: Path) -> dict[str, str]:
    # Debug off, as in production: Django's debug cursor would log every query.
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "flproject.settings.local",
           "DJANGO_DEBUG": "false", "FEDLENS_DATA_DIR": str(data_dir),
           "PYTHONPATH": str(PROJECT_ROOT), "LOG_LEVEL": "WARNING",
           "DJANGO_SUPERUSER_PASSWORD": "a long enough password"}  # fmt: skip
    for name in ("DATABASE_URL", "REDIS_URL", "FEDLENS_EMBEDDED_CONCURRENCY",
                 "FEDLENS_TORCH_THREADS"):  # fmt: skip
        env.pop(name, None)
    return env


def manage(env: dict[str, str], *args: str) -> float:
    """Run a manage.py command to its end; its whole-process wall seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "manage.py", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"manage.py {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def install(case: Case, data_dir: Path) -> dict[str, str]:
    env = base_env(data_dir)
    manage(env, "migrate", "--noinput")
    manage(env, "createsuperuser", "--noinput", "--username", "bench",
           "--email", "bench@example.org")  # fmt: skip
    (data_dir / "datasets").mkdir()
    npz = data_dir / "datasets" / f"{case.name}.npz"
    write_dataset(case, npz)
    manage(env, "register_dataset", "--name", case.name, "--path", str(npz),
           "--validation-fraction", "0")  # fmt: skip
    return env


def run_experiment(case: Case, env: dict[str, str], *, rounds: int) -> float:
    return manage(env, "run_experiment", "--dataset", case.name, "--network", case.network,
                  "--clients", str(case.clients), "--rounds", str(rounds),
                  "--seed", str(SEED))  # fmt: skip


def last_experiment_weights(database: Path) -> str:
    """SHA-256 of the newest experiment's last global model."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as ledger:
        return ledger.execute(
            "SELECT c.sha256 FROM training_checkpoint c JOIN training_round r "
            "ON c.round_id = r.id WHERE r.kind = 'train' "
            "ORDER BY c.experiment_id DESC, r.number DESC LIMIT 1"
        ).fetchone()[0]


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def measure(case: Case, concurrency: int, repeats: int) -> list[dict]:
    settings = {
        f"{clients} x {threads}": {
            "FEDLENS_EMBEDDED_CONCURRENCY": str(clients),
            "FEDLENS_TORCH_THREADS": str(threads),
        }
        for clients, threads in ((1, 1), (1, concurrency), (concurrency, 1))
    }
    DATA_ROOT.mkdir(exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix=f"bench-concurrency-{case.name}-", dir=DATA_ROOT))
    try:
        env = install(case, data_dir)
        # Warm-up: the first process reads the images (and fills any cache of them).
        run_experiment(case, env, rounds=1)
        seconds: dict[str, list[float]] = {label: [] for label in settings}
        weights: dict[str, set[str]] = {label: set() for label in settings}
        for _ in range(repeats):
            for label, overrides in settings.items():
                seconds[label].append(run_experiment(case, {**env, **overrides},
                                                     rounds=case.rounds))  # fmt: skip
                weights[label].add(last_experiment_weights(data_dir / "fedlens.sqlite3"))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    baseline = statistics.median(seconds["1 x 1"])
    return [
        {
            "case": case.name,
            "clients x threads": label,
            "runs": len(runs),
            "median_s": statistics.median(runs),
            "min_s": min(runs),
            "max_s": max(runs),
            "ratio_to_1x1": statistics.median(runs) / baseline,
            "speed_up": baseline / statistics.median(runs),
            "same_weights_as_1x1": weights[label] == weights["1 x 1"] and len(weights[label]) == 1,
        }
        for label, runs in seconds.items()
    ]


def print_table(rows: list[dict]) -> None:
    columns = list(rows[0])

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.2f}"
        return "yes" if value is True else "no" if value is False else str(value)

    widths = {c: max(len(c), *(len(cell(row[c])) for row in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(cell(row[c]).rjust(widths[c]) for c in columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="tiny,compute")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--concurrency", type=int, default=0, help="N (default: the CPUs this process may use)"
    )
    arguments = parser.parse_args()
    concurrency = arguments.concurrency or available_cpus()
    if concurrency < 2:
        sys.exit("One CPU: there is nothing to run at once. Give --concurrency 2 to try anyway.")
    rows = []
    for name in arguments.cases.split(","):
        print(f"{name}: before: {load()}", flush=True)
        rows += measure(CASES[name], concurrency, arguments.repeats)
        print(f"{name}: after:  {load()}", flush=True)
    print(f"\nWhole-process seconds of run_experiment, {arguments.repeats} runs each, "
          f"N = {concurrency} (CPUs available: {available_cpus()})")  # fmt: skip
    print_table(rows)


if __name__ == "__main__":
    main()
