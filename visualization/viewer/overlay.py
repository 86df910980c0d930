"""Masks drawn over a segmentation dataset's slices: the ground truth the dataset stores and
what a checkpoint's network predicts, one colour per class, with the prediction's Dice.

The stored image and mask come from the dataset's format (``read_entry``, through the
viewer's image list) on their own voxel grid, so that they lie over the slice the viewer's
PNG endpoint renders. The network sees the image as training does (the dataset's
preprocessing and resampling); its label map is brought back to the stored grid with
nearest neighbour for display. Dice and HD95 are computed where the federation computes
them: on the training grid, against the resampled ground truth, with the sample's spacing
(training.fl.metrics).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from training.fl.data import DatasetFormatError, ImageArray, ImageReadError
from training.models import Checkpoint, Dataset, Task
from visualization.viewer import rendering
from visualization.viewer.cache import ProcessCache
from visualization.viewer.images import (
    SPLIT,
    DataUnavailable,
    ImageRecord,
    class_names_of,
    data_key,
    read_raw_pair,
    training_sample,
)
from visualization.viewer.prediction import CheckpointUnusable, network_of

if TYPE_CHECKING:
    import torch

# Foreground classes 1, 2, ... take these colours in turn; the background stays clear.
CLASS_COLOURS = (
    "#e63946", "#2a9d8f", "#f4a261", "#457b9d", "#9b5de5",
    "#ffb703", "#06d6a0", "#ff006e", "#8ab17d", "#3a86ff",
)  # fmt: skip


class NotSegmentation(ValueError):
    """The dataset stores labels per image, not masks: nothing to overlay."""


@dataclass(frozen=True)
class Prediction:
    """A checkpoint's label map of one image on the stored grid, and its scores."""

    labels: npt.NDArray[np.int64]  # stored grid, array order
    metrics: dict[str, Any]  # dice, dice_per_class, hd95, hd95_per_class (training grid)


def class_legend(dataset: Dataset) -> list[dict[str, Any]]:
    """Each foreground class's label value, name and colour (what the legend shows)."""
    names = class_names_of(dataset)
    return [
        {"value": value, "name": names[value], "colour": class_colour(value)}
        for value in range(1, len(names))
    ]


def class_colour(value: int) -> str:
    return CLASS_COLOURS[(value - 1) % len(CLASS_COLOURS)]


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def check_segmentation(dataset: Dataset) -> None:
    if dataset.task != Task.SEGMENTATION:
        raise NotSegmentation(
            f"Dataset {dataset.pk} is a {dataset.task} dataset: its images have a label each, "
            "not a mask; overlays exist for segmentation datasets only."
        )


def to_stored_grid(labels: torch.Tensor, shape: tuple[int, ...]) -> npt.NDArray[np.int64]:
    """A label map resampled to `shape` with nearest neighbour (labels stay labels)."""
    import torch

    if tuple(labels.shape) == shape:
        return labels.numpy().astype(np.int64)
    resized = torch.nn.functional.interpolate(
        labels[None, None].float(), size=shape, mode="nearest"
    )
    return resized[0, 0].round().to(torch.int64).numpy()


_predictions: ProcessCache[tuple, Prediction] = ProcessCache(maxsize=8)


def prediction_of(checkpoint: Checkpoint, dataset: Dataset, record: ImageRecord) -> Prediction:
    """The checkpoint's label map of the image on the stored grid, and its Dice and HD95
    against the ground truth on the training grid (computed once per process)."""
    key = (checkpoint.pk, checkpoint.sha256, *data_key(dataset), record.index)
    return _predictions.get_or_compute(key, lambda: _predict(checkpoint, dataset, record))


def _predict(checkpoint: Checkpoint, dataset: Dataset, record: ImageRecord) -> Prediction:
    # The engine (PyTorch, MONAI) is imported by the first prediction a web process makes.
    import torch

    from training.federation import open_dataset_at
    from training.fl.metrics import segmentation_metrics
    from training.fl.segmentation import predict_mask

    image, _ = read_raw_pair(dataset, record)
    tensor, truth = training_sample(dataset, record)
    try:
        spacing = open_dataset_at(dataset, record.source, SPLIT).spacing(record.position)
    except (DatasetFormatError, ImageReadError, OSError, ValueError) as error:
        raise DataUnavailable(f"{record.relative_path} has no spacing: {error}") from None
    if not isinstance(truth, torch.Tensor):
        raise DataUnavailable(f"{record.relative_path} has no mask to compare a prediction to.")
    network = network_of(checkpoint)
    patch_size = tuple(checkpoint.experiment.patch_size or ())
    try:
        labels = predict_mask(network, tensor, patch_size=patch_size, device=torch.device("cpu"))
    except (RuntimeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise CheckpointUnusable(
            f"The network of checkpoint {checkpoint.pk} cannot take this image "
            f"(a tensor of shape {list(tensor.shape)}): {reason}"
        ) from None
    metrics = segmentation_metrics(
        labels[None, None], truth[None], num_classes=dataset.num_classes, spacing=spacing
    )
    stored_shape = tuple(image.array.shape[: image.spatial_dims])
    return Prediction(labels=to_stored_grid(labels, stored_shape), metrics=metrics)


def labels_image(labels: npt.NDArray[np.int64], like: ImageArray) -> ImageArray:
    """A label map as an image on `like`'s grid, so that it is sliced as the image is."""
    return ImageArray(
        array=labels.astype(np.float32),
        spacing=like.spacing,
        origin=like.origin,
        direction=like.direction,
    )


def mask_png(
    mask: ImageArray, *, plane: str, slice_index: int | None, max_side: int, num_classes: int
) -> str:
    """One slice of a label map as a PNG data URL: each foreground class in its colour,
    opaque, the background transparent (the page sets the opacity), sized as the viewer's
    PNG of the same slice."""
    cut = rendering.extract_slice(mask, plane=plane, index=slice_index)
    labels = np.rint(cut.pixels).astype(np.int64)
    rows, columns = labels.shape[:2]
    colours = np.zeros((max(num_classes, int(labels.max(initial=0)) + 1), 4), dtype=np.uint8)
    for value in range(1, len(colours)):
        colours[value] = (*_rgb(class_colour(value)), 255)
    picture = Image.fromarray(np.ascontiguousarray(colours[np.clip(labels, 0, None)]), "RGBA")
    size = rendering.display_size(
        rows,
        columns,
        row_spacing=cut.row_spacing,
        column_spacing=cut.column_spacing,
        max_side=max_side,
    )
    if picture.size != size:
        picture = picture.resize(size, Image.Resampling.NEAREST)  # no blended class colours
    output = io.BytesIO()
    picture.save(output, format="PNG")
    return "data:image/png;base64," + base64.b64encode(output.getvalue()).decode("ascii")


def overlay(
    dataset: Dataset,
    record: ImageRecord,
    *,
    plane: str,
    slice_index: int | None,
    max_side: int,
    checkpoint: Checkpoint | None,
) -> dict[str, Any]:
    """What the page draws over slice `slice_index` of `plane`: the ground truth and, with a
    checkpoint, its prediction (PNG data URLs), the legend, and the prediction's Dice."""
    if not rendering.MIN_OUTPUT_SIDE <= max_side <= rendering.MAX_OUTPUT_SIDE:
        raise rendering.RenderError(
            f"size must be from {rendering.MIN_OUTPUT_SIDE} to {rendering.MAX_OUTPUT_SIDE} "
            f"pixels, got {max_side}."
        )
    check_segmentation(dataset)
    image, mask = read_raw_pair(dataset, record)
    # Checked on the image first: a bad plane or slice is a 400 before any prediction.
    cut_count = rendering.slice_count(image, plane)
    rendering.extract_slice(image, plane=plane, index=slice_index)
    chosen = cut_count // 2 if slice_index is None and image.spatial_dims == 3 else slice_index
    options = {"plane": plane, "slice_index": chosen, "max_side": max_side}
    classes = dataset.num_classes
    answer: dict[str, Any] = {
        "index": record.index,
        "plane": plane,
        "slice": chosen or 0,
        "slices_per_plane": (
            {name: rendering.slice_count(image, name) for name in rendering.PLANES}
            if image.spatial_dims == 3
            else {"axial": 1}
        ),
        "classes": class_legend(dataset),
        "ground_truth": mask_png(mask, **options, num_classes=classes) if mask else None,
        "prediction": None,
        "checkpoint": None,
        "dice": None,
        "dice_per_class": None,
        "hd95": None,
    }
    if checkpoint is not None:
        predicted = prediction_of(checkpoint, dataset, record)
        answer.update(
            prediction=mask_png(
                labels_image(predicted.labels, image), **options, num_classes=classes
            ),
            checkpoint={
                "id": checkpoint.pk,
                "experiment": checkpoint.experiment_id,
                "experiment_name": checkpoint.experiment.name,
                "round": checkpoint.round.number if checkpoint.round_id else None,
            },
            dice=predicted.metrics.get("dice"),
            dice_per_class=predicted.metrics.get("dice_per_class"),
            hd95=predicted.metrics.get("hd95"),
        )
    return answer
