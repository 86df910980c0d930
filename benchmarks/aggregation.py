"""Aggregation at scale: client updates of a large model through FedLens's real path.

    .venv/bin/python benchmarks/aggregation.py [--clients 16] [--parameters 100000000]
                                               [--repeats 2]

It writes one round's client updates of a float32 model (about ``--parameters`` values in
an embedding and a stack of linear blocks with biases, norms and an integer counter) into a
model store laid out as FedLens lays it out, records them in a ledger of their own (SQLite,
under data/), and runs ``training.federation.run_aggregation`` on that round: every update
read and hash-checked, validated, folded into FedAvg, the new checkpoint written, and each
update read again for its distance to the result. It prints the seconds, the rate at which
it went through the updates' bytes, and the peak memory above the process's own before it,
in models (the kernel's high-water mark, reset just before). The same arrays, loaded into
memory first, are then summed with numpy in another process: FedLens's time is reported as
a multiple of that sum's, which is this machine's limit for touching the same bytes once.
Each measurement runs in a fresh process. The files are read through once before each of
FedLens's runs, so that it reads them from the page cache, as a store just written would
be; the table also shows what hashing the same bytes twice (FedLens's two passes each check
every update's SHA-256) costs on its own.
"""

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_ROOT = PROJECT_ROOT / "data"
WIDTH = 1024
BLOCK_PARAMETERS = 2 * 4 * WIDTH * WIDTH + 4 * WIDTH + WIDTH + 2 * WIDTH


def model_shapes(parameters: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of a model of about `parameters` values (at least that many)."""
    blocks = max(1, round(parameters * 0.67 / BLOCK_PARAMETERS))
    rows = max(1, math.ceil((parameters - blocks * BLOCK_PARAMETERS) / WIDTH))
    shapes: dict[str, tuple[tuple[int, ...], str]] = {"embedding.weight": ((rows, WIDTH), "f")}
    for block in range(blocks):
        shapes |= {
            f"blocks.{block}.fc1.weight": ((4 * WIDTH, WIDTH), "f"),
            f"blocks.{block}.fc1.bias": ((4 * WIDTH,), "f"),
            f"blocks.{block}.fc2.weight": ((WIDTH, 4 * WIDTH), "f"),
            f"blocks.{block}.fc2.bias": ((WIDTH,), "f"),
            f"blocks.{block}.norm.weight": ((WIDTH,), "f"),
            f"blocks.{block}.norm.bias": ((WIDTH,), "f"),
            f"blocks.{block}.norm.num_batches_tracked": ((), "i"),
        }
    return shapes


def child_env(data_dir: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "flproject.settings.local",
        "DJANGO_DEBUG": "false",
        "FEDLENS_DATA_DIR": str(data_dir),
        "PYTHONPATH": str(PROJECT_ROOT),
        "LOG_LEVEL": "WARNING",
    }
    env.pop("DATABASE_URL", None)
    return env


def run_child(data_dir: Path, *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, *args],
        cwd=PROJECT_ROOT,
        env=child_env(data_dir),
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_round(clients: int, parameters: int) -> dict:
    """Ledger rows and files of one round whose `clients` updates all succeeded."""
    import django

    django.setup()
    import torch
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from training import modelstore
    from training.models import (
        Checkpoint,
        ClientUpdate,
        ClientUpdateStatus,
        Dataset,
        Experiment,
        Round,
        RoundStatus,
    )
    from training.runner import simulated_sites

    owner = get_user_model().objects.create_user("bench", password=None)
    # No path: the server holds no data of it, so aggregation evaluates nothing.
    dataset = Dataset.objects.create(
        name="bench", owner=owner, num_classes=2, image_shape=[28, 28], is_federated=True
    )
    sites = simulated_sites(clients)
    experiment = Experiment.objects.create(
        owner=owner,
        name="aggregation-bench",
        dataset=dataset,
        num_rounds=1,
        clients_per_round=clients,
        min_clients=clients,
        status="running",
        current_round=1,
    )
    experiment.sites.set(sites)
    shapes = model_shapes(parameters)
    generator = torch.Generator().manual_seed(0)

    def model() -> dict[str, torch.Tensor]:
        return {
            name: torch.randn(shape, generator=generator)
            if kind == "f"
            else torch.randint(0, 1000, shape, generator=generator)
            for name, (shape, kind) in shapes.items()
        }

    initial = modelstore.save_weights(modelstore.initial_weights_name(experiment.pk), model())
    Checkpoint.objects.create(
        experiment=experiment,
        file=initial.name,
        sha256=initial.sha256,
        size_bytes=initial.size_bytes,
        num_parameters=initial.num_parameters,
    )
    fl_round = Round.objects.create(
        experiment=experiment,
        number=1,
        status=RoundStatus.AGGREGATING,
        deadline=timezone.now() + timezone.timedelta(hours=1),
    )
    stored = None
    for index, site in enumerate(sites):
        stored = modelstore.save_weights(
            modelstore.client_update_name(experiment.pk, 1, site.slug), model()
        )
        ClientUpdate.objects.create(
            round=fl_round,
            site=site,
            status=ClientUpdateStatus.SUCCEEDED,
            num_samples=100 + 10 * index,
            metrics={"loss": 1.0, "accuracy": 0.5},
            update_file=stored.name,
            update_sha256=stored.sha256,
        )
    return {
        "round": fl_round.pk,
        "model_bytes": stored.size_bytes,
        "num_parameters": stored.num_parameters,
    }


def rss_peak_reset() -> None:
    """Start the kernel's high-water mark of this process's memory again from now."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def aggregate(round_id: int) -> dict:
    """Run FedLens's aggregation of the round; its time and peak memory above the start."""
    import django

    django.setup()
    from training import modelstore
    from training.federation import experiment_strategy, run_aggregation
    from training.models import Round

    fl_round = Round.objects.select_related("experiment__dataset").get(pk=round_id)
    # Once before the clock: what the first use imports and builds is not aggregation's.
    experiment_strategy(fl_round.experiment)
    read_bytes = sum(u.update_file.size for u in fl_round.client_updates.all())
    baseline = rss_bytes()
    rss_peak_reset()
    started = time.perf_counter()
    outcome = run_aggregation(fl_round)
    seconds = time.perf_counter() - started
    peak = rss_peak_bytes()
    modelstore.delete_checkpoint_files(outcome.stored.name)
    return {"seconds": seconds, "peak_above_start": peak - baseline, "read_bytes": read_bytes}


def numpy_sum(round_id: int) -> dict:
    """The same update arrays, loaded into memory first, summed in place with numpy."""
    import django

    django.setup()
    import numpy as np
    from safetensors.numpy import load_file

    from training.models import Round

    fl_round = Round.objects.get(pk=round_id)
    arrays = [load_file(u.update_file.path) for u in fl_round.client_updates.order_by("pk")]
    started = time.perf_counter()
    total = {name: array.copy() for name, array in arrays[0].items()}
    for update in arrays[1:]:
        for name, array in update.items():
            np.add(total[name], array, out=total[name])
    seconds = time.perf_counter() - started
    # What FedLens cannot do without: the SHA-256 of every update's bytes, which it takes
    # on each of its two passes (one pass timed here, on the bytes in memory).
    started = time.perf_counter()
    for update in arrays:
        digest = hashlib.sha256()
        for array in update.values():
            digest.update(array.data)
    hashing = time.perf_counter() - started
    return {
        "seconds": seconds,
        "hash_seconds": hashing,
        "bytes": sum(a.nbytes for u in arrays for a in u.values()),
    }


def read_through(directory: Path) -> None:
    """Bring the stored updates into the page cache, as a store just written would be."""
    for path in sorted(directory.rglob("*.safetensors")):
        with path.open("rb") as handle:
            while handle.read(16 << 20):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--parameters", type=int, default=100_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["write", "aggregate", "numpy"], help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "write":
        print(json.dumps(write_round(args.clients, args.parameters)))
        return
    if args.child == "aggregate":
        print(json.dumps(aggregate(args.round)))
        return
    if args.child == "numpy":
        print(json.dumps(numpy_sum(args.round)))
        return
    DATA_ROOT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-aggregation-", dir=DATA_ROOT) as directory:
        data_dir = Path(directory)
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v0"],
            cwd=PROJECT_ROOT,
            env=child_env(data_dir),
            check=True,
        )
        written = run_child(
            data_dir,
            "--child",
            "write",
            "--clients",
            str(args.clients),
            "--parameters",
            str(args.parameters),
        )
        round_arg = ["--round", str(written["round"])]
        rows = []
        for repeat in range(1, args.repeats + 1):
            read_through(data_dir / "models")
            fedlens = run_child(data_dir, "--child", "aggregate", *round_arg)
            plain = run_child(data_dir, "--child", "numpy", *round_arg)
            rows.append((repeat, fedlens, plain))
    model_bytes = written["model_bytes"]
    print(
        f"Aggregation: {args.clients} updates of {written['num_parameters']:,} values "
        f"({model_bytes / 1e9:.2f} GB each), FedAvg through run_aggregation"
    )
    print(
        f"{'repeat':>6} {'FedLens s':>9} {'GB/s':>6} {'numpy sum s':>11} {'numpy GB/s':>10} "
        f"{'ratio':>6} {'SHA-256 x2 s':>12} {'peak memory (models)':>20}"
    )
    for repeat, fedlens, plain in rows:
        print(
            f"{repeat:>6} {fedlens['seconds']:>9.2f} "
            f"{fedlens['read_bytes'] / fedlens['seconds'] / 1e9:>6.2f} "
            f"{plain['seconds']:>11.2f} {plain['bytes'] / plain['seconds'] / 1e9:>10.2f} "
            f"{fedlens['seconds'] / plain['seconds']:>6.1f} {2 * plain['hash_seconds']:>12.2f} "
            f"{fedlens['peak_above_start'] / model_bytes:>20.2f}"
        )
    print(
        "GB/s: the updates' bytes over the time; ratio: FedLens's seconds over the numpy "
        "sum's; SHA-256 x2: hashing the same bytes in memory twice, as FedLens's two passes "
        "must; peak memory: the high-water mark above the process's memory before it."
    )


if __name__ == "__main__":
    main()
