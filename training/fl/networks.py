"""Classification networks, built by name so that a training job can store just a string.

Every network maps a batch shaped (N, C, H, W) -- or (N, C, D, H, W) for volumes -- to
logits shaped (N, num_classes). None of them uses dropout, so the only randomness in
training is the data order, which ``training.fl.local`` seeds.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["available_networks", "build_network"]


def _check_spatial_dims(name: str, spatial_dims: int, supported: tuple[int, ...]) -> None:
    if spatial_dims not in supported:
        raise ValueError(f"network {name!r} supports spatial_dims {supported}, got {spatial_dims}")


class SmallCNN(nn.Module):
    """Two conv/pool stages and a two-layer head; works for any 2D image size."""

    def __init__(self, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            # A fixed 4x4 grid decouples the head from the input size.
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits


class BasicBlock(nn.Module):
    """The two-convolution residual block of He et al., 2016 (arXiv:1512.03385)."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, spatial_dims: int):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                conv(in_channels, out_channels, 1, stride=stride, bias=False), norm(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        activated: torch.Tensor = self.relu(out + self.shortcut(x))
        return activated


class SmallResNet(nn.Module):
    """ResNet-18 layout (four stages of two basic blocks) with narrow channels.

    The stem is a single 3x3 convolution rather than the ImageNet 7x7/maxpool stem, so
    small medical images (28-128 px) keep their resolution; raise ``stem_stride`` for
    large inputs to keep the cost down.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        spatial_dims: int,
        width: int = 16,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if stem_stride < 1:
            raise ValueError(f"stem_stride must be >= 1, got {stem_stride}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        pool = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
        self.stem = nn.Sequential(
            conv(in_channels, width, 3, stride=stem_stride, padding=1, bias=False),
            norm(width),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        channels = width
        for stage, stride in enumerate((1, 2, 2, 2)):
            out_channels = width * 2**stage
            blocks.append(
                BasicBlock(channels, out_channels, stride=stride, spatial_dims=spatial_dims)
            )
            blocks.append(
                BasicBlock(out_channels, out_channels, stride=1, spatial_dims=spatial_dims)
            )
            channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.pool = pool(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.blocks(self.stem(x)))
        logits: torch.Tensor = self.fc(torch.flatten(features, 1))
        return logits


class SmallCNN3D(nn.Module):
    """Three Conv3d stages for volumes; inputs need at least 4 voxels along each axis."""

    def __init__(self, *, in_channels: int, num_classes: int) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv3d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm3d(cout),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *stage(in_channels, 8),
            nn.MaxPool3d(2),
            *stage(8, 16),
            nn.MaxPool3d(2),
            *stage(16, 32),
            nn.AdaptiveAvgPool3d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 2 * 2 * 2, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits


def _cnn_small(*, in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module:
    _check_spatial_dims("cnn-small", spatial_dims, (2,))
    return SmallCNN(in_channels=in_channels, num_classes=num_classes)


def _resnet18_small(
    *, in_channels: int, num_classes: int, spatial_dims: int, width: int = 16, stem_stride: int = 1
) -> nn.Module:
    _check_spatial_dims("resnet18-small", spatial_dims, (2, 3))
    return SmallResNet(
        in_channels=in_channels,
        num_classes=num_classes,
        spatial_dims=spatial_dims,
        width=width,
        stem_stride=stem_stride,
    )


def _cnn3d_small(*, in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module:
    _check_spatial_dims("cnn3d-small", spatial_dims, (3,))
    return SmallCNN3D(in_channels=in_channels, num_classes=num_classes)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "cnn-small": _cnn_small,
    "resnet18-small": _resnet18_small,
    "cnn3d-small": _cnn3d_small,
}

_FIXED_ARGUMENTS = {"in_channels", "num_classes", "spatial_dims"}


def available_networks() -> list[str]:
    """Names accepted by :func:`build_network`, sorted."""
    return sorted(_REGISTRY)


def build_network(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    spatial_dims: int = 2,
    seed: int | None = None,
    **params: Any,
) -> nn.Module:
    """Build the network registered as ``name``.

    ``params`` are the network's own options (e.g. ``width`` for ``resnet18-small``).
    With ``seed`` the initial weights are reproducible and the global torch RNG is left
    untouched.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown network {name!r}; known networks: {available_networks()}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    builder = _REGISTRY[name]
    accepted = set(inspect.signature(builder).parameters) - _FIXED_ARGUMENTS
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(
            f"network {name!r} got unknown parameters {unknown}; accepted: {sorted(accepted)}"
        )
    arguments = {
        "in_channels": in_channels,
        "num_classes": num_classes,
        "spatial_dims": spatial_dims,
        **params,
    }
    if seed is None:
        return builder(**arguments)
    # Modules are initialised on the CPU: its generator alone is seeded (and restored after).
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return builder(**arguments)
