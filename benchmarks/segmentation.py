"""One local epoch of a 3D U-Net: FedLens's client path against the same MONAI loop
written plainly.

    .venv/bin/python benchmarks/segmentation.py [--per-site 8] [--size 48] [--depth 32]
        [--patch-size 32,32,32] [--batch-size 4] [--repeats 3] [--device cuda|cpu]

The data: the synthetic organ-and-lesion set (``make_synthetic_dataset --task
segmentation --dims 3``: 3 sites x ``--per-site`` volumes of ``--size`` x ``--size`` x
``--depth`` voxels), opened with FedLens's Decathlon reader and read into memory once
before any timing, so both sides train on the same cached tensors.

FedLens: ``training.fl.local.train_local`` (which dispatches to
``training.fl.segmentation.train_segmentation``) with one epoch of SGD (lr 0.01,
momentum 0.9) on every volume. Plain: the loop a MONAI user writes by hand --
``monai.data.Dataset`` with the same transforms (label-balanced random patches, flips,
intensity scale and shift), a DataLoader in the same sample order, the same
``DiceCELoss`` and optimizer, mixed precision and ``channels_last_3d`` on CUDA as FedLens
uses there -- and nothing else. It runs twice: with plain tensors into the network (as
FedLens feeds it: the baseline of the ratio) and with MONAI's MetaTensors (as MONAI's
tutorials leave the batches, whose metadata tracking costs time on every operation).
All start from the same initial weights and seed their transforms alike, so they draw the
same patches: on the CPU their losses agree, which the table shows as a check that they
did the same work.

Each loop runs once to warm up (allocator, cuDNN's algorithm search), then ``--repeats``
times in turn; the table gives the median seconds of an epoch, volumes per second, and
each time as a multiple of the plain loop's with plain tensors.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from monai.data import Dataset as MonaiDataset
from monai.data import list_data_collate
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.fl.data import generate_segmentation_dataset, load_dataset
from training.fl.local import TrainConfig, derive_seed, train_local
from training.fl.networks import build_network

SEED = 0
LEARNING_RATE = 0.01
MOMENTUM = 0.9
KEYS = ("image", "label")
PLAIN = "plain MONAI"


def plain_transforms(patch_size: tuple[int, ...]) -> Compose:
    return Compose(
        [
            SpatialPadd(keys=KEYS, spatial_size=patch_size),
            RandCropByPosNegLabeld(
                keys=KEYS, label_key="label", spatial_size=patch_size, pos=1.0, neg=1.0,
                num_samples=1,
            ),
            *(RandFlipd(keys=KEYS, prob=0.5, spatial_axis=axis) for axis in range(3)),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
    )  # fmt: skip


def plain_epoch(
    model: nn.Module,
    samples: list[dict[str, torch.Tensor]],
    *,
    patch_size: tuple[int, ...],
    batch_size: int,
    device: torch.device,
    keep_metadata: bool,
) -> float:
    """One epoch as written by hand; returns the mean loss per volume. With
    ``keep_metadata`` the batches reach the network as MONAI's MetaTensors, as MONAI's
    tutorials leave them; without, as plain tensors, as FedLens gives them."""
    on_cuda = device.type == "cuda"
    memory_format = torch.channels_last_3d if on_cuda else torch.contiguous_format
    # FedLens's epoch 0 seeds its sample order and its transforms from this seed.
    epoch_seed = derive_seed(SEED, 0)
    torch.default_generator.manual_seed(epoch_seed)
    transform = plain_transforms(patch_size)
    transform.set_random_state(seed=epoch_seed % 2**32)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(epoch_seed))
    # torch's DataLoader, not MONAI's: with no worker processes MONAI's re-seeds the
    # transforms from torch's generator, and the patches would differ from FedLens's.
    loader = DataLoader(
        MonaiDataset(samples, transform=transform),
        batch_size=batch_size,
        sampler=order.tolist(),
        num_workers=0,
        collate_fn=list_data_collate,
    )
    model.to(device, memory_format=memory_format)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    scaler = torch.amp.GradScaler("cuda", enabled=on_cuda)
    criterion = DiceCELoss(to_onehot_y=True, softmax=True)
    loss_sum = torch.zeros((), device=device)
    for batch in loader:
        images, labels = batch["image"], batch["label"]
        if not keep_metadata:
            images, labels = images.as_tensor(), labels.as_tensor()
        images = images.to(device, memory_format=memory_format)
        labels = labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, enabled=on_cuda):
            logits = model(images)
        loss = criterion(logits.float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach() * len(images)
    return float(loss_sum) / len(samples)


def timed(run: Callable[[], float], device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    loss = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-site", type=int, default=8, help="volumes per site (3 sites)")
    parser.add_argument("--size", type=int, default=48, help="in-plane voxels")
    parser.add_argument("--depth", type=int, default=32, help="slices")
    parser.add_argument("--patch-size", default="32,32,32", help="D,H,W")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", help="default: cuda when present, else cpu")
    args = parser.parse_args()
    patch_size = tuple(int(size) for size in args.patch_size.split(","))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    with tempfile.TemporaryDirectory() as scratch:
        root = generate_segmentation_dataset(
            Path(scratch) / "seg3d", dims=3, per_site=args.per_site, size=args.size,
            depth=args.depth, seed=SEED,
        )  # fmt: skip
        dataset = load_dataset(root)
        # Read (and cache) every volume before timing anything.
        samples = [{"image": image, "label": mask} for image, mask in dataset]
    indices = list(range(len(dataset)))
    initial = build_network(
        "unet", in_channels=dataset.in_channels, num_classes=dataset.num_classes,
        spatial_dims=3, seed=SEED,
    )  # fmt: skip
    config = TrainConfig(
        epochs=1, batch_size=args.batch_size, lr=LEARNING_RATE, momentum=MOMENTUM,
        seed=SEED, patch_size=patch_size,
    )  # fmt: skip

    def fedlens() -> float:
        return train_local(copy.deepcopy(initial), dataset, indices, config, device=device).loss

    def plain(keep_metadata: bool) -> Callable[[], float]:
        return lambda: plain_epoch(
            copy.deepcopy(initial), samples, patch_size=patch_size,
            batch_size=args.batch_size, device=device, keep_metadata=keep_metadata,
        )  # fmt: skip

    loops = {
        "FedLens client path": fedlens,
        PLAIN: plain(keep_metadata=False),
        "plain, MetaTensors": plain(keep_metadata=True),
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in loops}
    sides = list(loops.items())
    for _, run in sides:  # warm-up
        timed(run, device)
    for _ in range(args.repeats):
        for name, run in sides:
            runs[name].append(timed(run, device))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"One local epoch of unet (3D) on {len(dataset)} volumes of {args.size}x{args.size}x"
        f"{args.depth}, patches {'x'.join(map(str, patch_size))}, batch {args.batch_size}, "
        f"{name}; median of {args.repeats}"
    )
    print(f"{'loop':<20} {'seconds':>8} {'volumes/s':>9} {'loss':>8} {'x plain':>7}")
    plain_seconds = statistics.median(seconds for seconds, _ in runs[PLAIN])
    for loop, results in runs.items():
        seconds = statistics.median(s for s, _ in results)
        loss = results[-1][1]
        print(
            f"{loop:<20} {seconds:>8.3f} {len(dataset) / seconds:>9.1f} {loss:>8.4f} "
            f"{seconds / plain_seconds:>7.2f}"
        )


if __name__ == "__main__":
    main()
