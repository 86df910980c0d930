"""Synthetic multi-site lesion dataset: deterministic, readable, balanced, site-specific."""

import csv
from pathlib import Path

import numpy as np
import pytest

from training.fl.data.datasets import ImageFolderDataset
from training.fl.data.readers import read_image
from training.fl.data.synthetic import generate_synthetic_dataset


def read_rows(root: Path) -> list[dict[str, str]]:
    with (root / "labels.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_same_seed_writes_identical_images_and_labels(tmp_path: Path) -> None:
    first = generate_synthetic_dataset(tmp_path / "a", sites=2, per_site=6, size=32, seed=5)
    second = generate_synthetic_dataset(tmp_path / "b", sites=2, per_site=6, size=32, seed=5)
    assert read_rows(first) == read_rows(second)
    for row in read_rows(first):
        np.testing.assert_array_equal(
            read_image(first / row["path"]).array, read_image(second / row["path"]).array
        )


def test_different_seed_writes_different_images(tmp_path: Path) -> None:
    first = generate_synthetic_dataset(tmp_path / "a", sites=1, per_site=4, size=32, seed=1)
    second = generate_synthetic_dataset(tmp_path / "b", sites=1, per_site=4, size=32, seed=2)
    path = "site-1/img-0001.nii.gz"
    assert not np.array_equal(read_image(first / path).array, read_image(second / path).array)


def test_layout_is_one_nifti_per_image_listed_with_label_and_site(
    small_synthetic_dir: Path,
) -> None:
    rows = read_rows(small_synthetic_dir)
    assert len(rows) == 3 * 20
    assert rows[0] == {
        "path": "site-1/img-0001.nii.gz",
        "label": rows[0]["label"],
        "site": "site-1",
    }
    assert {row["site"] for row in rows} == {"site-1", "site-2", "site-3"}
    image = read_image(small_synthetic_dir / rows[-1]["path"])
    assert image.array.shape == (32, 32)
    assert image.array.dtype == np.float32


def test_classes_are_balanced_within_every_site(small_synthetic_dir: Path) -> None:
    dataset = ImageFolderDataset(small_synthetic_dir)
    assert dataset.sites is not None
    sites = np.array(dataset.sites)
    for site in set(dataset.sites):
        positive_fraction = dataset.labels[sites == site].mean()
        assert 0.35 <= positive_fraction <= 0.65, site


def test_sites_differ_in_intensity_and_spacing(small_synthetic_dir: Path) -> None:
    rows = read_rows(small_synthetic_dir)
    mean_intensity, spacing = {}, {}
    for site in ("site-1", "site-2", "site-3"):
        images = [read_image(small_synthetic_dir / r["path"]) for r in rows if r["site"] == site]
        mean_intensity[site] = np.mean([image.array.mean() for image in images])
        spacing[site] = {image.spacing for image in images}
    # Each site has one scanner spacing, and the scanners differ between sites.
    assert all(len(spacings) == 1 for spacings in spacing.values())
    assert len({spacings.pop() for spacings in spacing.values()}) == 3
    intensities = sorted(mean_intensity.values())
    assert min(np.diff(intensities)) > 1.0


def test_positive_images_contain_a_bright_lesion(learning_synthetic_dir: Path) -> None:
    # The brightest spot of a positive image is the lesion, above the tissue texture.
    dataset = ImageFolderDataset(learning_synthetic_dir)
    peaks = np.array([float(np.percentile(dataset[i][0], 99.5)) for i in range(len(dataset))])
    assert peaks[dataset.labels == 1].mean() > peaks[dataset.labels == 0].mean() + 0.5


@pytest.mark.parametrize(
    ("options", "message"),
    [({"sites": 0}, "sites"), ({"per_site": 1}, "per_site"), ({"size": 8}, "size")],
)
def test_invalid_generator_options_are_rejected(
    tmp_path: Path, options: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        generate_synthetic_dataset(tmp_path, **options)
