"""A synthetic multi-site lesion-classification dataset, for demos and tests.

Each image is a 2D NIfTI slice of textured "tissue" with acquisition noise; positive
images (label 1) contain one round lesion of varying size and contrast. Every site has
its own scanner: intensity scale and offset, noise level, pixel spacing (so a lesion of
a given size in millimetres covers a different number of pixels) and prevalence. Layout::

    out_dir/labels.csv              path,label,site
    out_dir/site-1/img-0001.nii.gz
    ...
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from training.fl.data.datasets import LABELS_FILE
from training.fl.data.readers import ImageArray, write_image

__all__ = ["generate_synthetic_dataset"]

_TISSUE_MEAN = 100.0
_TISSUE_TEXTURE_STD = 10.0
_TEXTURE_SIGMA_PX = 4.0


@dataclass(frozen=True, kw_only=True)
class _Scanner:
    intensity_scale: float
    intensity_offset: float
    noise_std: float
    spacing_mm: float
    prevalence: float


def _draw_scanners(rng: np.random.Generator, count: int) -> list[_Scanner]:
    """Scanner settings spread evenly over their ranges and shuffled, so that any two
    sites differ in gain, noise and spacing rather than only by chance."""

    def spread(low: float, high: float) -> list[float]:
        jitter = rng.uniform(-0.02, 0.02, count) * (high - low)
        return [float(v) for v in rng.permutation(np.linspace(low, high, count)) + jitter]

    settings = zip(
        spread(0.7, 1.4),  # intensity scale
        spread(3.0, 10.0),  # noise standard deviation
        spread(0.6, 1.2),  # pixel spacing in mm
        strict=True,
    )
    return [
        _Scanner(
            intensity_scale=scale,
            intensity_offset=float(rng.uniform(-5.0, 5.0)),
            noise_std=noise,
            spacing_mm=spacing,
            prevalence=float(rng.uniform(0.4, 0.6)),
        )
        for scale, noise, spacing in settings
    ]


def _smooth_noise(rng: np.random.Generator, count: int, size: int) -> npt.NDArray[np.float64]:
    """Gaussian-filtered white noise with unit standard deviation per image (via FFT)."""
    frequencies = np.fft.fftfreq(size)
    squared = frequencies[:, None] ** 2 + frequencies[None, :] ** 2
    transfer = np.exp(-2 * (np.pi * _TEXTURE_SIGMA_PX) ** 2 * squared)
    noise = rng.standard_normal((count, size, size))
    smooth = np.fft.ifft2(np.fft.fft2(noise) * transfer).real
    smooth -= smooth.mean(axis=(1, 2), keepdims=True)
    normalised: npt.NDArray[np.float64] = smooth / smooth.std(axis=(1, 2), keepdims=True)
    return normalised


def _add_lesion(
    image: npt.NDArray[np.float64], rng: np.random.Generator, spacing_mm: float
) -> None:
    size = image.shape[0]
    radius_px = rng.uniform(3.0, 7.0) / spacing_mm
    margin = radius_px + 2
    centre_y, centre_x = rng.uniform(margin, size - margin, 2)
    yy, xx = np.mgrid[0:size, 0:size]
    distance = np.hypot(yy - centre_y, xx - centre_x)
    # A soft-edged bright disc 3.5-6 texture standard deviations above the tissue: clearly
    # visible, though small faint ones are easy to mistake for texture.
    contrast = rng.uniform(3.5, 6.0) * _TISSUE_TEXTURE_STD
    image += contrast / (1 + np.exp((distance - radius_px) / 0.7))


def generate_synthetic_dataset(
    out_dir: str | os.PathLike[str],
    *,
    sites: int = 4,
    per_site: int = 300,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write the dataset under ``out_dir`` and return that folder; same seed, same files."""
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    if per_site < 2:
        raise ValueError(f"per_site must be >= 2, got {per_site}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels to fit the largest lesion, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, int, str]] = []
    scanner_seed, *site_seeds = np.random.SeedSequence(seed).spawn(sites + 1)
    scanners = _draw_scanners(np.random.default_rng(scanner_seed), sites)
    for site_index, (scanner, site_seed) in enumerate(zip(scanners, site_seeds, strict=True), 1):
        rng = np.random.default_rng(site_seed)
        site = f"site-{site_index}"
        positives = min(max(round(scanner.prevalence * per_site), 1), per_site - 1)
        labels = rng.permutation(np.arange(per_site) < positives).astype(int)
        images = _TISSUE_MEAN + _TISSUE_TEXTURE_STD * _smooth_noise(rng, per_site, size)
        for number, (image, label) in enumerate(zip(images, labels, strict=True), start=1):
            if label:
                _add_lesion(image, rng, scanner.spacing_mm)
            image += rng.normal(0.0, scanner.noise_std, image.shape)
            pixels = image * scanner.intensity_scale + scanner.intensity_offset
            relative = f"{site}/img-{number:04d}.nii.gz"
            write_image(
                ImageArray(
                    array=pixels.astype(np.float32),
                    spacing=(scanner.spacing_mm, scanner.spacing_mm),
                    origin=(0.0, 0.0),
                    direction=(1.0, 0.0, 0.0, 1.0),
                ),
                out / relative,
            )
            rows.append((relative, int(label), site))
    with (out / LABELS_FILE).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("path", "label", "site"))
        writer.writerows(rows)
    return out
