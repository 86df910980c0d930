"""FedLens's command line, as a whole process, against a plain PyTorch FedAvg loop.

    .venv/bin/python benchmarks/vs_plain.py [--cases tiny,compute] [--modes embedded,redis]
        [--repeats 3] [--throughput auto|cuda|cpu|off]

Cases: ``tiny`` is cnn-small on 28x28 images, 10 clients, 10 rounds; ``compute`` is
resnet18-small on 64x64 images, 8 clients, 5 rounds (the network's arithmetic dominates).
Each case writes a MedMNIST-style .npz (float32 pixels used as stored, a test split) and
registers it with ``--validation-fraction 0``: no client holds samples back, so both sides
train every sample of their share.

FedLens: ``manage.py run_experiment`` (iid partition, one local epoch, SGD as FedLens
defaults it: momentum 0.9), timed from the process's start to its exit. Embedded mode:
SQLite and the in-process worker. Redis mode: PostgreSQL, the Redis at ``BENCH_REDIS_URL``
(db 4 by default) and one real ``celery worker`` process, started before the clock runs
(so its start-up is not in the time) and stopped after.

Plain: this file run with ``--plain``, the loop a researcher writes by hand: numpy loads
the .npz, a torch model of the same architecture starts from FedLens's initial weights,
each client trains on its share with the batch order FedLens draws (per epoch
``randperm`` from ``derive_seed(client_seed, epoch)``), the server averages the clients'
weights weighted by their samples as FedLens's FedAvg does (a float32 running sum, then a
division) and evaluates the new model on the test split each round, as FedLens's server
does. The partition, the client seeds and the initial weights are computed with FedLens's
own functions before either clock starts and handed to the plain process in a file, so
that it imports nothing but numpy, torch and safetensors.

The table: median whole-process seconds of each side over ``--repeats`` runs taken in
turn, their ratio (targets: 1.3 for tiny, 1.05 for compute, embedded mode), and the
largest absolute difference between the final weights (FedLens's last checkpoint against
the plain loop's). On the CPU both sides do the same arithmetic and should agree exactly.

With CUDA (``--throughput auto``, the default, when a GPU is present; ``cpu`` to try the
code path on a CPU), it also measures samples per second of local training: FedLens's
``train_local`` against the plain loop's client step on the same device, in one process,
for cnn-small (2D) and cnn3d-small (3D), after a warm-up epoch (target: at least 0.95).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/4")
# Under the project, as round_overhead.py explains: file creation in this /tmp is slow.
DATA_ROOT = PROJECT_ROOT / "data"
SEED = 0
TARGETS = {"tiny": 1.3, "compute": 1.05}


@dataclass(frozen=True)
class Case:
    name: str
    network: str
    size: int
    clients: int
    rounds: int
    per_client: int
    test: int
    num_classes: int
    batch_size: int
    lr: float


CASES = {
    "tiny": Case("tiny", "cnn-small", 28, 10, 10, 200, 500, 4, 32, 0.05),
    "compute": Case("compute", "resnet18-small", 64, 8, 5, 64, 128, 4, 32, 0.05),
}


# --- The data ------------------------------------------------------------------------------


def write_dataset(case: Case, path: Path) -> None:
    """A learnable synthetic set: each class brightens its own quadrant of noisy images."""
    import numpy as np

    rng = np.random.default_rng(SEED)

    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, case.num_classes, size=count)
        images = rng.normal(0.0, 1.0, size=(count, case.size, case.size)).astype(np.float32)
        half = case.size // 2
        for index, label in enumerate(labels):
            row, column = divmod(int(label) % 4, 2)
            images[index, row * half : (row + 1) * half, column * half : (column + 1) * half] += 1
        return images, labels.astype(np.int64)

    train_images, train_labels = split(case.clients * case.per_client)
    test_images, test_labels = split(case.test)
    np.savez(path, train_images=train_images, train_labels=train_labels,
             test_images=test_images, test_labels=test_labels)  # fmt: skip


def plain_spec(case: Case, npz: Path, folder: Path) -> Path:
    """What the plain loop needs from FedLens, computed before any clock runs: each
    client's training indices and seed, and the initial weights (FedLens's functions)."""
    import numpy as np
    from safetensors.torch import save_file

    from training.fl.data.partition import partition_indices
    from training.fl.local import client_seed
    from training.fl.networks import build_network

    with np.load(npz) as archive:
        labels = archive["train_labels"]
    # As training.federation.simulated_split: the .npz's test split evaluates, so every
    # training row is partitioned; sites sim-1 ... sim-N in id order are clients 0 ... N-1.
    parts = partition_indices("iid", labels=labels, num_clients=case.clients, seed=SEED)
    network = build_network(case.network, in_channels=1, num_classes=case.num_classes, seed=SEED)
    initial = folder / f"{case.name}-initial.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(initial))
    spec = {
        "network": case.network,
        "data": str(npz),
        "rounds": case.rounds,
        "epochs": 1,
        "batch_size": case.batch_size,
        "lr": case.lr,
        "momentum": 0.9,
        "num_classes": case.num_classes,
        "clients": [
            {"indices": [int(i) for i in part], "seed": client_seed(SEED, number)}
            for number, part in enumerate(parts)
        ],
        "initial": str(initial),
        "final": str(folder / f"{case.name}-plain-final.safetensors"),
    }
    path = folder / f"{case.name}-plain.json"
    path.write_text(json.dumps(spec))
    return path


# --- The plain loop (its own process: imports numpy, torch and safetensors only) -------------


def plain_networks():
    """cnn-small and resnet18-small written plainly, parameter for parameter as FedLens's
    (the initial weights load into them with strict names and shapes)."""
    import torch
    from torch import nn

    class SmallCNN(nn.Module):
        def __init__(self, channels: int, classes: int) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                nn.AdaptiveAvgPool2d(4),
            )  # fmt: skip
            self.classifier = nn.Sequential(
                nn.Flatten(), nn.Linear(512, 64), nn.ReLU(inplace=True), nn.Linear(64, classes)
            )

        def forward(self, x):
            return self.classifier(self.features(x))

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.shortcut = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    class ResNet(nn.Module):
        def __init__(self, channels: int, classes: int, width: int = 16) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            )
            blocks, cin = [], width
            for stage, stride in enumerate((1, 2, 2, 2)):
                cout = width * 2**stage
                blocks += [Block(cin, cout, stride), Block(cout, cout, 1)]
                cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))

    return {"cnn-small": SmallCNN, "resnet18-small": ResNet}


def derive_seed(seed: int, *keys: int) -> int:
    """training.fl.local.derive_seed, the scheme FedLens's batch order follows."""
    import numpy as np

    state = np.random.SeedSequence(seed, spawn_key=keys).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def train_client(model, images, labels, indices, seed, spec, rounds_done, amp=False):
    """One client's local epochs, in FedLens's batch order; returns the samples. With
    ``amp`` (CUDA), float16 autocast and a gradient scaler, as FedLens trains there."""
    import torch
    from torch import nn

    optimizer = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=spec["momentum"])
    criterion = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    model.train()
    for epoch in range(rounds_done * spec["epochs"], (rounds_done + 1) * spec["epochs"]):
        epoch_seed = derive_seed(seed, epoch)
        order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(epoch_seed))
        shuffled = indices[order.to(indices.device)]
        for start in range(0, len(shuffled), spec["batch_size"]):
            batch = shuffled[start : start + spec["batch_size"]]
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", enabled=amp):
                loss = criterion(model(images[batch]), labels[batch])
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    return len(indices)


def plain_main(spec_path: str) -> None:
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    spec = json.loads(Path(spec_path).read_text())
    with np.load(spec["data"]) as archive:
        images = torch.from_numpy(archive["train_images"][:, None])
        labels = torch.from_numpy(archive["train_labels"])
        test_images = torch.from_numpy(archive["test_images"][:, None])
        test_labels = torch.from_numpy(archive["test_labels"])
    model = plain_networks()[spec["network"]](1, spec["num_classes"])
    global_weights = load_file(spec["initial"])
    model.load_state_dict(global_weights, strict=True)
    clients = [(torch.tensor(c["indices"]), c["seed"]) for c in spec["clients"]]
    for round_index in range(spec["rounds"]):
        running: dict[str, torch.Tensor] = {}
        total = 0.0
        for indices, seed in clients:
            model.load_state_dict(global_weights)
            samples = train_client(model, images, labels, indices, seed, spec, round_index)
            for name, tensor in model.state_dict().items():
                if not tensor.dtype.is_floating_point:  # BatchNorm's batch counter: the max
                    running[name] = torch.maximum(running.get(name, tensor), tensor).clone()
                elif name in running:
                    running[name].add_(tensor, alpha=float(samples))
                else:
                    running[name] = tensor.to(torch.float32, copy=True).mul_(float(samples))
            total += samples
        global_weights = {
            name: tensor.div_(total) if tensor.dtype.is_floating_point else tensor
            for name, tensor in running.items()
        }
        model.load_state_dict(global_weights)
        model.eval()
        with torch.inference_mode():
            correct = sum(
                int((model(test_images[s : s + 256]).argmax(1) == test_labels[s : s + 256]).sum())
                for s in range(0, len(test_labels), 256)
            )
        print(f"round {round_index + 1}: accuracy {correct / len(test_labels):.3f}")
    save_file({k: v.contiguous() for k, v in global_weights.items()}, spec["final"])


# --- Running both sides ----------------------------------------------------------------------


def child_env(
    mode: str, data_dir: Path, database: str | None, threads: int | None
) -> dict[str, str]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "flproject.settings.local",
           "DJANGO_DEBUG": "false", "FEDLENS_DATA_DIR": str(data_dir),
           "PYTHONPATH": str(PROJECT_ROOT), "LOG_LEVEL": "WARNING"}  # fmt: skip
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    if mode == "redis":
        env["DATABASE_URL"] = f"{POSTGRES_ADMIN_URL}/{database}"
        env["REDIS_URL"] = REDIS_URL
    if threads is not None:
        # PyTorch's intra-op threads in both processes (and FedLens's workers).
        env["OMP_NUM_THREADS"] = env["FEDLENS_TORCH_THREADS"] = str(threads)
    return env


def manage(env: dict[str, str], *arguments: str) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *arguments],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"manage.py {' '.join(arguments)} failed:\n{result.stderr}")
    return result.stdout


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return seconds, result.stdout


def final_checkpoint(data_dir: Path, experiment: int, rounds: int) -> Path:
    folder = data_dir / "models" / "experiments" / str(experiment) / f"round-{rounds:04d}"
    files = [p for p in folder.glob("global-*.safetensors") if ".strategy-" not in p.name]
    if len(files) != 1:
        raise SystemExit(f"expected one final checkpoint in {folder}, found {files}")
    return files[0]


def max_difference(first: Path, second: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(str(first)), load_file(str(second))
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def run_case(case: Case, mode: str, repeats: int, threads: int | None) -> dict:
    import psycopg2
    import redis

    DATA_ROOT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"vs-plain-{mode}-", dir=DATA_ROOT) as folder:
        data_dir = Path(folder)
        database = f"fedlens_vs_plain_{uuid.uuid4().hex[:8]}" if mode == "redis" else None
        admin = worker = None
        if database:
            admin = psycopg2.connect(f"{POSTGRES_ADMIN_URL}/postgres")
            admin.autocommit = True
            admin.cursor().execute(f"CREATE DATABASE {database}")
            redis.Redis.from_url(REDIS_URL).flushdb()
        env = child_env(mode, data_dir, database, threads)
        try:
            # Where registered datasets must lie (FEDLENS_DATASET_ROOTS' default).
            (data_dir / "datasets").mkdir()
            npz = data_dir / "datasets" / f"{case.name}.npz"
            write_dataset(case, npz)
            manage(env, "migrate", "-v0")
            manage(env, "bootstrap_admin")
            manage(env, "register_dataset", "--name", case.name, "--path", str(npz),
                   "--validation-fraction", "0")  # fmt: skip
            spec = plain_spec(case, npz, data_dir)
            if mode == "redis":
                worker = subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "flproject", "worker", "--pool",
                     "prefork", "--concurrency", "1", "--queues", "training,aggregation",
                     "--hostname", "vs-plain@local", "--loglevel", "WARNING",
                     "--without-gossip", "--without-mingle"],
                    cwd=PROJECT_ROOT, env=env,
                )  # fmt: skip
                wait_for_worker(env)
            fedlens_command = [
                sys.executable, "manage.py", "run_experiment", "--dataset", case.name,
                "--clients", str(case.clients), "--rounds", str(case.rounds),
                "--network", case.network, "--batch-size", str(case.batch_size),
                "--lr", str(case.lr), "--local-epochs", "1", "--seed", str(SEED),
            ]  # fmt: skip
            plain_command = [sys.executable, __file__, "--plain", str(spec)]
            fedlens_seconds, plain_seconds, differences = [], [], []
            for _ in range(repeats):
                seconds, out = timed(fedlens_command, env)
                fedlens_seconds.append(seconds)
                experiment = int(re.search(r"Experiment (\d+) ", out).group(1))
                seconds, _ = timed(plain_command, env)
                plain_seconds.append(seconds)
                differences.append(
                    max_difference(
                        final_checkpoint(data_dir, experiment, case.rounds),
                        Path(json.loads(spec.read_text())["final"]),
                    )
                )
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(30)
            if admin is not None:
                admin.cursor().execute(f"DROP DATABASE {database} WITH (FORCE)")
                admin.close()
                redis.Redis.from_url(REDIS_URL).flushdb()
    fedlens, plain = statistics.median(fedlens_seconds), statistics.median(plain_seconds)
    return {
        "case": case.name, "mode": mode, "fedlens_s": fedlens, "plain_s": plain,
        "ratio": fedlens / plain, "max_abs_diff": max(differences),
        "fedlens_runs": fedlens_seconds, "plain_runs": plain_seconds,
    }  # fmt: skip


def wait_for_worker(env: dict[str, str]) -> None:
    ping = (
        "import time, django; django.setup()\n"
        "from flproject.celery import app\n"
        "deadline = time.monotonic() + 90\n"
        "while not app.control.ping(timeout=1):\n"
        "    assert time.monotonic() < deadline, 'the worker did not answer in 90 s'\n"
    )
    subprocess.run([sys.executable, "-c", ping], cwd=PROJECT_ROOT, env=env, check=True)


# --- Samples per second of local training (CUDA) --------------------------------------------


def fedlens_local_epoch(dataset, indices, config, device, model, *, rounds_done: int) -> None:
    from training.fl.local import train_local

    train_local(model, dataset, indices, config, device=device, start_epoch=rounds_done)


def throughput(device_name: str) -> list[dict]:
    """FedLens's train_local against the plain client step, same device, same data."""
    import torch

    from training.fl.local import TrainConfig
    from training.fl.networks import build_network

    device = torch.device(device_name)
    rows = []
    setups = (("cnn-small", (1, 64, 64), 2048, 64), ("cnn3d-small", (1, 32, 32, 32), 256, 16))
    for network, shape, count, batch_size in setups:
        generator = torch.Generator().manual_seed(SEED)
        images = torch.randn((count, *shape), generator=generator)
        labels = torch.randint(0, 2, (count,), generator=generator)
        dataset = torch.utils.data.TensorDataset(images, labels)
        indices = list(range(count))
        config = TrainConfig(batch_size=batch_size, lr=0.01, seed=SEED)
        spec = {"lr": 0.01, "momentum": 0.9, "epochs": 1, "batch_size": batch_size}
        spatial = len(shape) - 1

        # Each side's one epoch as f(model, epoch): FedLens's client step, and the plain one
        # on tensors already on the device.
        fedlens_epoch = functools.partial(fedlens_local_epoch, dataset, indices, config, device)
        plain_epoch = functools.partial(
            train_client,
            images=images.to(device),
            labels=labels.to(device),
            indices=torch.arange(count, device=device),
            seed=SEED,
            spec=spec,
            amp=device.type == "cuda",
        )
        rates = {}
        for side, epoch_of in (("fedlens", fedlens_epoch), ("plain", plain_epoch)):
            model = build_network(network, in_channels=1, num_classes=2,
                                  spatial_dims=spatial, seed=SEED).to(device)  # fmt: skip
            epoch_of(model, rounds_done=0)  # warm-up: allocator, cuDNN's algorithm search
            seconds = []
            for epoch in range(1, 4):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
                epoch_of(model, rounds_done=epoch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds.append(time.perf_counter() - started)
            rates[side] = count / statistics.median(seconds)
        rows.append({"network": network, "device": device_name, **rates,
                     "ratio": rates["fedlens"] / rates["plain"]})  # fmt: skip
    return rows


# --- The tables --------------------------------------------------------------------------------


def print_tables(rows: list[dict], rates: list[dict] | None, repeats: int) -> None:
    print(f"Whole process: manage.py run_experiment vs a plain FedAvg loop (median of {repeats})")
    print(f"{'case':<8} {'mode':<9} {'FedLens s':>9} {'plain s':>8} {'ratio':>6} "
          f"{'target':>6} {'max |w diff|':>12}")  # fmt: skip
    for row in rows:
        target = f"{TARGETS[row['case']]:.2f}" if row["mode"] == "embedded" else "-"
        print(f"{row['case']:<8} {row['mode']:<9} {row['fedlens_s']:>9.2f} "
              f"{row['plain_s']:>8.2f} {row['ratio']:>6.2f} {target:>6} "
              f"{row['max_abs_diff']:>12.3g}")  # fmt: skip
    print("runs (s): " + "; ".join(
        f"{r['case']}/{r['mode']} FedLens {', '.join(f'{s:.2f}' for s in r['fedlens_runs'])}"
        f" plain {', '.join(f'{s:.2f}' for s in r['plain_runs'])}" for r in rows))  # fmt: skip
    if rates is None:
        print("\nLocal training samples/s: not measured (no CUDA device; --throughput cpu "
              "runs the same code on the CPU)")  # fmt: skip
        return
    print("\nLocal training, samples per second (median of 3 epochs after a warm-up)")
    print(f"{'network':<12} {'device':<6} {'FedLens':>9} {'plain':>9} {'ratio':>6} {'target':>6}")
    for row in rates:
        print(f"{row['network']:<12} {row['device']:<6} {row['fedlens']:>9.0f} "
              f"{row['plain']:>9.0f} {row['ratio']:>6.2f} {'0.95':>6}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="tiny,compute")
    parser.add_argument("--modes", default="embedded,redis")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--throughput", choices=("auto", "cuda", "cpu", "off"), default="auto")
    parser.add_argument(
        "--threads",
        type=int,
        help="PyTorch threads of both sides (OMP_NUM_THREADS, FEDLENS_TORCH_THREADS); "
        "default: each side's own default",
    )
    parser.add_argument("--plain", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        plain_main(args.plain)
        return
    sys.path.insert(0, str(PROJECT_ROOT))
    rows = [
        run_case(CASES[name], mode, args.repeats, args.threads)
        for name in args.cases.split(",") if name
        for mode in args.modes.split(",") if mode
    ]  # fmt: skip
    rates = None
    if args.throughput != "off":
        import torch

        device = args.throughput
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else ""
        if device:
            rates = throughput(device)
    print_tables(rows, rates, args.repeats)


if __name__ == "__main__":
    main()
