"""One client's local training and evaluation for segmentation, with MONAI.

The loss is MONAI's DiceCELoss (Dice plus cross-entropy on softmax outputs). With a
``patch_size`` training draws one random patch per image per step, centred on foreground
and background voxels equally often (``RandCropByPosNegLabeld``), and evaluation covers
each image with overlapping patches (``sliding_window_inference``); without it both use
whole images, padded up to what the network's downsampling needs. Every training sample
is also flipped along each axis, and its intensities scaled and shifted, at random.

Seeding follows ``training.fl.local``: epoch ``e`` draws its data order and its
augmentations from ``derive_seed(config.seed, e)``, so runs are repeatable on CPU. On CUDA,
training runs in mixed precision with a gradient scaler (unless
``TrainConfig.mixed_precision`` is off) and in the channels-last memory layout
(``channels_last_3d`` for volumes), neither of which is bit-for-bit repeatable; cuDNN picks
its fastest kernels for the batch shapes (``cudnn.benchmark``) and batches, augmented on
the host, reach the GPU through pinned memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)
from monai.utils import convert_to_tensor
from torch import nn
from torch.utils.data import Dataset

from training.fl.local import (
    DpSgd,
    Indices,
    LocalResult,
    TrainConfig,
    default_device,
    derive_seed,
    evaluation_indices,
    gradient_adjustment,
    make_optimizer,
    rng_devices,
    seed_generators,
)
from training.fl.metrics import segmentation_scores, summarize_segmentation
from training.fl.randomness import draws_random_numbers, forked_global_generator

__all__ = ["evaluate_segmentation", "predict_mask", "train_segmentation"]

SegmentationSample = tuple[torch.Tensor, torch.Tensor]
_KEYS = ("image", "label")
# numpy's RandomState, which MONAI's transforms draw from, takes 32-bit seeds.
_SEED_RANGE = 2**32
# Share of each window its neighbours overlap in sliding-window inference.
_WINDOW_OVERLAP = 0.25


def _augmentations(patch_size: Sequence[int], spatial_dims: int) -> Compose:
    """Random label-balanced patches (when ``patch_size``), flips and intensity changes."""
    transforms: list[Any] = []
    if patch_size:
        transforms += [
            # An image smaller than the patch is padded (as background) rather than refused.
            SpatialPadd(keys=_KEYS, spatial_size=tuple(patch_size)),
            RandCropByPosNegLabeld(
                keys=_KEYS,
                label_key="label",
                spatial_size=tuple(patch_size),
                pos=1.0,
                neg=1.0,
                num_samples=1,
            ),
        ]
    transforms += [
        RandFlipd(keys=_KEYS, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)
    ]
    transforms += [
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
    ]
    return Compose(transforms)


def _augmented(transform: Compose, image: torch.Tensor, mask: torch.Tensor) -> SegmentationSample:
    result = transform({"image": image, "label": mask})
    # The crop returns a list of num_samples (one) dictionaries.
    sample = result[0] if isinstance(result, list) else result
    return (
        convert_to_tensor(sample["image"], track_meta=False, dtype=torch.float32),
        convert_to_tensor(sample["label"], track_meta=False, dtype=torch.int64),
    )


def _stack(samples: Sequence[SegmentationSample]) -> SegmentationSample:
    shapes = {tuple(image.shape) for image, _ in samples}
    if len(shapes) > 1:
        raise ValueError(
            f"a batch holds images of different shapes {sorted(shapes)}: give the experiment "
            "a patch_size, or the dataset an image_shape that all images are resampled to"
        )
    images, masks = zip(*samples, strict=True)
    return torch.stack(images), torch.stack(masks)


def _batches(
    dataset: Dataset[SegmentationSample],
    order: Sequence[int],
    batch_size: int,
    transform: Compose | None = None,
) -> Iterator[SegmentationSample]:
    for start in range(0, len(order), batch_size):
        samples = [dataset[index] for index in order[start : start + batch_size]]
        if transform is not None:
            samples = [_augmented(transform, image, mask) for image, mask in samples]
        yield _stack(samples)


def _memory_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def _divisor(model: nn.Module) -> int:
    # Set by training.fl.networks.build_network; a network built elsewhere pads nothing.
    return int(getattr(model, "spatial_divisor", 1))


def _padded_forward(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``inputs`` of any spatial size: padded at the end of each
    axis up to a multiple of the network's divisor, and cropped back."""
    divisor = _divisor(model)
    spatial = inputs.shape[2:]
    padding: list[int] = []
    for size in reversed(spatial):  # F.pad lists the last axis first
        padding += [0, -size % divisor]
    if not any(padding):
        logits: torch.Tensor = model(inputs)
        return logits
    logits = model(F.pad(inputs, padding))
    return logits[(slice(None), slice(None), *(slice(0, size) for size in spatial))]


def _logits(
    model: nn.Module,
    inputs: torch.Tensor,
    patch_size: Sequence[int],
    sw_batch_size: int,
) -> torch.Tensor:
    if patch_size:
        result = sliding_window_inference(
            inputs,
            roi_size=tuple(patch_size),
            sw_batch_size=sw_batch_size,
            predictor=model,
            overlap=_WINDOW_OVERLAP,
        )
        # One predictor output gives one tensor.
        logits: torch.Tensor = convert_to_tensor(result, track_meta=False)
        return logits
    return _padded_forward(model, inputs)


def _check_patch_size(patch_size: Sequence[int], spatial_dims: int) -> None:
    if patch_size and len(patch_size) != spatial_dims:
        raise ValueError(
            f"patch_size {list(patch_size)} must give one size per spatial axis of the "
            f"images ({spatial_dims})"
        )


def _foreground_dice(confusion: torch.Tensor) -> float:
    """Mean Dice over the foreground classes that occur, from a (predicted, true) voxel
    count matrix; 0.0 when none does."""
    counts = confusion.double()
    overlap = counts.diagonal()
    totals = counts.sum(dim=0) + counts.sum(dim=1)
    present = totals[1:] > 0
    if not bool(present.any()):
        return 0.0
    return float((2 * overlap[1:][present] / totals[1:][present]).mean())


def train_segmentation(
    model: nn.Module,
    dataset: Dataset[SegmentationSample],
    indices: Indices,
    config: TrainConfig,
    *,
    device: torch.device | None = None,
    start_epoch: int = 0,
    proximal_mu: float = 0.0,
    gradient_correction: Mapping[str, torch.Tensor] | None = None,
    dp_sgd: DpSgd | None = None,
) -> LocalResult:
    """Train ``model`` in place on ``dataset[indices]`` (``(image, mask)`` pairs) for
    ``config.epochs`` epochs, on patches of ``config.patch_size`` when it is set.

    The arguments are :func:`training.fl.local.train_local`'s: FedProx's ``proximal_mu``
    and SCAFFOLD's ``gradient_correction`` apply as there. DP-SGD is refused: Opacus has
    no per-sample gradients for the layers of MONAI's segmentation networks. The result's
    ``dice`` is the last epoch's mean foreground Dice over the voxels it trained on.
    """
    if dp_sgd is not None:
        raise ValueError(
            "local DP-SGD is not available for segmentation networks (Opacus computes no "
            "per-sample gradients for their layers); use client-level DP (dp_clip, dp_noise)"
        )
    index_list = [int(index) for index in indices]
    if not index_list:
        raise ValueError("train_segmentation needs at least one sample index")
    if start_epoch < 0:
        raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
    if not (proximal_mu >= 0 and math.isfinite(proximal_mu)):
        raise ValueError(f"proximal_mu must be a number >= 0, got {proximal_mu}")
    spatial_dims = dataset[index_list[0]][0].ndim - 1
    _check_patch_size(config.patch_size, spatial_dims)
    device = device or default_device()
    on_cuda = device.type == "cuda"
    memory_format = _memory_format(spatial_dims) if on_cuda else torch.contiguous_format
    mixed_precision = on_cuda and config.mixed_precision
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    model.to(device)
    model.to(memory_format=memory_format)  # type: ignore[call-overload]  # missing in stubs
    model.train()
    optimizer = make_optimizer(model, config)
    adjustment = gradient_adjustment(model, proximal_mu, gradient_correction)
    if adjustment is not None:
        optimizer.register_step_pre_hook(adjustment)
    scaler = torch.amp.GradScaler("cuda", enabled=mixed_precision)
    criterion = DiceCELoss(to_onehot_y=True, softmax=True)
    transform = _augmentations(config.patch_size, spatial_dims)
    started = time.perf_counter()
    steps = 0
    epoch_loss, epoch_dice = 0.0, 0.0
    try:
        hold = draws_random_numbers(model)  # see training.fl.randomness
        with forked_global_generator(rng_devices(device), hold=hold):
            for epoch in range(start_epoch, start_epoch + config.epochs):
                epoch_seed = derive_seed(config.seed, epoch)
                seed_generators(epoch_seed, device)
                transform.set_random_state(seed=epoch_seed % _SEED_RANGE)
                order = torch.randperm(
                    len(index_list), generator=torch.Generator().manual_seed(epoch_seed)
                )
                sampled = [index_list[position] for position in order.tolist()]
                # Summed on the device: reading them back every batch would stall the GPU.
                loss_sum = torch.zeros((), device=device)
                confusion: torch.Tensor | None = None
                seen = 0
                for images, masks in _batches(dataset, sampled, config.batch_size, transform):
                    if on_cuda:  # a non_blocking copy from pageable memory would block
                        images, masks = images.pin_memory(), masks.pin_memory()
                    images = images.to(device, non_blocking=True, memory_format=memory_format)
                    masks = masks.to(device, non_blocking=True)
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast(device_type=device.type, enabled=mixed_precision):
                        logits = _padded_forward(model, images)
                    # The loss in full precision: the Dice term sums over many voxels.
                    loss = criterion(logits.float(), masks)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    steps += 1
                    seen += len(images)
                    loss_sum += loss.detach() * len(images)
                    num_classes = logits.shape[1]
                    pairs = logits.detach().argmax(dim=1).flatten() * num_classes + masks.flatten()
                    counts = torch.bincount(pairs, minlength=num_classes**2)
                    counts = counts.reshape(num_classes, num_classes)
                    confusion = counts if confusion is None else confusion + counts
                epoch_loss = float(loss_sum) / max(seen, 1)
                epoch_dice = _foreground_dice(confusion) if confusion is not None else 0.0
                if not math.isfinite(epoch_loss):
                    raise FloatingPointError(
                        f"training diverged in epoch {epoch} (loss {epoch_loss}); try a lower lr"
                    )
    finally:
        # The module is reused for later tasks, whose weights load into the usual layout.
        model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return LocalResult(
        num_samples=len(index_list),
        loss=epoch_loss,
        accuracy=None,
        dice=epoch_dice,
        seconds=time.perf_counter() - started,
        steps=steps,
    )


def evaluate_segmentation(
    model: nn.Module,
    dataset: Dataset[SegmentationSample],
    indices: Indices | None = None,
    *,
    batch_size: int,
    patch_size: Sequence[int] = (),
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Metrics of ``model`` on ``dataset[indices]`` (all samples when ``indices`` is None).

    Returns ``loss`` (mean DiceCELoss per image), ``num_samples`` and
    :func:`training.fl.metrics.segmentation_metrics`'s ``dice``, ``dice_per_class``,
    ``hd95`` (in mm when the dataset has ``spacing(i)``) and ``hd95_per_class``. With
    ``patch_size`` each image is covered by overlapping windows of that size, in batches
    of ``batch_size`` windows; without it ``batch_size`` whole images go through at once.
    """
    index_list = evaluation_indices(dataset, indices, batch_size)
    device = device or default_device()
    on_cuda = device.type == "cuda"
    model.to(device)
    model.eval()
    criterion = DiceCELoss(to_onehot_y=True, softmax=True)
    spacing_of = getattr(dataset, "spacing", None)
    # With windows, one image at a time: batch_size counts windows then.
    images_per_batch = 1 if patch_size else batch_size
    losses: list[float] = []
    dice_rows: list[np.ndarray] = []
    hd95_rows: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(index_list), images_per_batch):
            chosen = index_list[start : start + images_per_batch]
            images, masks = _stack([dataset[index] for index in chosen])
            _check_patch_size(patch_size, images.ndim - 2)
            with torch.autocast(device_type=device.type, enabled=on_cuda):
                logits = _logits(model, images.to(device), patch_size, batch_size)
            logits = logits.float()
            masks = masks.to(device)
            for position in range(len(chosen)):
                losses.append(
                    float(
                        criterion(logits[position : position + 1], masks[position : position + 1])
                    )
                )
            spacing = [list(spacing_of(index)) for index in chosen] if spacing_of else None
            dice, hd95 = segmentation_scores(
                logits.argmax(dim=1).cpu(),
                masks.cpu(),
                num_classes=logits.shape[1],
                spacing=spacing,
            )
            dice_rows.append(dice)
            hd95_rows.append(hd95)
    metrics = summarize_segmentation(np.concatenate(dice_rows), np.concatenate(hd95_rows))
    metrics["loss"] = float(np.mean(losses))
    return metrics


def predict_mask(
    model: nn.Module,
    image: torch.Tensor,
    *,
    patch_size: Sequence[int] = (),
    device: torch.device | None = None,
    sw_batch_size: int = 4,
) -> torch.Tensor:
    """The label map ``model`` predicts for one ``image`` shaped (C, *spatial): an int64
    tensor of shape ``spatial`` on the CPU. With ``patch_size``, by sliding window."""
    if image.ndim not in (3, 4):
        raise ValueError(
            f"image must be shaped (C, *spatial) with 2 or 3 axes, got {tuple(image.shape)}"
        )
    _check_patch_size(patch_size, image.ndim - 1)
    device = device or default_device()
    model.to(device)
    model.eval()
    with (
        torch.inference_mode(),
        torch.autocast(device_type=device.type, enabled=device.type == "cuda"),
    ):
        logits = _logits(model, image.unsqueeze(0).to(device), patch_size, sw_batch_size)
    return logits.argmax(dim=1)[0].to("cpu", torch.int64)
