"""Synthetic multi-site datasets, for demos and tests: 2D lesion classification, organ
and lesion segmentation (2D or 3D, Decathlon layout) and 3D lesion classification.

The 2D classification set (generate_synthetic_dataset):
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
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from training.fl.data.datasets import LABELS_FILE
from training.fl.data.readers import ImageArray, write_image

__all__ = [
    "SEGMENTATION_CLASSES",
    "generate_segmentation_dataset",
    "generate_synthetic_dataset",
    "generate_volume_classification_dataset",
]

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


# --- Anatomy: a body, an organ and lesions, for segmentation and 3D classification -------
#
# The anatomy is drawn in millimetres around the origin and sampled on each site's voxel
# grid, so a scanner with coarser spacing or thicker slices covers the same organ with
# fewer voxels, as in real multi-site data. A field of view of fixed size in millimetres
# is divided into the requested number of voxels: a larger grid means finer sampling of
# the same anatomy, not a smaller body.

SEGMENTATION_CLASSES = ("background", "organ", "lesion")
_FIELD_OF_VIEW_MM = (72.0, 72.0, 96.0)  # x, y, z for the reference scanner
_BODY_RADII_MM = (26.0, 20.0)  # x, y; the body runs through every slice
_ORGAN_RADII_MM = ((11.0, 15.0), (9.0, 12.0), (16.0, 24.0))  # ranges for x, y, z
_ORGAN_SHIFT_MM = (4.0, 3.0, 5.0)
_LESION_RADIUS_MM = (4.0, 7.0)
_BODY_INTENSITY, _ORGAN_INTENSITY = 60.0, 110.0
_LESION_CONTRAST = (35.0, 60.0)
_ANATOMY_TEXTURE_STD = 5.0


@dataclass(frozen=True, kw_only=True)
class _VolumeScanner:
    intensity_scale: float
    intensity_offset: float
    noise_std: float
    # Physical axis order (x, y[, z]), as SimpleITK and NIfTI headers store it.
    spacing_mm: tuple[float, ...]
    # Coefficients of the smooth multiplicative bias field: exp(sum(c * term)).
    bias_coefficients: tuple[float, ...]


def _bias_terms(unit_grid: list[npt.NDArray[np.float64]]) -> list[npt.NDArray[np.float64]]:
    """Linear and quadratic terms over coordinates scaled to [-1, 1]: smooth enough to be
    a coil's sensitivity profile, different enough per site to need normalization."""
    terms = list(unit_grid)
    terms += [axis**2 - 1 / 3 for axis in unit_grid]
    terms += [a * b for i, a in enumerate(unit_grid) for b in unit_grid[i + 1 :]]
    return terms


def _bias_term_count(dims: int) -> int:
    return 2 * dims + dims * (dims - 1) // 2


def _draw_volume_scanners(
    rng: np.random.Generator, count: int, *, dims: int, size: int, depth: int
) -> list[_VolumeScanner]:
    """As _draw_scanners: evenly spread, shuffled settings so that sites surely differ;
    slice thickness (z spacing) varies more between sites than in-plane spacing."""

    def spread(low: float, high: float) -> npt.NDArray[np.float64]:
        jitter = rng.uniform(-0.02, 0.02, count) * (high - low)
        return rng.permutation(np.linspace(low, high, count)) + jitter

    scales, noises = spread(0.7, 1.4), spread(2.0, 8.0)
    in_plane, through_plane = spread(0.85, 1.15), spread(0.7, 1.4)
    bias_strengths = spread(0.1, 0.35)
    grid = (size, size, depth)[:dims]
    scanners = []
    for site in range(count):
        factors = (in_plane[site], in_plane[site], through_plane[site])[:dims]
        spacing = tuple(
            round(float(fov / voxels * factor), 4)
            for fov, voxels, factor in zip(_FIELD_OF_VIEW_MM, grid, factors, strict=False)
        )
        direction = rng.normal(size=_bias_term_count(dims))
        coefficients = bias_strengths[site] * direction / np.linalg.norm(direction)
        scanners.append(
            _VolumeScanner(
                intensity_scale=float(scales[site]),
                intensity_offset=float(rng.uniform(-10.0, 10.0)),
                noise_std=float(noises[site]),
                spacing_mm=spacing,
                bias_coefficients=tuple(float(c) for c in coefficients),
            )
        )
    return scanners


def _physical_grid(
    shape: tuple[int, ...], spacing_mm: tuple[float, ...]
) -> list[npt.NDArray[np.float64]]:
    """Millimetre coordinates of every voxel centre, in physical order (x, y[, z]), with
    the grid centred on the origin; each array has the image's shape ((z,) y, x)."""
    array_axes = np.meshgrid(
        *[
            (np.arange(voxels) - (voxels - 1) / 2) * spacing
            for voxels, spacing in zip(shape, reversed(spacing_mm), strict=True)
        ],
        indexing="ij",
    )
    return list(reversed(array_axes))


def _ellipsoid_radius(
    grid: list[npt.NDArray[np.float64]], centre: Sequence[float], radii: Sequence[float]
) -> npt.NDArray[np.float64]:
    """Normalised distance from ``centre``: below 1 inside the ellipsoid."""
    squared = sum(((axis - c) / r) ** 2 for axis, c, r in zip(grid, centre, radii, strict=True))
    return np.sqrt(np.asarray(squared, dtype=np.float64))


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], sigma_voxels: float | Sequence[float]
) -> npt.NDArray[np.float64]:
    """Smoothed white noise with unit standard deviation; ``sigma_voxels`` per array axis
    or one for all."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_voxels, mode="wrap")
    smooth: npt.NDArray[np.float64] = field / max(float(field.std()), 1e-12)
    return smooth


def _draw_case(
    rng: np.random.Generator,
    scanner: _VolumeScanner,
    shape: tuple[int, ...],
    *,
    lesions: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """One acquisition: the image as the scanner records it and its label map."""
    dims = len(shape)
    grid = _physical_grid(shape, scanner.spacing_mm)
    body_radii = [r * rng.uniform(0.95, 1.05) for r in _BODY_RADII_MM]
    body = _ellipsoid_radius(grid[:2], (0.0, 0.0), body_radii) < 1
    # Sigma of ~4 mm in-plane: lobes on the organ's outline, not ragged edges.
    sigma = [4.0 / spacing for spacing in reversed(scanner.spacing_mm)]
    organ_centre = [rng.uniform(-shift, shift) for shift in _ORGAN_SHIFT_MM[:dims]]
    organ_radii = [rng.uniform(low, high) for low, high in _ORGAN_RADII_MM[:dims]]
    outline = 1 + 0.15 * np.clip(_smooth_field(rng, shape, sigma), -2, 2)
    organ = (_ellipsoid_radius(grid, organ_centre, organ_radii) < outline) & body
    labels = organ.astype(np.uint8)
    image = np.where(body, _BODY_INTENSITY, 0.0) + np.where(organ, _ORGAN_INTENSITY - 60, 0.0)
    for _ in range(lesions):
        # Centred well inside the organ (whose outline never dips below 0.7 of its radii),
        # so the lesion is mostly surrounded by organ.
        offset = rng.normal(size=dims)
        offset *= rng.uniform(0.0, 0.4) / np.linalg.norm(offset)
        centre = [c + r * o for c, r, o in zip(organ_centre, organ_radii, offset, strict=True)]
        radius = rng.uniform(*_LESION_RADIUS_MM)
        lesion = (_ellipsoid_radius(grid, centre, [radius] * dims) < 1) & organ
        labels[lesion] = SEGMENTATION_CLASSES.index("lesion")
        image[lesion] = _ORGAN_INTENSITY + rng.uniform(*_LESION_CONTRAST)
    image += _ANATOMY_TEXTURE_STD * _smooth_field(rng, shape, 1.5) * body
    # Partial-volume blur of about one voxel, so edges are not perfectly sharp.
    image = ndimage.gaussian_filter(image, 0.6)
    extent = [axis / (0.5 * fov) for axis, fov in zip(grid, _FIELD_OF_VIEW_MM, strict=False)]
    terms = _bias_terms(extent)
    bias = np.exp(sum(c * t for c, t in zip(scanner.bias_coefficients, terms, strict=True)))
    image = image * bias + rng.normal(0.0, scanner.noise_std, shape)
    recorded = image * scanner.intensity_scale + scanner.intensity_offset
    return recorded.astype(np.float32), labels


def _geometry(
    shape: tuple[int, ...], spacing_mm: tuple[float, ...]
) -> dict[str, tuple[float, ...]]:
    """Spacing, origin and identity direction that put the grid's centre at the origin."""
    dims = len(shape)
    voxels = tuple(reversed(shape))  # physical order
    origin = tuple(-(n - 1) / 2 * s for n, s in zip(voxels, spacing_mm, strict=True))
    return {
        "spacing": spacing_mm,
        "origin": origin,
        "direction": tuple(float(v) for v in np.eye(dims).ravel()),
    }


def _check_anatomy_options(sites: int, per_site: int, size: int, depth: int, seed: int) -> None:
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    if per_site < 2:
        raise ValueError(f"per_site must be >= 2, got {per_site}")
    # Below these the organ's lesions shrink to a voxel or two.
    if size < 32:
        raise ValueError(f"size must be >= 32 voxels, got {size}")
    if depth < 16:
        raise ValueError(f"depth must be >= 16 slices, got {depth}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _site_generators(
    seed: int, sites: int, *, dims: int, size: int, depth: int
) -> list[tuple[str, _VolumeScanner, np.random.Generator]]:
    scanner_seed, *site_seeds = np.random.SeedSequence(seed).spawn(sites + 1)
    scanners = _draw_volume_scanners(
        np.random.default_rng(scanner_seed), sites, dims=dims, size=size, depth=depth
    )
    return [
        (f"site-{number}", scanner, np.random.default_rng(site_seed))
        for number, (scanner, site_seed) in enumerate(
            zip(scanners, site_seeds, strict=True), start=1
        )
    ]


def generate_segmentation_dataset(
    out_dir: str | os.PathLike[str],
    *,
    dims: int = 3,
    sites: int = 3,
    per_site: int = 8,
    size: int = 48,
    depth: int = 32,
    seed: int = 0,
) -> Path:
    """Write an organ-and-lesion segmentation set in the Medical Segmentation Decathlon
    layout under ``out_dir`` and return that folder; same seed, same files.

    Volumes are ``size`` x ``size`` x ``depth`` voxels (x, y, z), or ``size`` x ``size``
    slices when ``dims`` is 2. Labels: 0 background, 1 organ, 2 lesion; a case holds 0 to
    2 lesions. Each site's scanner has its own intensity scale and offset, noise, bias
    field and voxel spacing (slice thickness included), stored in the NIfTI headers.
    ``dataset.json`` lists each training case with its ``site`` (a FedLens extension)::

        out_dir/dataset.json
        out_dir/imagesTr/site-1_001.nii.gz
        out_dir/labelsTr/site-1_001.nii.gz
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    _check_anatomy_options(sites, per_site, size, depth, seed)
    out = Path(out_dir)
    shape = (depth, size, size)[3 - dims :]
    training = []
    for site, scanner, rng in _site_generators(seed, sites, dims=dims, size=size, depth=depth):
        for number in range(1, per_site + 1):
            image, labels = _draw_case(
                rng, scanner, shape, lesions=int(rng.choice([0, 1, 1, 1, 2]))
            )
            geometry = _geometry(shape, scanner.spacing_mm)
            name = f"{site}_{number:03d}.nii.gz"
            write_image(ImageArray(array=image, **geometry), out / "imagesTr" / name)
            write_image(
                ImageArray(array=labels.astype(np.float32), **geometry),
                out / "labelsTr" / name,
                dtype="uint8",
            )
            training.append(
                {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}", "site": site}
            )
    description = {
        "name": "FedLensSynthetic",
        "description": "Synthetic organ and lesion segmentation with per-site scanners",
        "reference": f"FedLens make_synthetic_dataset, seed {seed}",
        "licence": "CC0",
        "tensorImageSize": f"{dims}D",
        "modality": {"0": "MRI"},
        "labels": {str(value): name for value, name in enumerate(SEGMENTATION_CLASSES)},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (out / "dataset.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return out


def generate_volume_classification_dataset(
    out_dir: str | os.PathLike[str],
    *,
    sites: int = 3,
    per_site: int = 20,
    size: int = 32,
    depth: int = 16,
    seed: int = 0,
) -> Path:
    """Write a 3D lesion-classification set (label 1: the organ holds a lesion) in the
    folder layout, ``labels.csv`` with ``path,label,site``; same seed, same files.

    The volumes are the segmentation set's anatomy and scanners; about half of each
    site's cases hold one lesion.
    """
    _check_anatomy_options(sites, per_site, size, depth, seed)
    out = Path(out_dir)
    shape = (depth, size, size)
    rows: list[tuple[str, int, str]] = []
    for site, scanner, rng in _site_generators(seed, sites, dims=3, size=size, depth=depth):
        labels = rng.permutation(np.arange(per_site) < per_site // 2).astype(int)
        for number, label in enumerate(labels, start=1):
            image, _ = _draw_case(rng, scanner, shape, lesions=int(label))
            relative = f"{site}/vol-{number:04d}.nii.gz"
            write_image(
                ImageArray(array=image, **_geometry(shape, scanner.spacing_mm)), out / relative
            )
            rows.append((relative, int(label), site))
    with (out / LABELS_FILE).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("path", "label", "site"))
        writer.writerows(rows)
    return out
