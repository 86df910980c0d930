"""Per-image and per-site measurements of a dataset's images, without Django.

The server's image viewer compares sites with these numbers, and a site agent computes
the same ones next to its data and declares them with its dataset, so the two agree.
Means and variances combine exactly over images (each image's count, mean and sum of
squared deviations); histograms use a random sample of each image's pixels. With masks
(segmentation), each class's volume is counted in voxels and in mm³ (voxels times the
voxel's volume from the mask's spacing).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from training.fl.data.readers import ImageArray

__all__ = ["PIXELS_PER_IMAGE", "ImageMeasurement", "SiteSummary", "measure_image", "summarise_site"]

# Pixels drawn from each sampled image for the histograms and the dataset-wide range.
PIXELS_PER_IMAGE = 4096


@dataclass(frozen=True)
class ImageMeasurement:
    shape: tuple[int, ...]  # array order: (slices,) rows, columns
    spacing: tuple[float, ...]  # same order as shape, in mm
    count: int  # finite intensities
    mean: float
    sum_squared_deviations: float
    pixel_sample: npt.NDArray[np.float64]
    # Voxels of each class in the mask, label 0 first; empty without a mask.
    class_voxels: tuple[int, ...] = ()
    voxel_mm3: float = 0.0  # one voxel's volume (area in mm² for 2D images)


def measure_image(
    image: ImageArray,
    rng: np.random.Generator,
    mask: ImageArray | None = None,
    num_classes: int = 0,
) -> ImageMeasurement:
    """``mask`` (its label per voxel) adds each of ``num_classes`` classes' volume."""
    class_voxels: tuple[int, ...] = ()
    voxel_mm3 = 0.0
    if mask is not None:
        labels = np.rint(mask.array).astype(np.int64).reshape(-1)
        counts = np.bincount(labels[labels >= 0], minlength=num_classes)
        class_voxels = tuple(int(n) for n in counts)
        voxel_mm3 = float(np.prod(mask.spacing))
    values = image.array.reshape(-1).astype(np.float64)
    values = values[np.isfinite(values)]
    count = int(values.size)
    mean = float(values.mean()) if count else 0.0
    sample = values[rng.integers(0, count, min(count, PIXELS_PER_IMAGE))] if count else values
    return ImageMeasurement(
        shape=tuple(int(n) for n in image.array.shape[: image.spatial_dims]),
        spacing=tuple(float(f"{step:.4g}") for step in reversed(image.spacing)),
        count=count,
        mean=mean,
        sum_squared_deviations=float(((values - mean) ** 2).sum()) if count else 0.0,
        pixel_sample=sample,
        class_voxels=class_voxels,
        voxel_mm3=voxel_mm3,
    )


def _empty_sample() -> npt.NDArray[np.float64]:
    return np.empty(0)


@dataclass
class SiteSummary:
    site: str
    class_counts: list[int]
    num_sampled: int = 0
    num_unreadable: int = 0
    first_error: str = ""
    pixel_count: int = 0
    mean: float = 0.0
    variance: float = 0.0
    shapes: Counter[tuple[int, ...]] = field(default_factory=Counter)
    spacings: Counter[tuple[float, ...]] = field(default_factory=Counter)
    pixel_sample: npt.NDArray[np.float64] = field(default_factory=_empty_sample)
    # Segmentation: each class's voxels and mm³ over the measured masks, label 0 first.
    class_voxels: list[int] = field(default_factory=list)
    class_mm3: list[float] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(self.class_counts)

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)


def summarise_site(
    site: str, class_counts: list[int], measurements: Sequence[ImageMeasurement]
) -> SiteSummary:
    """Combine per-image measurements: exact mean and variance over all their pixels."""
    summary = SiteSummary(site=site, class_counts=class_counts, num_sampled=len(measurements))
    counted = [m for m in measurements if m.count]
    total = sum(m.count for m in counted)
    if total:
        mean = sum(m.mean * m.count for m in counted) / total
        # Within-image spread plus the spread of the image means around the site's mean.
        squares = sum(m.sum_squared_deviations + m.count * (m.mean - mean) ** 2 for m in counted)
        summary.pixel_count, summary.mean, summary.variance = total, mean, squares / total
        summary.pixel_sample = np.concatenate([m.pixel_sample for m in counted])
    summary.shapes.update(m.shape for m in measurements)
    masked = [m for m in measurements if m.class_voxels]
    if masked:
        width = max(len(m.class_voxels) for m in masked)
        voxels = np.zeros(width, dtype=np.int64)
        volume = np.zeros(width, dtype=np.float64)
        for m in masked:
            counts = np.asarray(m.class_voxels, dtype=np.int64)
            voxels[: counts.size] += counts
            volume[: counts.size] += counts * m.voxel_mm3
        summary.class_voxels = voxels.tolist()
        summary.class_mm3 = volume.tolist()
    summary.spacings.update(m.spacing for m in measurements)
    return summary
