"""One client's local training and evaluation.

Seeding scheme: epoch ``e`` counted over the whole federation (``start_epoch`` plus the
local epoch) draws its data order, and any in-model randomness, from
``derive_seed(config.seed, e)``. A client that trains rounds r = 0, 1, ... with
``start_epoch = r * epochs`` therefore sees exactly the batches of one centralised run of
``rounds * epochs`` epochs. The optimizer is created afresh per call, so the two runs
match to float tolerance only for stateless optimizers: SGD with ``momentum=0`` (momentum
buffers and Adam's moments restart every round). Runs are bit-for-bit repeatable on CPU;
CUDA kernels and mixed precision are not guaranteed to be.

On a GPU, training runs in mixed precision (autocast and a gradient scaler) unless
``TrainConfig.mixed_precision`` is off, cuDNN picks its fastest algorithms
(``cudnn.benchmark``), and a client's samples are batched on the device
(:mod:`training.fl.batching`: small sets stay there between rounds, larger ones come
through pinned memory). On the CPU the batches are what a DataLoader collated before, so
results stay bit for bit what they were.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from training.fl.batching import ClientSamples
from training.fl.metrics import classification_metrics
from training.fl.randomness import GLOBAL_GENERATOR, draws_random_numbers, forked_global_generator

__all__ = [
    "OPTIMIZERS",
    "DpSgd",
    "LocalResult",
    "TrainConfig",
    "client_seed",
    "default_device",
    "derive_seed",
    "evaluate",
    "gradient_adjustment",
    "make_optimizer",
    "rng_devices",
    "seed_generators",
    "train_local",
]

OPTIMIZERS = ("sgd", "adam")
_CLIENT_STREAM = 1

Sample = tuple[torch.Tensor, int]
Indices = Sequence[int] | npt.NDArray[np.integer]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Local training hyper-parameters; ``momentum`` applies to SGD only, ``patch_size``
    (one size per spatial axis, in the images' axis order) to segmentation only;
    ``mixed_precision`` (float16 autocast with a gradient scaler) to CUDA devices only."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    patch_size: tuple[int, ...] = ()
    mixed_precision: bool = True

    def __post_init__(self) -> None:
        # A task read from JSON gives a list.
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if any(
            isinstance(size, bool) or not isinstance(size, int) or size < 1
            for size in self.patch_size
        ):
            raise ValueError(f"patch_size must hold positive integers, got {self.patch_size}")
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
        if not isinstance(self.mixed_precision, bool):
            raise ValueError(f"mixed_precision must be true or false, got {self.mixed_precision!r}")


@dataclass(frozen=True, kw_only=True)
class DpSgd:
    """Per-sample DP-SGD (Abadi et al. 2016, arXiv:1607.00133) in local training: each
    sample's gradient clipped to ``max_grad_norm``, Gaussian noise of std
    ``noise_multiplier * max_grad_norm`` added to their sum, Poisson-sampled batches."""

    noise_multiplier: float
    max_grad_norm: float

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a positive number, got {self.max_grad_norm}")


@dataclass(frozen=True, kw_only=True)
class LocalResult:
    """Outcome of one local training call; loss, accuracy (classification) and Dice
    (segmentation: mean over the foreground classes) are over its last epoch."""

    num_samples: int
    loss: float
    accuracy: float | None
    seconds: float
    # Optimizer steps taken (SCAFFOLD's K).
    steps: int
    # With DP-SGD, the probability of each sample being in a batch and the batches drawn,
    # empty ones included (what the accountant counts).
    sample_rate: float | None = None
    batches_drawn: int = 0
    dice: float | None = None


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


def rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def seed_generators(seed: int, device: torch.device) -> None:
    """Seed the generators this training draws from: the CPU's and, on a GPU, that GPU's.

    Not torch.manual_seed: it seeds every kind of accelerator as well, and for each one
    that is absent or not yet initialised it queues the seed with a stack trace of the
    caller, which cost more than a tiny model's training step inside a Celery task.
    """
    with GLOBAL_GENERATOR:
        torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


def gradient_adjustment(
    model: nn.Module,
    proximal_mu: float,
    gradient_correction: Mapping[str, torch.Tensor] | None,
) -> Callable[..., None] | None:
    """An optimizer step pre-hook that adds to each parameter's gradient, or None when
    nothing is to be added (so that plain training stays bit for bit what it was).

    FedProx: mu * (w - w_start), the gradient of mu/2 * ||w - w_start||^2 added to the
    loss. SCAFFOLD: the constant correction c - c_i. Added to the gradients the optimizer
    is about to use: after the mixed-precision scaler unscaled them, and with DP-SGD after
    the clipping and noise (neither term depends on the data, so privacy is unchanged).
    """
    corrected: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
    for name, parameter in model.named_parameters():
        anchor = parameter.detach().clone() if proximal_mu else None
        correction = None
        if gradient_correction is not None and name in gradient_correction:
            correction = gradient_correction[name].to(parameter.device, parameter.dtype)
        if anchor is not None or correction is not None:
            corrected.append((parameter, anchor, correction))
    if not corrected:
        return None

    def adjust(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for parameter, anchor, correction in corrected:
                if parameter.grad is None:
                    continue
                if anchor is not None:
                    parameter.grad.add_(parameter.detach() - anchor, alpha=proximal_mu)
                if correction is not None:
                    parameter.grad.add_(correction)

    return adjust


def train_local(
    model: nn.Module,
    dataset: Dataset[Sample],
    indices: Indices,
    config: TrainConfig,
    *,
    device: torch.device | None = None,
    start_epoch: int = 0,
    proximal_mu: float = 0.0,
    gradient_correction: Mapping[str, torch.Tensor] | None = None,
    dp_sgd: DpSgd | None = None,
) -> LocalResult:
    """Train ``model`` in place on ``dataset[indices]`` for ``config.epochs`` epochs.

    ``start_epoch`` is the number of epochs this client has already trained in earlier
    rounds (see the module docstring). The model is left on ``device``. A segmentation
    dataset (``task == "segmentation"``) trains through
    :func:`training.fl.segmentation.train_segmentation`.

    ``proximal_mu`` adds FedProx's mu/2 * ||w - w_start||^2 to the loss (w_start: the
    model's weights when called); ``gradient_correction`` (parameter name to tensor) is
    added to those parameters' gradients at every step (SCAFFOLD's c - c_i); ``dp_sgd``
    trains with per-sample DP-SGD through Opacus. DP-SGD runs are not repeatable: their
    batches and noise come from fresh randomness, since whoever knows them (the server
    knows the task's seed) could take the noise back out.
    """
    if getattr(dataset, "task", "classification") == "segmentation":
        # segmentation imports this module: imported here, once both are loaded.
        from training.fl.segmentation import train_segmentation

        return train_segmentation(
            model,
            dataset,  # type: ignore[arg-type]
            indices,
            config,
            device=device,
            start_epoch=start_epoch,
            proximal_mu=proximal_mu,
            gradient_correction=gradient_correction,
            dp_sgd=dp_sgd,
        )
    index_list = [int(index) for index in indices]
    if not index_list:
        raise ValueError("train_local needs at least one sample index")
    if start_epoch < 0:
        raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
    if not (proximal_mu >= 0 and math.isfinite(proximal_mu)):
        raise ValueError(f"proximal_mu must be a number >= 0, got {proximal_mu}")
    device = device or default_device()
    # Opacus's per-sample gradients are kept in full precision.
    on_cuda = device.type == "cuda"
    mixed_precision = on_cuda and dp_sgd is None and config.mixed_precision
    if on_cuda:
        # The shapes repeat every batch: cuDNN's search for the fastest kernels pays off.
        torch.backends.cudnn.benchmark = True
    model.to(device)
    model.train()
    optimizer = make_optimizer(model, config)
    adjustment = gradient_adjustment(model, proximal_mu, gradient_correction)
    if adjustment is not None:
        # On the optimizer itself: Opacus's wrapper calls its step after adding the noise.
        optimizer.register_step_pre_hook(adjustment)
    scaler = torch.amp.GradScaler("cuda", enabled=mixed_precision)
    criterion = nn.CrossEntropyLoss()
    trainee: nn.Module = model
    private_loader: DataLoader[Sample] | None = None
    sample_rate: float | None = None
    if dp_sgd is not None:
        # privacy imports this module (derive_seed): imported here, once both are loaded.
        from training.fl.privacy import make_private_training

        fresh = torch.Generator().manual_seed(secrets.randbits(63))
        trainee, optimizer, private_loader, _ = make_private_training(
            model,
            optimizer,
            DataLoader(Subset(dataset, index_list), batch_size=config.batch_size),
            noise_multiplier=dp_sgd.noise_multiplier,
            max_grad_norm=dp_sgd.max_grad_norm,
            noise_generator=torch.Generator(device).manual_seed(secrets.randbits(63)),
        )
        sample_rate = float(private_loader.sample_rate)  # type: ignore[attr-defined]
    # Dropout and DP-SGD's sampling draw from the global generator: no other thread may
    # seed, draw from or restore it while they train (see training.fl.randomness).
    draws_from_global = private_loader is not None or draws_random_numbers(model)
    started = time.perf_counter()
    samples = ClientSamples(dataset, index_list, device) if private_loader is None else None
    steps = drawn = 0
    epoch_loss, epoch_accuracy = 0.0, 0.0
    try:
        with forked_global_generator(rng_devices(device), hold=draws_from_global):
            for epoch in range(start_epoch, start_epoch + config.epochs):
                batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                if samples is None:
                    seed_generators(int(torch.randint(2**62, (), generator=fresh)), device)
                    batches = private_loader  # type: ignore[assignment]
                else:
                    epoch_seed = derive_seed(config.seed, epoch)
                    seed_generators(epoch_seed, device)
                    order = torch.randperm(
                        len(index_list), generator=torch.Generator().manual_seed(epoch_seed)
                    )
                    batches = samples.batches(order, config.batch_size)
                # Summed on the device: reading them back every batch would stall the GPU.
                loss_sum = torch.zeros((), device=device)
                correct = torch.zeros((), dtype=torch.int64, device=device)
                seen = 0
                for inputs, targets in batches:
                    drawn += 1
                    if len(targets) == 0:  # a Poisson batch may come out empty
                        continue
                    inputs = inputs.to(device, non_blocking=True)
                    targets = targets.to(device, non_blocking=True)
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast(device_type=device.type, enabled=mixed_precision):
                        logits = trainee(inputs)
                        loss = criterion(logits, targets)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    steps += 1
                    seen += len(targets)
                    loss_sum += loss.detach().float() * len(targets)
                    correct += (logits.detach().argmax(dim=1) == targets).sum()
                epoch_loss = float(loss_sum) / max(seen, 1)
                epoch_accuracy = int(correct) / max(seen, 1)
                if not math.isfinite(epoch_loss):
                    raise FloatingPointError(
                        f"training diverged in epoch {epoch} (loss {epoch_loss}); try a lower lr"
                    )
    finally:
        if trainee is not model:
            # The module is reused for later tasks: Opacus's hooks must not stay on it.
            trainee.to_standard_module()  # type: ignore[operator]
    return LocalResult(
        num_samples=len(index_list),
        loss=epoch_loss,
        accuracy=epoch_accuracy,
        seconds=time.perf_counter() - started,
        steps=steps,
        sample_rate=sample_rate,
        batches_drawn=drawn if dp_sgd is not None else 0,
    )


def evaluation_indices(dataset: Any, indices: Indices | None, batch_size: int) -> list[int]:
    """The samples an evaluation covers (all of them when ``indices`` is None), checked."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if indices is None:
        if not isinstance(dataset, Sized):
            raise TypeError("evaluate needs explicit indices for a dataset without a length")
        indices = range(len(dataset))
    index_list = [int(index) for index in indices]
    if not index_list:
        raise ValueError("evaluate needs at least one sample")
    return index_list


def evaluate(
    model: nn.Module,
    dataset: Dataset[Sample],
    indices: Indices | None = None,
    *,
    batch_size: int,
    device: torch.device | None = None,
    patch_size: Sequence[int] = (),
) -> dict[str, Any]:
    """Metrics of ``model`` on ``dataset[indices]`` (all samples when ``indices`` is None).

    Returns :func:`training.fl.metrics.classification_metrics`, whose ``loss`` is the mean
    cross-entropy; for a segmentation dataset, the metrics of
    :func:`training.fl.segmentation.evaluate_segmentation` (by sliding windows of
    ``patch_size`` when it is given).
    """
    if getattr(dataset, "task", "classification") == "segmentation":
        from training.fl.segmentation import evaluate_segmentation

        return evaluate_segmentation(
            model,
            dataset,  # type: ignore[arg-type]
            indices,
            batch_size=batch_size,
            patch_size=patch_size,
            device=device,
        )
    index_list = evaluation_indices(dataset, indices, batch_size)
    device = device or default_device()
    on_cuda = device.type == "cuda"
    model.to(device)
    model.eval()
    samples = ClientSamples(dataset, index_list, device)
    probabilities: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    with torch.inference_mode():
        for inputs, targets in samples.batches(torch.arange(len(index_list)), batch_size):
            with torch.autocast(device_type=device.type, enabled=on_cuda):
                logits = model(inputs)
            probabilities.append(torch.softmax(logits.float(), dim=1).cpu())
            labels.append(targets.cpu())
    stacked = torch.cat(probabilities).numpy()
    return classification_metrics(
        torch.cat(labels).numpy(), stacked, num_classes=int(stacked.shape[1])
    )
