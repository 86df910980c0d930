"""The Medical Segmentation Decathlon layout: ``dataset.json``, ``imagesTr/``, ``labelsTr/``
(NIfTI), and ``imagesTs/`` whose images have no labels.

``dataset.json``'s ``labels`` ({"0": "background", "1": ...}) names the classes and its
``training`` list ({"image", "label"}) pairs the files; FedLens reads an optional
``site`` in each pair. Without a ``training`` list, each ``imagesTr/`` file pairs with
the ``labelsTr/`` file of the same name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.fl.data.errors import DatasetFormatError
from training.fl.data.formats.paired import PairedFormat, PairListing

__all__ = ["DecathlonFormat"]

DATASET_JSON = "dataset.json"
IMAGES_DIR = "imagesTr"
MASKS_DIR = "labelsTr"
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _is_nifti(path: Path) -> bool:
    # The Decathlon's archives carry macOS "._" resource files beside the images.
    return path.is_file() and path.name.endswith(_NIFTI_SUFFIXES) and not path.name.startswith(".")


class DecathlonFormat(PairedFormat):
    """``imagesTr`` is the train split; the server holds back a share of it to evaluate,
    since the Decathlon's test images have no labels."""

    name = "msd"
    summary = "msd: a Medical Segmentation Decathlon folder (dataset.json, imagesTr/, labelsTr/)"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / DATASET_JSON).is_file() and (path / IMAGES_DIR).is_dir()

    def check_split(self, path: Path, split: str) -> None:
        if split == "test":
            raise DatasetFormatError(
                f"{path}: the Decathlon's test images (imagesTs/) have no labels, so they "
                "cannot evaluate a model; FedLens holds back a share of imagesTr instead"
            )
        super().check_split(path, split)

    def _manifest(self, path: Path) -> dict[str, Any]:
        manifest_path = path / DATASET_JSON
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            raise DatasetFormatError(f"{path}: no {DATASET_JSON} in this folder") from None
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise DatasetFormatError(f"{manifest_path}: not readable JSON ({error})") from None
        if not isinstance(manifest, dict):
            raise DatasetFormatError(f"{manifest_path}: must hold a JSON object")
        return manifest

    def declared_class_names(self, path: Path) -> list[str] | None:
        manifest_path = path / DATASET_JSON
        labels = self._manifest(path).get("labels")
        if labels is None:
            return None
        if not isinstance(labels, dict) or not labels:
            raise DatasetFormatError(
                f'{manifest_path}: "labels" must map label values to class names, e.g. '
                '{"0": "background", "1": "tumour"}'
            )
        try:
            by_value = {int(value): str(name) for value, name in labels.items()}
        except ValueError:
            raise DatasetFormatError(
                f'{manifest_path}: "labels" keys must be label values 0, 1, 2, ...'
            ) from None
        if sorted(by_value) != list(range(len(by_value))):
            raise DatasetFormatError(
                f'{manifest_path}: "labels" must number the classes 0, 1, 2, ... without gaps; '
                f"found {sorted(by_value)}"
            )
        return [by_value[value] for value in range(len(by_value))]

    def listing(self, path: Path, split: str) -> PairListing:
        manifest_path = path / DATASET_JSON
        training = self._manifest(path).get("training")
        folder = path.resolve()
        pairs: list[tuple[str, str, str | None]]
        if training is None:
            images = sorted(p for p in (folder / IMAGES_DIR).iterdir() if _is_nifti(p))
            pairs = [(f"{IMAGES_DIR}/{p.name}", f"{MASKS_DIR}/{p.name}", None) for p in images]
        elif isinstance(training, list):
            pairs = [
                self._pair(entry, manifest_path, number) for number, entry in enumerate(training)
            ]
        else:
            raise DatasetFormatError(
                f'{manifest_path}: "training" must be a list of {{"image": ..., "label": ...}}'
            )
        if not pairs:
            raise DatasetFormatError(f"{path}: dataset has no samples in {IMAGES_DIR}/")
        for image, mask, _ in pairs:
            for relative in (image, mask):
                file = (folder / relative).resolve()
                if not file.is_relative_to(folder):
                    raise DatasetFormatError(f"{manifest_path}: {relative} must lie in the folder")
                if not file.exists():
                    raise DatasetFormatError(f"{manifest_path}: {relative} not found")
        has_sites = any(site is not None for _, _, site in pairs)
        return PairListing(
            images=[image for image, _, _ in pairs],
            masks=[mask for _, mask, _ in pairs],
            sites=[site or "" for _, _, site in pairs] if has_sites else None,
        )

    @staticmethod
    def _pair(entry: object, manifest_path: Path, number: int) -> tuple[str, str, str | None]:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("image"), str)
            and isinstance(entry.get("label"), str)
        ):
            raise DatasetFormatError(
                f'{manifest_path}: "training" entry {number} needs "image" and "label" paths'
            )
        site = entry.get("site")
        # "./imagesTr/x.nii.gz" as the Decathlon writes it.
        return (
            Path(entry["image"]).as_posix().removeprefix("./"),
            Path(entry["label"]).as_posix().removeprefix("./"),
            None if site is None else str(site).strip(),
        )
