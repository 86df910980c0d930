"""Synthetic organ-and-lesion segmentation set (Decathlon layout) and 3D lesion volumes:
layout, label values, per-site geometry and scanners, determinism; and masks surviving a
write/read round trip with their label values and geometry."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from training.fl.data.readers import ImageArray, read_image, write_image
from training.fl.data.synthetic import (
    generate_segmentation_dataset,
    generate_volume_classification_dataset,
)


@pytest.fixture(scope="module")
def volumes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default 3D set: 3 sites x 8 cases of 48x48x32."""
    return generate_segmentation_dataset(tmp_path_factory.mktemp("seg3d"), seed=0)


def training_entries(root: Path) -> list[dict[str, str]]:
    return json.loads((root / "dataset.json").read_text())["training"]


def read_case(root: Path, entry: dict[str, str]) -> tuple[ImageArray, ImageArray]:
    return read_image(root / entry["image"]), read_image(root / entry["label"])


def test_the_3d_set_is_in_the_decathlon_layout_with_a_site_per_case(volumes_dir: Path) -> None:
    manifest = json.loads((volumes_dir / "dataset.json").read_text())

    assert manifest["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert manifest["tensorImageSize"] == "3D"
    assert manifest["modality"] == {"0": "MRI"}
    assert manifest["numTraining"] == len(manifest["training"]) == 3 * 8
    assert manifest["training"][0] == {
        "image": "./imagesTr/site-1_001.nii.gz",
        "label": "./labelsTr/site-1_001.nii.gz",
        "site": "site-1",
    }
    assert {entry["site"] for entry in manifest["training"]} == {"site-1", "site-2", "site-3"}
    listed = {Path(entry["image"]).name for entry in manifest["training"]}
    assert {p.name for p in (volumes_dir / "imagesTr").iterdir()} == listed
    assert {p.name for p in (volumes_dir / "labelsTr").iterdir()} == listed


def test_masks_hold_nested_organ_and_lesion_labels_on_the_image_grid(volumes_dir: Path) -> None:
    lesion_cases = 0
    for entry in training_entries(volumes_dir):
        image, mask = read_case(volumes_dir, entry)
        assert image.array.shape == mask.array.shape == (32, 48, 48)
        assert (image.spacing, image.origin, image.direction) == (
            mask.spacing,
            mask.origin,
            mask.direction,
        )
        values = set(np.unique(mask.array).tolist())
        assert {0.0, 1.0} <= values <= {0.0, 1.0, 2.0}, entry["label"]
        lesion_cases += 2.0 in values
        # The organ and its lesions lie inside the body, which is brighter than the air
        # around it whatever the scanner's gain.
        foreground = mask.array > 0
        assert image.array[foreground].mean() > image.array[~foreground].mean() + 20
    assert 0 < lesion_cases < 24  # most cases hold a lesion, some none


def test_each_site_has_its_own_spacing_slice_thickness_and_intensities(
    volumes_dir: Path,
) -> None:
    spacings: dict[str, set[tuple[float, ...]]] = {}
    organ_intensity: dict[str, list[float]] = {}
    for entry in training_entries(volumes_dir):
        image, mask = read_case(volumes_dir, entry)
        spacings.setdefault(entry["site"], set()).add(image.spacing)
        organ_intensity.setdefault(entry["site"], []).append(
            float(image.array[mask.array == 1].mean())
        )
        # The grid is centred on the origin, whatever the spacing.
        far_corner = np.asarray(image.origin) + np.asarray(image.spacing) * (
            np.asarray(image.array.shape[::-1]) - 1
        )
        np.testing.assert_allclose(far_corner, -np.asarray(image.origin), atol=1e-3)

    assert all(len(site_spacings) == 1 for site_spacings in spacings.values())
    per_site = [next(iter(site_spacings)) for site_spacings in spacings.values()]
    assert len({spacing[2] for spacing in per_site}) == 3  # slice thickness differs
    assert len({spacing[0] for spacing in per_site}) == 3
    assert all(spacing[0] == spacing[1] for spacing in per_site)  # square pixels
    means = sorted(float(np.mean(values)) for values in organ_intensity.values())
    assert min(np.diff(means)) > 5.0


def test_the_same_organ_covers_fewer_voxels_on_a_coarser_scanner(volumes_dir: Path) -> None:
    voxel_volume: dict[str, float] = {}
    organ_voxels: dict[str, list[int]] = {}
    for entry in training_entries(volumes_dir):
        image, mask = read_case(volumes_dir, entry)
        voxel_volume[entry["site"]] = math.prod(image.spacing)
        organ_voxels.setdefault(entry["site"], []).append(int((mask.array > 0).sum()))

    coarsest = max(voxel_volume, key=voxel_volume.__getitem__)
    finest = min(voxel_volume, key=voxel_volume.__getitem__)
    assert np.mean(organ_voxels[coarsest]) < np.mean(organ_voxels[finest])


def test_the_2d_set_writes_slices_with_2d_geometry(tmp_path: Path) -> None:
    root = generate_segmentation_dataset(tmp_path, dims=2, sites=2, per_site=3, size=40)

    manifest = json.loads((root / "dataset.json").read_text())
    assert manifest["tensorImageSize"] == "2D"
    assert len(manifest["training"]) == 6
    for entry in manifest["training"]:
        image, mask = read_case(root, entry)
        assert image.array.shape == mask.array.shape == (40, 40)
        assert len(image.spacing) == 2 and image.spacing == mask.spacing
        assert set(np.unique(mask.array).tolist()) <= {0.0, 1.0, 2.0}
        assert (mask.array == 1).any()


def test_the_same_seed_writes_the_same_files_and_another_seed_other_ones(tmp_path: Path) -> None:
    options = {"dims": 3, "sites": 2, "per_site": 2, "size": 32, "depth": 16}
    first = generate_segmentation_dataset(tmp_path / "a", seed=3, **options)
    again = generate_segmentation_dataset(tmp_path / "b", seed=3, **options)
    other = generate_segmentation_dataset(tmp_path / "c", seed=4, **options)

    assert (first / "dataset.json").read_text() == (again / "dataset.json").read_text()
    for entry in training_entries(first):
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                read_image(first / entry[key]).array, read_image(again / entry[key]).array
            )
    case = training_entries(first)[0]["image"]
    assert not np.array_equal(read_image(first / case).array, read_image(other / case).array)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dims": 4}, "dims must be 2 or 3"),
        ({"sites": 0}, "sites must be >= 1"),
        ({"per_site": 1}, "per_site must be >= 2"),
        ({"size": 16}, "size must be >= 32"),
        ({"depth": 8}, "depth must be >= 16"),
    ],
)
def test_settings_too_small_for_the_anatomy_are_refused(
    tmp_path: Path, options: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        generate_segmentation_dataset(tmp_path, **options)


def test_the_3d_classification_set_labels_the_volumes_holding_a_lesion(tmp_path: Path) -> None:
    root = generate_volume_classification_dataset(tmp_path, sites=2, per_site=6, size=32)

    with (root / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    assert rows[0]["path"] == "site-1/vol-0001.nii.gz"
    for site in ("site-1", "site-2"):
        assert sorted(int(r["label"]) for r in rows if r["site"] == site) == [0, 0, 0, 1, 1, 1]
    volume = read_image(root / rows[0]["path"])
    assert volume.array.shape == (16, 32, 32) and len(volume.spacing) == 3


# --- Masks through readers.write_image / read_image -----------------------------------------

_ROTATION = (math.cos(0.3), -math.sin(0.3), math.sin(0.3), math.cos(0.3))


def oblique_mask(dims: int) -> ImageArray:
    """A multi-class mask with uneven spacing, an off-centre origin and a rotated axis."""
    labels = np.zeros((5, 6, 7)[3 - dims :], dtype=np.float32)
    labels[..., 1:3, 2:5] = 1
    labels[..., 2, 3] = 2
    labels.flat[-1] = 7  # a class beyond the first few survives too
    if dims == 3:
        c, s = _ROTATION[0], _ROTATION[2]
        direction: tuple[float, ...] = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
        return ImageArray(
            array=labels,
            spacing=(0.8671, 1.1, 3.3),
            origin=(-12.5, 4.25, 100.125),
            direction=direction,
        )
    return ImageArray(
        array=labels, spacing=(0.8671, 1.1), origin=(-12.5, 4.25), direction=_ROTATION
    )


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".mha", ".nrrd"])
@pytest.mark.parametrize("dims", [2, 3])
def test_a_mask_survives_a_write_read_round_trip_with_its_labels_and_geometry(
    tmp_path: Path, extension: str, dims: int
) -> None:
    mask = oblique_mask(dims)

    stored = read_image(write_image(mask, tmp_path / f"mask{extension}", dtype="uint8"))

    np.testing.assert_array_equal(stored.array, mask.array)
    # NIfTI headers hold single-precision floats.
    np.testing.assert_allclose(stored.spacing, mask.spacing, rtol=1e-6)
    np.testing.assert_allclose(stored.origin, mask.origin, rtol=1e-6)
    np.testing.assert_allclose(stored.direction, mask.direction, atol=1e-6)


def test_a_mask_whose_labels_do_not_fit_the_integer_type_is_refused_naming_the_file(
    tmp_path: Path,
) -> None:
    mask = oblique_mask(3)
    too_large = ImageArray(
        array=mask.array * 100, spacing=mask.spacing, origin=mask.origin, direction=mask.direction
    )

    with pytest.raises(ValueError, match=r"mask\.nii\.gz: values in \[0\.0, 700\.0\]"):
        write_image(too_large, tmp_path / "mask.nii.gz", dtype="uint8")
