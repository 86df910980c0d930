"""Small segmentation datasets written with SimpleITK for tests: Decathlon folders and
mask folders whose masks hold known label values."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from training.fl.data import ImageArray, write_image

CLASSES = {"0": "background", "1": "organ", "2": "lesion"}


def volume(
    shape: tuple[int, ...], spacing: tuple[float, ...], *, seed: int, dtype: str = "float32"
) -> tuple[ImageArray, ImageArray]:
    """An image and its mask (array order shape): an "organ" box holding a "lesion" box."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=np.float32)
    organ = tuple(slice(size // 4, size - size // 4) for size in shape)
    lesion = tuple(slice(size // 2 - 1, size // 2 + 1) for size in shape)
    mask[organ] = 1
    mask[lesion] = 2
    image = (100 + 50 * mask + rng.normal(0, 5, shape)).astype(np.float32)
    dims = len(shape)
    geometry = {
        "spacing": spacing,
        "origin": (0.0,) * dims,
        "direction": tuple(np.eye(dims).ravel().tolist()),
    }
    return ImageArray(array=image, **geometry), ImageArray(array=mask, **geometry)


def write_msd(
    root: Path,
    *,
    cases: int = 4,
    shape: tuple[int, ...] = (6, 10, 8),
    spacing: tuple[float, ...] = (0.8, 0.8, 2.5),
    sites: list[str] | None = None,
    labels: dict[str, str] | None = CLASSES,
) -> Path:
    """A Decathlon folder of ``cases`` 3D volumes (shape in array order, spacing x, y, z)."""
    training = []
    for case in range(cases):
        image, mask = volume(shape, spacing, seed=case)
        name = f"case_{case:03d}.nii.gz"
        write_image(image, root / "imagesTr" / name)
        write_image(mask, root / "labelsTr" / name, dtype="uint8")
        entry = {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"}
        if sites:
            entry["site"] = sites[case % len(sites)]
        training.append(entry)
    manifest = {"name": "Synthetic", "modality": {"0": "MR"}, "training": training, "test": []}
    if labels is not None:
        manifest["labels"] = labels
    (root / "dataset.json").write_text(json.dumps(manifest))
    return root


def write_mask_folder(
    root: Path,
    *,
    cases: int = 4,
    shape: tuple[int, ...] = (12, 10),
    spacing: tuple[float, ...] = (0.5, 0.5),
    sites: list[str] | None = None,
) -> Path:
    """A folder of 2D NIfTI images and masks listed in labels.csv (image,mask[,site])."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in range(cases):
        image, mask = volume(shape, spacing, seed=case)
        write_image(image, root / "images" / f"{case}.nii.gz")
        write_image(mask, root / "masks" / f"{case}.nii.gz", dtype="uint8")
        row = [f"images/{case}.nii.gz", f"masks/{case}.nii.gz"]
        if sites:
            row.append(sites[case % len(sites)])
        rows.append(row)
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "mask", *(["site"] if sites else [])])
        writer.writerows(rows)
    return root


def replace_mask(root: Path, relative: str, mask: ImageArray) -> Path:
    """Overwrite one mask file with ``mask``."""
    return write_image(mask, root / relative, dtype="uint8")
