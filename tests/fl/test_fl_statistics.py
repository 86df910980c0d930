"""Per-image and per-site measurements (shared by the image viewer and site agents)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.fl.data import ImageArray
from training.fl.data.statistics import PIXELS_PER_IMAGE, measure_image, summarise_site


def image_2d(pixels: np.ndarray, spacing=(0.5, 0.8)) -> ImageArray:
    return ImageArray(
        array=pixels.astype(np.float32), spacing=spacing, origin=(0.0, 0.0),
        direction=(1.0, 0.0, 0.0, 1.0),
    )  # fmt: skip


def test_an_image_is_measured_in_array_order_ignoring_non_finite_pixels():
    pixels = np.arange(12, dtype=np.float32).reshape(3, 4)
    pixels[0, 0] = np.nan

    measured = measure_image(image_2d(pixels, spacing=(0.5, 0.8)), np.random.default_rng(0))

    finite = np.arange(1, 12, dtype=np.float64)
    assert measured.shape == (3, 4)
    # ImageArray.spacing is (x, y); the measurement follows the array: (rows, columns).
    assert measured.spacing == (0.8, 0.5)
    assert measured.count == 11
    assert measured.mean == pytest.approx(finite.mean())
    assert measured.sum_squared_deviations == pytest.approx(((finite - finite.mean()) ** 2).sum())


def test_a_large_image_contributes_a_bounded_pixel_sample():
    measured = measure_image(image_2d(np.ones((100, 100))), np.random.default_rng(0))

    assert measured.pixel_sample.size == PIXELS_PER_IMAGE


def test_a_site_summary_has_the_exact_mean_and_variance_of_all_its_pixels():
    rng = np.random.default_rng(1)
    images = [rng.normal(10, 2, (8, 8)), rng.normal(50, 5, (16, 16)), rng.normal(0, 1, (4, 4))]

    summary = summarise_site(
        "north", [2, 1], [measure_image(image_2d(image), rng) for image in images]
    )

    pooled = np.concatenate([image.astype(np.float32).ravel() for image in images])
    assert summary.num_samples == 3
    assert summary.pixel_count == pooled.size
    assert summary.mean == pytest.approx(pooled.mean(), rel=1e-6)
    assert summary.std == pytest.approx(pooled.std(), rel=1e-6)
    assert summary.shapes == {(8, 8): 1, (16, 16): 1, (4, 4): 1}
    assert summary.spacings == {(0.8, 0.5): 3}


def test_the_statistics_module_imports_no_django():
    code = (
        "import sys, training.fl.data.statistics; "
        "sys.exit(any(m.split('.')[0] in ('django', 'flproject') for m in sys.modules))"
    )

    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
