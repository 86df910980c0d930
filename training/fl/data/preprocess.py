"""Turning an :class:`ImageArray` into a network input tensor.

The pipeline is: resample (SimpleITK) -> channel handling -> intensity normalisation.
Sizes and spacings are given in SimpleITK's physical axis order (x, y[, z]), like
``ImageArray.spacing``; the resulting tensor is channels-first in array order,
C x H x W or C x D x H x W.
"""

# SimpleITK annotates its procedural functions but not its classes (readers, writers,
# filters), which strict mypy would report at every call.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from training.fl.data.readers import ImageArray, image_from_sitk, image_to_sitk

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_FOLDER_NORMALIZATION",
    "DEFAULT_NPZ_NORMALIZATION",
    "DEFAULT_UINT8_NPZ_NORMALIZATION",
    "LUMA_WEIGHTS",
    "NORMALIZATION_FORMS",
    "Normalization",
    "NormalizationError",
    "Preprocessor",
    "check_normalization",
    "normalize_intensity",
    "parse_normalization",
    "resample",
    "to_channels",
]

NORMALIZATION_FORMS = (
    "none, minmax, zscore, mean-std:M,S (one mean and one standard deviation for all "
    "channels) or mean-std:M1,M2,M3/S1,S2,S3 (one per channel), ct-window:LEVEL,WIDTH"
)
# What a blank Dataset.normalization means, per format: image folders are z-scored per
# image; 8-bit .npz files follow MedMNIST's convention (pixels / 255, then (x - 0.5) / 0.5);
# other .npz files are used as stored.
DEFAULT_FOLDER_NORMALIZATION = "zscore"
DEFAULT_UINT8_NPZ_NORMALIZATION = "mean-std:0.5,0.5"
DEFAULT_NPZ_NORMALIZATION = "none"

_PER_IMAGE_KINDS = ("minmax", "zscore")
_PLAIN_KINDS = ("none", *_PER_IMAGE_KINDS)

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}

# ITU-R BT.601 luma weights, for collapsing RGB to one channel.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class NormalizationError(ValueError):
    """A normalization spec is malformed; the message says what to write instead."""


def _number_text(value: float) -> str:
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True, kw_only=True)
class Normalization:
    """A parsed intensity normalization (see :func:`parse_normalization`).

    ``minmax`` and ``zscore`` work per image, over all of its channels together;
    ``mean-std`` and ``ct-window`` work pixel by pixel with fixed numbers, ``mean-std``
    per channel when it holds one mean or standard deviation per channel.
    """

    kind: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    level: float = 0.0
    width: float = 0.0

    @property
    def spec(self) -> str:
        """The canonical text of this normalization, as the ledger stores it."""
        if self.kind == "mean-std":
            if len(self.mean) == 1 and len(self.std) == 1:
                return f"mean-std:{_number_text(self.mean[0])},{_number_text(self.std[0])}"
            means = ",".join(map(_number_text, self.mean))
            stds = ",".join(map(_number_text, self.std))
            return f"mean-std:{means}/{stds}"
        if self.kind == "ct-window":
            return f"ct-window:{_number_text(self.level)},{_number_text(self.width)}"
        return self.kind

    def check_channels(self, channels: int) -> None:
        """Refuse per-channel values that do not match ``channels``."""
        if self.kind != "mean-std":
            return
        for name, values in (("means", self.mean), ("standard deviations", self.std)):
            if len(values) not in (1, channels):
                raise NormalizationError(
                    f"{self.spec} gives {len(values)} {name} but the images have "
                    f"{channels} channel(s): give one value for all channels or one per channel"
                )

    def __call__(self, image: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
        """Normalise one image; per-channel values need it channels first."""
        values = image.astype(np.float32, copy=False)
        if self.kind == "zscore":
            std = float(values.std())
            centred = values - np.float32(values.mean())
            # A constant image becomes zeros rather than a division by zero.
            return centred / np.float32(std) if std > 0 else np.zeros_like(values)
        if self.kind == "minmax":
            low, high = float(values.min()), float(values.max())
            if high <= low:
                return np.zeros_like(values)
            return (values - np.float32(low)) / np.float32(high - low)
        return self._pixelwise(values, channel_axis=0)

    def batch(self, images: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
        """Normalise N images at once, shaped N x C x ...; the same as one by one."""
        values = images.astype(np.float32, copy=False)
        if self.kind in _PER_IMAGE_KINDS:
            return np.stack([self(image) for image in values]) if len(values) else values
        return self._pixelwise(values, channel_axis=1)

    def _pixelwise(
        self, values: npt.NDArray[np.float32], *, channel_axis: int
    ) -> npt.NDArray[np.float32]:
        if self.kind == "none":
            return values
        if self.kind == "ct-window":
            low = self.level - self.width / 2
            clipped = np.clip(values, np.float32(low), np.float32(low + self.width))
            return ((clipped - np.float32(low)) / np.float32(self.width)).astype(np.float32)
        mean = self._per_channel(self.mean, values, channel_axis)
        std = self._per_channel(self.std, values, channel_axis)
        return ((values - mean) / std).astype(np.float32)

    def _per_channel(
        self, numbers: tuple[float, ...], values: npt.NDArray[np.float32], channel_axis: int
    ) -> npt.NDArray[np.float32]:
        if len(numbers) == 1:
            return np.float32(numbers[0])  # type: ignore[return-value]
        channels = values.shape[channel_axis] if values.ndim > channel_axis else 0
        if channels != len(numbers):
            raise NormalizationError(
                f"{self.spec} has {len(numbers)} values per channel but the image has "
                f"{channels} channel(s)"
            )
        shape = [1] * values.ndim
        shape[channel_axis] = len(numbers)
        return np.asarray(numbers, dtype=np.float32).reshape(shape)


def _numbers(kind: str, text: str, example: str) -> tuple[float, ...]:
    numbers = []
    for item in text.split(","):
        try:
            number = float(item)
        except ValueError:
            raise NormalizationError(
                f"{kind}: {item.strip()!r} is not a number; write e.g. {example}"
            ) from None
        if not math.isfinite(number):
            raise NormalizationError(f"{kind}: {item.strip()!r} is not a finite number")
        numbers.append(number)
    return tuple(numbers)


def _parse_mean_std(argument: str) -> Normalization:
    example = "mean-std:0.5,0.5 or mean-std:0.485,0.456,0.406/0.229,0.224,0.225"
    if "/" in argument:
        means_text, _, stds_text = argument.partition("/")
        if "/" in stds_text:
            raise NormalizationError(
                f"mean-std: use one '/' between the means and the standard deviations, e.g. "
                f"{example}"
            )
        means = _numbers("mean-std", means_text, example)
        stds = _numbers("mean-std", stds_text, example)
        if len(means) > 1 and len(stds) > 1 and len(means) != len(stds):
            raise NormalizationError(
                f"mean-std: {len(means)} means but {len(stds)} standard deviations; give one "
                "value for all channels or one per channel on each side of the '/'"
            )
    else:
        numbers = _numbers("mean-std", argument, example)
        if len(numbers) != 2:
            raise NormalizationError(
                f"mean-std takes a mean and a standard deviation (mean-std:M,S), got "
                f"{len(numbers)} numbers; for one value per channel separate the means from "
                "the standard deviations with '/', e.g. "
                "mean-std:0.485,0.456,0.406/0.229,0.224,0.225"
            )
        means, stds = numbers[:1], numbers[1:]
    if min(stds) <= 0:
        raise NormalizationError(
            f"mean-std: standard deviations must be positive, got {_number_text(min(stds))}"
        )
    return Normalization(kind="mean-std", mean=means, std=stds)


def _parse_ct_window(argument: str) -> Normalization:
    example = "ct-window:40,400 (soft tissue, in Hounsfield units)"
    numbers = _numbers("ct-window", argument, example)
    if len(numbers) != 2:
        raise NormalizationError(
            f"ct-window takes a level and a width (ct-window:LEVEL,WIDTH), got "
            f"{len(numbers)} numbers; e.g. {example}"
        )
    level, width = numbers
    if width <= 0:
        raise NormalizationError(
            f"ct-window: the width must be positive, got {_number_text(width)}; e.g. {example}"
        )
    return Normalization(kind="ct-window", level=level, width=width)


def parse_normalization(spec: str) -> Normalization:
    """Parse a normalization spec; :class:`NormalizationError` says what to fix.

    Forms: ``none``, ``minmax``, ``zscore``, ``mean-std:M,S`` (one mean and standard
    deviation for every channel), ``mean-std:M1,M2,M3/S1,S2,S3`` (per channel: the means,
    a ``/``, the standard deviations; either side may be a single value) and
    ``ct-window:LEVEL,WIDTH``. The kind is case-insensitive; spaces are ignored.
    """
    text = spec.strip()
    if not text:
        raise NormalizationError(f"the normalization is empty; use one of {NORMALIZATION_FORMS}")
    kind, colon, argument = text.partition(":")
    kind = kind.strip().lower()
    if kind in _PLAIN_KINDS:
        if colon:
            raise NormalizationError(f"{kind} takes no values: write just {kind!r}")
        return Normalization(kind=kind)
    if kind in ("mean-std", "ct-window"):
        if not argument.strip():
            form = "mean-std:M,S" if kind == "mean-std" else "ct-window:LEVEL,WIDTH"
            raise NormalizationError(f"{kind} needs its numbers: write {form}")
        return _parse_mean_std(argument) if kind == "mean-std" else _parse_ct_window(argument)
    raise NormalizationError(f"unknown normalization {kind!r}; use one of {NORMALIZATION_FORMS}")


def check_normalization(spec: str, *, channels: int | None = None) -> str:
    """The canonical text of ``spec`` (blank stays blank: the format's default), checked
    against the number of channels when it is known."""
    if not spec.strip():
        return ""
    parsed = parse_normalization(spec)
    if channels is not None:
        parsed.check_channels(channels)
    return parsed.spec


def normalize_intensity(
    array: npt.NDArray[np.floating], spec: str | Normalization
) -> npt.NDArray[np.float32]:
    """Normalise one image (channels first when the spec has per-channel values)."""
    normalization = parse_normalization(spec) if isinstance(spec, str) else spec
    return normalization(array)


def resample(
    image: ImageArray,
    *,
    size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    interpolator: str = "linear",
) -> ImageArray:
    """Resample to a target grid.

    ``size`` alone stretches the whole field of view onto ``size`` pixels. ``spacing``
    alone keeps the field of view at the new spacing. Both together give a grid of that
    size and spacing centred on the image, cropping or padding (with the image minimum).
    """
    dims = image.spatial_dims
    if interpolator not in _INTERPOLATORS:
        raise ValueError(f"unknown interpolator {interpolator!r}; expected {list(_INTERPOLATORS)}")
    if size is not None and (len(size) != dims or min(size) < 1):
        raise ValueError(f"size must be {dims} positive integers, got {tuple(size)}")
    if spacing is not None and (len(spacing) != dims or min(spacing) <= 0):
        raise ValueError(f"spacing must be {dims} positive numbers, got {tuple(spacing)}")

    old_size = np.array(image.array.shape[:dims][::-1], dtype=np.float64)
    old_spacing = np.array(image.spacing)
    direction = np.array(image.direction).reshape(dims, dims)
    origin = np.array(image.origin)
    if spacing is not None:
        new_spacing = np.array(spacing, dtype=np.float64)
        if size is None:
            new_size = np.maximum(np.round(old_size * old_spacing / new_spacing), 1)
        else:
            new_size = np.array(size, dtype=np.float64)
        centre = origin + direction @ (old_spacing * (old_size - 1) / 2)
        new_origin = centre - direction @ (new_spacing * (new_size - 1) / 2)
    elif size is not None:
        new_size = np.array(size, dtype=np.float64)
        new_spacing = old_spacing * old_size / new_size
        # Keep the outer edge of the field of view where it was.
        new_origin = origin + direction @ ((new_spacing - old_spacing) / 2)
    else:
        raise ValueError("resample needs a target size, a target spacing, or both")

    source = image_to_sitk(image)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in new_size])
    resampler.SetOutputSpacing(new_spacing.tolist())
    resampler.SetOutputOrigin(new_origin.tolist())
    resampler.SetOutputDirection(image.direction)
    resampler.SetInterpolator(_INTERPOLATORS[interpolator])
    resampler.SetDefaultPixelValue(float(image.array.min()) if image.array.size else 0.0)
    return image_from_sitk(resampler.Execute(source))


def to_channels(image: ImageArray, channels: int | None = None) -> npt.NDArray[np.float32]:
    """Channels-first float32 array with ``channels`` (1 or 3) channels.

    ``None`` keeps the native count: 1 for grey images, 3 for RGB. Alpha is dropped, grey
    is repeated to make RGB and RGB is collapsed to grey with luma weights.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels}")
    pixels = image.array
    if image.array.ndim == image.spatial_dims:
        grey = pixels[np.newaxis]
    elif image.channels in (1, 2):  # grey, or grey + alpha
        grey = np.moveaxis(pixels[..., :1], -1, 0)
    elif image.channels in (3, 4):  # RGB, or RGBA
        rgb = np.moveaxis(pixels[..., :3], -1, 0)
        if channels == 1:
            return np.tensordot(LUMA_WEIGHTS, rgb, axes=1)[np.newaxis].astype(np.float32)
        return np.ascontiguousarray(rgb, dtype=np.float32)
    else:
        raise ValueError(f"cannot convert a {image.channels}-component image to channels")
    if channels == 3:
        return np.repeat(grey, 3, axis=0).astype(np.float32, copy=False)
    return np.ascontiguousarray(grey, dtype=np.float32)


@dataclass(frozen=True, kw_only=True)
class Preprocessor:
    """Resample, convert channels and normalise an image into a float32 tensor.

    Leave ``size`` and ``spacing`` unset to keep the image grid (all images of a dataset
    must then share one size to be batched). ``normalization`` is a spec for
    :func:`parse_normalization`; blank means the format's default (for image folders,
    ``zscore``; :class:`~training.fl.data.datasets.NpzDataset` has its own).
    """

    size: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    normalization: str = ""
    channels: int | None = None
    _normalization: Normalization = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parsed = parse_normalization(self.normalization or DEFAULT_FOLDER_NORMALIZATION)
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or None, got {self.channels}")
        if self.channels is not None:
            parsed.check_channels(self.channels)
        object.__setattr__(self, "_normalization", parsed)
        for name, values in (("size", self.size), ("spacing", self.spacing)):
            if values is not None and (len(values) not in (2, 3) or min(values) <= 0):
                raise ValueError(f"{name} must be 2 or 3 positive values, got {values}")

    @property
    def normalization_spec(self) -> str:
        """The normalization applied, with the default filled in."""
        return self._normalization.spec

    def __call__(self, image: ImageArray) -> torch.Tensor:
        # Imported here: the registry's users in web processes validate normalizations only.
        import torch

        return torch.from_numpy(self.array(image))

    def array(self, image: ImageArray) -> npt.NDArray[np.float32]:
        """The network input as a float32 array, channels first (what ``self(image)`` wraps)."""
        if self.size is not None or self.spacing is not None:
            image = resample(image, size=self.size, spacing=self.spacing)
        array = self._normalization(to_channels(image, self.channels))
        return np.ascontiguousarray(array, dtype=np.float32)
