"""One medical image turned into an 8-bit PNG for the screen: slice, window/level, aspect.

Pure functions on an `ImageArray` holding the raw intensities read from the file (never the
normalised training tensor); nothing here knows about Django. As in SimpleITK, array axes
are ((z,) y, x) with an optional trailing component axis, while `spacing` is (x, y(, z)).
Direction cosines are not applied: images are shown in their index grid, which is how they
are stored and how the network sees them.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

from training.fl.data.readers import ImageArray

__all__ = [
    "DEFAULT_PRESET",
    "FIXED_WINDOWS",
    "MAX_OUTPUT_SIDE",
    "PERCENTILE_WINDOWS",
    "PLANES",
    "PRESETS",
    "PRESET_LABELS",
    "DisplaySlice",
    "RenderError",
    "Window",
    "check_preset",
    "describe_image",
    "display_size",
    "extract_slice",
    "presets_for_modality",
    "render_png",
    "resolve_window",
    "slice_count",
    "to_grey_levels",
]

PLANES = ("axial", "coronal", "sagittal")
MAX_OUTPUT_SIDE = 512
MIN_OUTPUT_SIDE = 16

# Hounsfield windows as (width, level): the usual radiology reading settings.
FIXED_WINDOWS: dict[str, tuple[float, float]] = {
    "ct-lung": (1500.0, -600.0),
    "ct-soft-tissue": (400.0, 40.0),
    "ct-bone": (1800.0, 400.0),
}
# Windows taken from the image itself, as (low, high) percentiles of its intensities.
PERCENTILE_WINDOWS: dict[str, tuple[float, float]] = {
    "mr-auto": (1.0, 99.0),
    "auto": (0.0, 100.0),
}
PRESETS: tuple[str, ...] = (*FIXED_WINDOWS, *PERCENTILE_WINDOWS)
PRESET_LABELS = {
    "ct-lung": "CT lung",
    "ct-soft-tissue": "CT soft tissue",
    "ct-bone": "CT bone",
    "mr-auto": "MR auto",
    "auto": "Full range",
}
DEFAULT_PRESET = "auto"
# Hounsfield windows mean nothing for MR or X-ray intensities: each modality is offered the
# presets that fit it, its first one chosen when the viewer opens.
_PRESETS_BY_MODALITY: dict[str, tuple[str, ...]] = {
    "CT": ("ct-soft-tissue", "ct-lung", "ct-bone", "auto"),
    "MR": ("mr-auto", "auto"),
}


def presets_for_modality(modality: str) -> tuple[str, ...]:
    """The presets that fit a dataset of ``modality`` (a Modality code), default first."""
    return _PRESETS_BY_MODALITY.get(modality, ("auto", "mr-auto"))


# Percentiles of huge volumes are estimated from an evenly strided subset of this many voxels.
_PERCENTILE_SAMPLE = 2_000_000


class RenderError(ValueError):
    """A rendering request that cannot be honoured; the message says what to change."""


@dataclass(frozen=True)
class Window:
    """Intensities from `level - width / 2` (black) to `level + width / 2` (white)."""

    width: float
    level: float

    @property
    def low(self) -> float:
        return self.level - self.width / 2

    @property
    def high(self) -> float:
        return self.level + self.width / 2


@dataclass(frozen=True)
class DisplaySlice:
    """A 2D cut through an image, top row first, with the physical size of its pixels."""

    pixels: npt.NDArray[np.float32]  # (rows, columns) or (rows, columns, components)
    row_spacing: float
    column_spacing: float


def _percentiles(array: npt.NDArray[np.float32], percents: tuple[float, ...]) -> list[float]:
    """Percentiles of the finite intensities (0 and 100 exact, others from a sample);
    an image with no finite value gives zeros."""
    values = array.reshape(-1)
    finite = np.isfinite(values)
    if not finite.all():
        values = values[finite]
    if values.size == 0:
        return [0.0 for _ in percents]
    sample = values[:: math.ceil(values.size / _PERCENTILE_SAMPLE)]
    results = []
    for percent in percents:
        if percent <= 0:
            results.append(float(values.min()))
        elif percent >= 100:
            results.append(float(values.max()))
        else:
            results.append(float(np.percentile(sample, percent)))
    return results


def check_preset(name: str) -> str:
    if name not in PRESETS:
        raise RenderError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    return name


def resolve_window(
    image: ImageArray,
    *,
    preset: str | None = None,
    window: float | None = None,
    level: float | None = None,
) -> Window:
    """The window to show `image` with: a preset, or an explicit width and level.

    With neither, the `DEFAULT_PRESET` applies. Percentile presets look at the whole image
    (every slice), so that scrolling through a volume keeps one grey scale.
    """
    if preset is not None and (window is not None or level is not None):
        raise RenderError("Give either a preset or window and level, not both.")
    if (window is None) != (level is None):
        raise RenderError("Give both window and level (e.g. window=400&level=40), or neither.")
    if window is not None and level is not None:
        if not (math.isfinite(window) and math.isfinite(level)):
            raise RenderError("window and level must be finite numbers.")
        if window <= 0:
            raise RenderError(f"window must be a positive width, got {window:g}.")
        return Window(width=window, level=level)
    name = DEFAULT_PRESET if preset is None else check_preset(preset)
    if name in FIXED_WINDOWS:
        width, centre = FIXED_WINDOWS[name]
        return Window(width=width, level=centre)
    low, high = _percentiles(image.array, PERCENTILE_WINDOWS[name])
    if high <= low:
        # A constant image: centre its one value so that it shows as mid grey.
        return Window(width=1.0, level=low)
    return Window(width=high - low, level=(low + high) / 2)


def slice_count(image: ImageArray, plane: str = "axial") -> int:
    """How many slices `plane` cuts a volume into; a 2D image is its own single slice."""
    if plane not in PLANES:
        raise RenderError(f"Unknown plane {plane!r}; choose one of: {', '.join(PLANES)}.")
    if image.spatial_dims == 2:
        return 1
    depth, rows, columns = image.array.shape[:3]
    return {"axial": depth, "coronal": rows, "sagittal": columns}[plane]


def extract_slice(
    image: ImageArray, *, plane: str = "axial", index: int | None = None
) -> DisplaySlice:
    """The slice `index` of `plane` (the middle one by default).

    Coronal and sagittal slices are flipped upside down so that the last axial slice,
    superior in the usual patient orientation, is at the top.
    """
    count = slice_count(image, plane)
    if image.spatial_dims == 2:
        if plane != "axial":
            raise RenderError("This image is 2D: only its own (axial) plane can be shown.")
        if index not in (None, 0):
            raise RenderError("This image is 2D and has a single slice: give slice=0 or none.")
        column_spacing, row_spacing = image.spacing
        return DisplaySlice(image.array, row_spacing, column_spacing)
    if index is None:
        index = count // 2
    if not 0 <= index < count:
        raise RenderError(
            f"slice {index} is out of range: this volume has {count} {plane} slices, "
            f"so give a slice from 0 to {count - 1}."
        )
    x_spacing, y_spacing, z_spacing = image.spacing
    if plane == "axial":
        return DisplaySlice(image.array[index], y_spacing, x_spacing)
    if plane == "coronal":
        return DisplaySlice(image.array[::-1, index], z_spacing, x_spacing)
    return DisplaySlice(image.array[::-1, :, index], z_spacing, y_spacing)


def to_grey_levels(pixels: npt.NDArray[np.float32], window: Window) -> npt.NDArray[np.uint8]:
    """Map intensities to 0-255 through `window`: below it black, above it white.

    Multi-component pixels keep their first three components (RGB, alpha dropped), or
    their first one when there are fewer than three (grey + alpha).
    """
    if pixels.ndim == 3:
        pixels = pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., 0]
    scaled = (pixels.astype(np.float64) - window.low) / window.width
    levels = np.rint(np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 1.0) * 255)
    return levels.astype(np.uint8)


def display_size(
    rows: int,
    columns: int,
    *,
    row_spacing: float,
    column_spacing: float,
    max_side: int = MAX_OUTPUT_SIDE,
) -> tuple[int, int]:
    """(width, height) in screen pixels that keep the physical aspect of the slice.

    Square screen pixels take the finer of the two spacings, so no detail is lost along
    that axis, and the result is then shrunk to fit `max_side`.
    """
    if not (row_spacing > 0 and math.isfinite(row_spacing)):
        row_spacing = 1.0
    if not (column_spacing > 0 and math.isfinite(column_spacing)):
        column_spacing = 1.0
    pixel = min(row_spacing, column_spacing)
    width = columns * column_spacing / pixel
    height = rows * row_spacing / pixel
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def render_png(
    image: ImageArray,
    *,
    plane: str = "axial",
    slice_index: int | None = None,
    preset: str | None = None,
    window: float | None = None,
    level: float | None = None,
    max_side: int = MAX_OUTPUT_SIDE,
) -> tuple[bytes, Window]:
    """PNG bytes of one slice of `image` (grey, or RGB for colour images), and the window
    that was applied; raises `RenderError` for parameters that do not fit the image."""
    if not MIN_OUTPUT_SIDE <= max_side <= MAX_OUTPUT_SIDE:
        raise RenderError(
            f"size must be from {MIN_OUTPUT_SIDE} to {MAX_OUTPUT_SIDE} pixels, got {max_side}."
        )
    cut = extract_slice(image, plane=plane, index=slice_index)
    applied = resolve_window(image, preset=preset, window=window, level=level)
    levels = to_grey_levels(cut.pixels, applied)
    rows, columns = levels.shape[:2]
    size = display_size(
        rows,
        columns,
        row_spacing=cut.row_spacing,
        column_spacing=cut.column_spacing,
        max_side=max_side,
    )
    # uint8 (rows, columns) becomes an "L" picture, (rows, columns, 3) an "RGB" one.
    picture = Image.fromarray(np.ascontiguousarray(levels))
    if picture.size != size:
        # Pillow's filters widen with the scale factor, so shrinking does not alias.
        picture = picture.resize(size, Image.Resampling.BILINEAR)
    output = io.BytesIO()
    picture.save(output, format="PNG")
    return output.getvalue(), applied


def describe_image(image: ImageArray) -> dict[str, object]:
    """Geometry and intensities of `image`, with shape and spacing both in array order:
    (slices,) rows, columns -- the order the ledger's `image_shape` uses."""
    dims = image.spatial_dims
    low, p1, p99, high = _percentiles(image.array, (0, 1, 99, 100))
    return {
        "shape": [int(n) for n in image.array.shape[:dims]],
        "channels": image.channels,
        "spacing": [float(step) for step in reversed(image.spacing)],
        "num_slices": slice_count(image),
        "slices_per_plane": (
            {plane: slice_count(image, plane) for plane in PLANES} if dims == 3 else {"axial": 1}
        ),
        "intensity": {"min": low, "max": high, "p1": p1, "p99": p99},
    }
