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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
import torch

from training.fl.data.readers import ImageArray, image_from_sitk, image_to_sitk

__all__ = ["NORMALIZATIONS", "Preprocessor", "normalize_intensity", "resample", "to_channels"]

NORMALIZATIONS = ("none", "zscore", "minmax", "ct-window")

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}

# ITU-R BT.601 luma weights, for collapsing RGB to one channel.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def normalize_intensity(
    array: npt.NDArray[np.float32],
    method: str,
    *,
    window_center: float | None = None,
    window_width: float | None = None,
) -> npt.NDArray[np.float32]:
    """Normalise intensities over the whole array.

    ``zscore``: zero mean, unit variance. ``minmax``: scaled to [0, 1]. ``ct-window``:
    clipped to ``window_center +/- window_width / 2`` and scaled to [0, 1]. A constant
    image becomes all zeros rather than dividing by zero.
    """
    values = array.astype(np.float32, copy=False)
    if method == "none":
        return values
    if method == "zscore":
        std = float(values.std())
        centred = values - np.float32(values.mean())
        return centred / np.float32(std) if std > 0 else np.zeros_like(values)
    if method == "minmax":
        low, high = float(values.min()), float(values.max())
        if high <= low:
            return np.zeros_like(values)
        return (values - np.float32(low)) / np.float32(high - low)
    if method == "ct-window":
        if window_center is None or window_width is None or window_width <= 0:
            raise ValueError("ct-window needs window_center and a positive window_width")
        low = window_center - window_width / 2
        clipped = np.clip(values, low, low + window_width)
        return ((clipped - np.float32(low)) / np.float32(window_width)).astype(np.float32)
    raise ValueError(f"unknown normalization {method!r}; expected one of {NORMALIZATIONS}")


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
            return np.tensordot(_LUMA, rgb, axes=1)[np.newaxis].astype(np.float32)
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
    must then share one size to be batched).
    """

    size: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    normalization: str = "zscore"
    window_center: float | None = None
    window_width: float | None = None
    channels: int | None = None

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalization {self.normalization!r}; expected one of {NORMALIZATIONS}"
            )
        if self.normalization == "ct-window" and (
            self.window_center is None or self.window_width is None or self.window_width <= 0
        ):
            raise ValueError("ct-window needs window_center and a positive window_width")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or None, got {self.channels}")
        for name, values in (("size", self.size), ("spacing", self.spacing)):
            if values is not None and (len(values) not in (2, 3) or min(values) <= 0):
                raise ValueError(f"{name} must be 2 or 3 positive values, got {values}")

    def __call__(self, image: ImageArray) -> torch.Tensor:
        if self.size is not None or self.spacing is not None:
            image = resample(image, size=self.size, spacing=self.spacing)
        array = normalize_intensity(
            to_channels(image, self.channels),
            self.normalization,
            window_center=self.window_center,
            window_width=self.window_width,
        )
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
