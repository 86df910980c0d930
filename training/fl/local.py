"""One client's local training and evaluation.

Seeding scheme: epoch ``e`` counted over the whole federation (``start_epoch`` plus the
local epoch) draws its data order, and any in-model randomness, from
``derive_seed(config.seed, e)``. A client that trains rounds r = 0, 1, ... with
``start_epoch = r * epochs`` therefore sees exactly the batches of one centralised run of
``rounds * epochs`` epochs. The optimizer is created afresh per call, so the two runs
match to float tolerance only for stateless optimizers: SGD with ``momentum=0`` (momentum
buffers and Adam's moments restart every round). Runs are bit-for-bit repeatable on CPU;
CUDA kernels and mixed precision are not guaranteed to be.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from training.fl.metrics import classification_metrics

__all__ = [
    "OPTIMIZERS",
    "LocalResult",
    "TrainConfig",
    "client_seed",
    "default_device",
    "derive_seed",
    "evaluate",
    "train_local",
]

OPTIMIZERS = ("sgd", "adam")
_CLIENT_STREAM = 1

Sample = tuple[torch.Tensor, int]
Indices = Sequence[int] | npt.NDArray[np.integer]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Local training hyper-parameters; ``momentum`` applies to SGD only."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclass(frozen=True, kw_only=True)
class LocalResult:
    """Outcome of one local training call; loss and accuracy are over its last epoch."""

    num_samples: int
    loss: float
    accuracy: float
    seconds: float


def default_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def derive_seed(seed: int, *keys: int) -> int:
    """An independent 63-bit seed for the stream named by ``keys`` under ``seed``."""
    state = np.random.SeedSequence(seed, spawn_key=keys).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def client_seed(seed: int, client_index: int) -> int:
    """The training seed of client ``client_index`` in a federation seeded with ``seed``."""
    # Two keys keep client streams apart from the one-key epoch streams of derive_seed.
    return derive_seed(seed, _CLIENT_STREAM, client_index)


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _seed_generators(seed: int, device: torch.device) -> None:
    """Seed the generators this training draws from: the CPU's and, on a GPU, that GPU's.

    Not torch.manual_seed: it seeds every kind of accelerator as well, and for each one
    that is absent or not yet initialised it queues the seed with a stack trace of the
    caller, which cost more than a tiny model's training step inside a Celery task.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


def train_local(
    model: nn.Module,
    dataset: Dataset[Sample],
    indices: Indices,
    config: TrainConfig,
    *,
    device: torch.device | None = None,
    start_epoch: int = 0,
) -> LocalResult:
    """Train ``model`` in place on ``dataset[indices]`` for ``config.epochs`` epochs.

    ``start_epoch`` is the number of epochs this client has already trained in earlier
    rounds (see the module docstring). The model is left on ``device``.
    """
    index_list = [int(index) for index in indices]
    if not index_list:
        raise ValueError("train_local needs at least one sample index")
    if start_epoch < 0:
        raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
    device = device or default_device()
    on_cuda = device.type == "cuda"
    model.to(device)
    model.train()
    optimizer = _make_optimizer(model, config)
    scaler = torch.amp.GradScaler("cuda", enabled=on_cuda)
    criterion = nn.CrossEntropyLoss()
    started = time.perf_counter()
    epoch_loss, epoch_accuracy = 0.0, 0.0
    with torch.random.fork_rng(devices=_rng_devices(device)):
        for epoch in range(start_epoch, start_epoch + config.epochs):
            epoch_seed = derive_seed(config.seed, epoch)
            _seed_generators(epoch_seed, device)
            order = torch.randperm(
                len(index_list), generator=torch.Generator().manual_seed(epoch_seed)
            )
            loader = DataLoader(
                dataset,
                batch_size=config.batch_size,
                sampler=[index_list[position] for position in order.tolist()],
                num_workers=0,
                pin_memory=on_cuda,
            )
            # Summed on the device: reading them back every batch would stall the GPU.
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            for inputs, targets in loader:
                inputs = inputs.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device_type=device.type, enabled=on_cuda):
                    logits = model(inputs)
                    loss = criterion(logits, targets)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                loss_sum += loss.detach().float() * len(targets)
                correct += (logits.detach().argmax(dim=1) == targets).sum()
            epoch_loss = float(loss_sum) / len(index_list)
            epoch_accuracy = int(correct) / len(index_list)
            if not math.isfinite(epoch_loss):
                raise FloatingPointError(
                    f"training diverged in epoch {epoch} (loss {epoch_loss}); try a lower lr"
                )
    return LocalResult(
        num_samples=len(index_list),
        loss=epoch_loss,
        accuracy=epoch_accuracy,
        seconds=time.perf_counter() - started,
    )


def evaluate(
    model: nn.Module,
    dataset: Dataset[Sample],
    indices: Indices | None = None,
    *,
    batch_size: int,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Metrics of ``model`` on ``dataset[indices]`` (all samples when ``indices`` is None).

    Returns :func:`training.fl.metrics.classification_metrics`, whose ``loss`` is the mean
    cross-entropy.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if indices is None:
        if not isinstance(dataset, Sized):
            raise TypeError("evaluate needs explicit indices for a dataset without a length")
        indices = range(len(dataset))
    index_list = [int(index) for index in indices]
    if not index_list:
        raise ValueError("evaluate needs at least one sample")
    device = device or default_device()
    on_cuda = device.type == "cuda"
    model.to(device)
    model.eval()
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=index_list, num_workers=0, pin_memory=on_cuda
    )
    probabilities: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    with torch.inference_mode():
        for inputs, targets in loader:
            with torch.autocast(device_type=device.type, enabled=on_cuda):
                logits = model(inputs.to(device, non_blocking=True))
            probabilities.append(torch.softmax(logits.float(), dim=1).cpu())
            labels.append(targets)
    stacked = torch.cat(probabilities).numpy()
    return classification_metrics(
        torch.cat(labels).numpy(), stacked, num_classes=int(stacked.shape[1])
    )
