"""Start-up: what the web process, `manage.py check` and the command line pay before work.

    .venv/bin/python benchmarks/startup.py [--repeats 3] [--images-per-site 150]

Each measurement is a whole fresh process, taken in two ways in turn, ``--repeats`` times:

- ``lazy``: as FedLens runs, importing its heavy libraries where they are used;
- ``eager``: the same command after importing PyTorch, MONAI, scikit-learn, matplotlib,
  MLflow, SimpleITK, Opacus and SciPy first (what every process paid when they were
  imported at the top of the modules that use them), so that the ratio of the two is taken
  in one run on one machine.

Rows: ``manage.py check``; importing the ASGI application with its URL configuration and
every view (a web process of the distributed mode, before its first request); and
`run_experiment`'s time from its process start to round 1 opened and to round 1 closed
(the ledger's timestamps), on an image folder of PNGs whose decoded images are already in
the decoded-dataset cache.

A second table is the decoded-dataset cache: the same command's time to round 1 closed
with an empty cache (the first process decodes every image, as each process did before the
cache) against a cache another process filled (it maps the decoded arrays). A third
isolates the decoding: a fresh process opening the dataset and reading every sample (its
imports not counted), for
the PNG folder and for a Decathlon folder of NIfTI volumes (resampled), empty cache
against filled.

The machine is shared: the load average (`uptime`) is printed before and after.
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
from datetime import datetime
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Under the project, as round_overhead.py explains: file creation in this /tmp is slow.
DATA_ROOT = PROJECT_ROOT / "data"
HEAVY = "torch, monai, sklearn.metrics, matplotlib.pyplot, mlflow, SimpleITK, opacus, scipy.ndimage"

# A web process of the distributed mode: its application, URLs and views, no request yet.
WEB_PROCESS = """
import flproject.asgi
from django.urls import get_resolver

def views(patterns):
    for pattern in patterns:
        if hasattr(pattern, "url_patterns"):
            yield from views(pattern.url_patterns)
        else:
            yield pattern.callback

list(views(get_resolver().url_patterns))
"""


# A fresh process reading every sample of a dataset through the decoded cache; it prints
# the seconds from opening the dataset to its last sample (its imports not counted).
READ_EVERY_SAMPLE = """
import sys, time
import torch
from training.fl.data import Preprocessor, load_dataset
from training.fl.data.cache import DecodedCache
from training.fl.data import datasets, segmentation
started = time.perf_counter()
path, cache_dir, size = sys.argv[1], sys.argv[2], tuple(int(s) for s in sys.argv[3].split(","))
cache = DecodedCache(cache_dir)
data = load_dataset(path, preprocessor=Preprocessor(size=size), decoded_cache=cache)
for index in range(len(data)):
    data[index]
print(time.perf_counter() - started)
"""


def python_code(code: str, *, eager: bool) -> list[str]:
    return [sys.executable, "-c", (f"import {HEAVY}\n" if eager else "") + code]


def manage_py(*args: str, eager: bool) -> list[str]:
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['manage.py', *{list(args)!r}]\n"
        "runpy.run_path('manage.py', run_name='__main__')\n"
    )
    return python_code(code, eager=eager)


def run(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run to its end: (wall clock at its start, its whole-process seconds)."""
    started_at = time.time()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:3])} failed:\n{done.stderr[-3000:]}")
    return started_at, time.perf_counter() - started


def base_env(data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "flproject.settings.local",
           "DJANGO_DEBUG": "false", "FEDLENS_DATA_DIR": str(data_dir),
           "PYTHONPATH": str(PROJECT_ROOT), "LOG_LEVEL": "WARNING",
           "DJANGO_SUPERUSER_PASSWORD": "a long enough password"}  # fmt: skip
    for name in ("DATABASE_URL", "REDIS_URL", "FEDLENS_DATASET_CACHE_DIR"):
        env.pop(name, None)
    return env


def install(data_dir: Path, images_per_site: int) -> dict[str, str]:
    env = base_env(data_dir)
    run(manage_py("migrate", "--noinput", eager=False), env)
    run(manage_py("createsuperuser", "--noinput", "--username", "bench",
                  "--email", "bench@example.org", eager=False), env)  # fmt: skip
    sys.path.insert(0, str(PROJECT_ROOT))
    from training.fl.data.synthetic import generate_synthetic_dataset

    folder = generate_synthetic_dataset(
        data_dir / "datasets" / "lesions", sites=4, per_site=images_per_site, size=64, seed=0
    )
    run(manage_py("register_dataset", "--name", "lesions", "--path", str(folder),
                  "--validation-fraction", "0", eager=False), env)  # fmt: skip
    return env


EXPERIMENT = ("run_experiment", "--dataset", "lesions", "--clients", "4", "--rounds", "1",
              "--batch-size", "64", "--seed", "0")  # fmt: skip


def first_round(database: Path, started_at: float) -> tuple[float, float]:
    """Seconds from the process start to the newest experiment's round 1 opened, closed."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as ledger:
        opened, closed = ledger.execute(
            "SELECT opened_at, closed_at FROM training_round WHERE number = 1 AND kind = 'train' "
            "ORDER BY experiment_id DESC LIMIT 1"
        ).fetchone()

    def seconds(stamp: str) -> float:
        return datetime.fromisoformat(stamp).timestamp() - started_at

    return seconds(opened), seconds(closed)


def generate_volumes(folder: Path) -> Path:
    from training.fl.data.synthetic import generate_segmentation_dataset

    return generate_segmentation_dataset(folder, dims=3, sites=2, per_site=12, size=64, depth=32)


def read_every_sample(path: Path, cache_dir: Path, size: str, env: dict[str, str]) -> float:
    done = subprocess.run(
        [sys.executable, "-c", READ_EVERY_SAMPLE, str(path), str(cache_dir), size],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"reading {path} failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}")
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    print("  ".join(name.rjust(width) for name, width in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images-per-site", type=int, default=150)
    args = parser.parse_args()
    print(f"load before: {load()}")
    DATA_ROOT.mkdir(exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-startup-", dir=DATA_ROOT))
    try:
        env = install(data_dir, args.images_per_site)
        database = data_dir / "fedlens.sqlite3"
        web_env = {**env, "REDIS_URL": "redis://127.0.0.1:1/0"}  # never connected to
        warm_cache = {**env, "FEDLENS_DATASET_CACHE_DIR": str(data_dir / "warm-cache")}
        run(manage_py(*EXPERIMENT, eager=False), warm_cache)  # fills the warm cache
        timings: dict[str, dict[bool, list[float]]] = {
            name: {False: [], True: []}
            for name in (
                "manage.py check",
                "ASGI app + URLs + views",
                "run_experiment to round 1 opened",
                "run_experiment to round 1 closed",
            )
        }
        cache_rows: dict[str, list[float]] = {"empty cache": [], "filled cache": []}
        volumes = generate_volumes(data_dir / "datasets" / "organs")
        decoding = {
            (name, filled): []
            for name in ("PNG folder", "NIfTI volumes")
            for filled in (False, True)
        }
        sources = {"PNG folder": (data_dir / "datasets" / "lesions", "64,64"),
                   "NIfTI volumes": (volumes, "48,48,24")}  # fmt: skip
        for _ in range(args.repeats):
            for eager in (False, True):
                timings["manage.py check"][eager].append(
                    run(manage_py("check", eager=eager), env)[1]
                )
                timings["ASGI app + URLs + views"][eager].append(
                    run(python_code(WEB_PROCESS, eager=eager), web_env)[1]
                )
                started_at, _ = run(manage_py(*EXPERIMENT, eager=eager), warm_cache)
                opened, closed = first_round(database, started_at)
                timings["run_experiment to round 1 opened"][eager].append(opened)
                timings["run_experiment to round 1 closed"][eager].append(closed)
            empty = data_dir / f"empty-cache-{time.time_ns()}"
            started_at, _ = run(manage_py(*EXPERIMENT, eager=False),
                                {**env, "FEDLENS_DATASET_CACHE_DIR": str(empty)})  # fmt: skip
            cache_rows["empty cache"].append(first_round(database, started_at)[1])
            started_at, _ = run(manage_py(*EXPERIMENT, eager=False), warm_cache)
            cache_rows["filled cache"].append(first_round(database, started_at)[1])
            for name, (path, size) in sources.items():
                cache_dir = data_dir / f"decoding-cache-{time.time_ns()}"
                for filled in (False, True):  # the first fills it, the second maps it
                    decoding[name, filled].append(read_every_sample(path, cache_dir, size, env))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)

    rows = []
    for name, by_mode in timings.items():
        lazy, eager = statistics.median(by_mode[False]), statistics.median(by_mode[True])
        rows.append([name, f"{lazy:.2f}", f"{eager:.2f}", f"{lazy / eager:.2f}",
                     f"{min(by_mode[False]):.2f}-{max(by_mode[False]):.2f}"])  # fmt: skip
    print_table(
        f"Start-up, median seconds of {args.repeats} fresh processes each",
        ["measurement", "lazy_s", "eager_s", "lazy/eager", "lazy range"],
        rows,
    )
    empty, filled = (statistics.median(cache_rows[name]) for name in cache_rows)
    print_table(
        f"run_experiment to round 1 closed, {4 * args.images_per_site} PNG images of 64x64, "
        f"median of {args.repeats}",
        ["decoded-dataset cache", "seconds", "ratio to empty"],
        [
            ["empty (decodes every image)", f"{empty:.2f}", "1.00"],
            ["filled by another process", f"{filled:.2f}", f"{filled / empty:.2f}"],
        ],
    )
    read_rows = []
    for name in sources:
        empty_s, filled_s = (statistics.median(decoding[name, filled]) for filled in (False, True))
        read_rows.append([name, f"{empty_s:.2f}", f"{filled_s:.2f}", f"{filled_s / empty_s:.2f}"])
    print_table(
        f"A fresh process reading every sample, median seconds of {args.repeats}",
        ["dataset", "empty_s", "filled_s", "filled/empty"],
        read_rows,
    )
    print(f"\nload after: {load()}")


if __name__ == "__main__":
    main()
