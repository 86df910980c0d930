"""Networks, built by name so that a training job can store just a string.

Classification networks map a batch shaped (N, C, H, W) -- or (N, C, D, H, W) for
volumes -- to logits shaped (N, num_classes); segmentation networks (MONAI's U-Nets and
SegResNet) map it to per-voxel logits shaped (N, num_classes, H, W) or (N, num_classes, D,
H, W). None of them uses dropout by default, so the only randomness in training is the
data order (and, for segmentation, the augmentations), which ``training.fl.local`` and
``training.fl.segmentation`` seed.

MONAI is imported by the builders that use it: ``import monai`` loads every MONAI module,
MLflow's handler included, which a run of the small networks has no use for.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from training.fl.randomness import GLOBAL_GENERATOR

__all__ = [
    "SEGMENTATION_NETWORKS",
    "available_networks",
    "build_network",
    "check_input_shape",
    "network_task",
    "spatial_divisor",
    "suggested_network",
]

# MONAI's networks by the names FedLens stores; every other network classifies.
SEGMENTATION_NETWORKS = ("basicunet", "segresnet", "unet")


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


def _unet(
    *,
    in_channels: int,
    num_classes: int,
    spatial_dims: int,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    num_res_units: int = 1,
    norm: str = "instance",
) -> nn.Module:
    """MONAI's UNet (Ronneberger et al. 2015, arXiv:1505.04597, with residual units after
    Kerfoot et al. 2018): one stride per level below the first, small channels by default."""
    _check_spatial_dims("unet", spatial_dims, (2, 3))
    if len(channels) < 2 or len(strides) != len(channels) - 1:
        raise ValueError(
            "network 'unet' needs at least 2 channels and one stride fewer than channels, "
            f"got channels {list(channels)} and strides {list(strides)}"
        )
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
        norm=norm,
    )


def _basicunet(
    *,
    in_channels: int,
    num_classes: int,
    spatial_dims: int,
    features: Sequence[int] = (8, 8, 16, 32, 64, 8),
) -> nn.Module:
    """MONAI's BasicUNet: four 2x downsamplings; ``features`` are its six widths."""
    _check_spatial_dims("basicunet", spatial_dims, (2, 3))
    if len(features) != 6:
        raise ValueError(f"network 'basicunet' needs 6 features, got {list(features)}")
    from monai.networks.nets import BasicUNet

    return BasicUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        features=tuple(features),
    )


def _segresnet(
    *,
    in_channels: int,
    num_classes: int,
    spatial_dims: int,
    init_filters: int = 8,
    blocks_down: Sequence[int] = (1, 2, 2, 4),
    blocks_up: Sequence[int] = (1, 1, 1),
) -> nn.Module:
    """MONAI's SegResNet (Myronenko 2018, arXiv:1810.11654): a 2x downsampling per entry of
    ``blocks_down`` after the first, group normalization in groups of 8."""
    _check_spatial_dims("segresnet", spatial_dims, (2, 3))
    if init_filters < 8 or init_filters % 8:
        raise ValueError(
            f"network 'segresnet' needs init_filters a multiple of 8, got {init_filters}"
        )
    if len(blocks_up) != len(blocks_down) - 1:
        raise ValueError(
            "network 'segresnet' needs one entry of blocks_up fewer than blocks_down, got "
            f"{list(blocks_down)} and {list(blocks_up)}"
        )
    from monai.networks.nets import SegResNet

    return SegResNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        init_filters=init_filters,
        blocks_down=tuple(blocks_down),
        blocks_up=tuple(blocks_up),
    )


def _densenet121(
    *,
    in_channels: int,
    num_classes: int,
    spatial_dims: int,
    init_features: int = 64,
    growth_rate: int = 32,
) -> nn.Module:
    """MONAI's DenseNet121 (Huang et al. 2017, arXiv:1608.06993) for classification."""
    _check_spatial_dims("densenet121", spatial_dims, (2, 3))
    from monai.networks.nets import DenseNet121

    return DenseNet121(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        init_features=init_features,
        growth_rate=growth_rate,
    )


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "cnn-small": _cnn_small,
    "resnet18-small": _resnet18_small,
    "cnn3d-small": _cnn3d_small,
    "densenet121": _densenet121,
    "unet": _unet,
    "basicunet": _basicunet,
    "segresnet": _segresnet,
}
# DenseNet121's stem and three transitions halve the input five times.
_MINIMUM_SIZES = {"densenet121": 32, "cnn3d-small": 4}

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

    ``params`` are the network's own options (e.g. ``width`` for ``resnet18-small``,
    ``channels`` and ``strides`` for ``unet``). The module's ``spatial_divisor`` attribute
    is what its input sizes must be multiples of (:func:`spatial_divisor`). With ``seed``
    the initial weights are reproducible and the global torch RNG is left untouched.
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
        network = builder(**arguments)
    else:
        # Modules are initialised on the CPU: its generator alone is seeded (and restored
        # after).
        # Held throughout: no other thread may seed or draw meanwhile (training.fl.randomness).
        with GLOBAL_GENERATOR, torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            network = builder(**arguments)
    # Whole-image inference pads inputs to this multiple (training.fl.segmentation).
    network.spatial_divisor = spatial_divisor(name, **params)  # type: ignore[assignment]
    return network


def network_task(name: str) -> str:
    """What the network ``name`` learns: "segmentation" or "classification"."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown network {name!r}; known networks: {available_networks()}")
    return "segmentation" if name in SEGMENTATION_NETWORKS else "classification"


def suggested_network(task: str, spatial_dims: int) -> str:
    """The network a new experiment starts from for data of ``task`` in ``spatial_dims``."""
    if task == "segmentation":
        return "unet"
    return "cnn3d-small" if spatial_dims == 3 else "cnn-small"


def _defaults(name: str, params: dict[str, Any]) -> dict[str, Any]:
    signature = inspect.signature(_REGISTRY[name]).parameters
    return {
        key: parameter.default
        for key, parameter in signature.items()
        if key not in _FIXED_ARGUMENTS
    } | params


def spatial_divisor(name: str, **params: Any) -> int:
    """What every spatial size a segmentation network takes must be a multiple of (its
    skip connections join levels of halved sizes); 1 for classification networks."""
    settings = _defaults(name, params)
    if name == "unet":
        return math.prod(int(stride) for stride in settings["strides"])
    if name == "basicunet":
        return 16
    if name == "segresnet":
        return int(2 ** (len(settings["blocks_down"]) - 1))
    return 1


def check_input_shape(name: str, spatial_shape: Sequence[int], **params: Any) -> None:
    """Raise ValueError, saying what to change, when ``name`` (with ``params``) cannot take
    inputs of ``spatial_shape``: a segmentation network's patch or image, or a
    classification network's image."""
    shape = [int(size) for size in spatial_shape]
    divisor = spatial_divisor(name, **params)
    if divisor > 1:
        uneven = [size for size in shape if size % divisor]
        if uneven:
            raise ValueError(
                f"network {name!r} needs every spatial size to be a multiple of {divisor} (its "
                f"downsampling); {uneven} are not: use e.g. "
                f"{[max(divisor, size - size % divisor) for size in shape]}"
            )
        # The normalization at the lowest level needs more than one voxel to train.
        if math.prod(size // divisor for size in shape) < 2:
            raise ValueError(
                f"network {name!r} downsamples {shape} to a single voxel; make one size at "
                f"least {2 * divisor}"
            )
    minimum = _MINIMUM_SIZES.get(name, 1)
    small = [size for size in shape if size < minimum]
    if small:
        raise ValueError(
            f"network {name!r} needs every spatial size to be at least {minimum}, got {shape}"
        )
