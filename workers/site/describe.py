"""What a site tells the server about its datasets and its machine.

A dataset's description is metadata only: class counts, image geometry and intensity
statistics aggregated over the site (the ones the server's viewer shows, from
training.fl.data.statistics). Neither the dataset's path nor any image, pixel sample or
file name is part of it; read errors are counted, not quoted, since they name files.
"""

from __future__ import annotations

import os
import platform
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from training.fl.data import (
    ClassificationDataset,
    DatasetFormatError,
    ImageArray,
    ImageFolderDataset,
    ImageReadError,
    NpzDataset,
    Preprocessor,
    load_dataset,
    read_image,
)
from training.fl.data.statistics import SiteSummary, measure_image, summarise_site
from workers.site.home import SiteAgentError

# As many images as the viewer reads per site, so the numbers are comparable.
SAMPLES_PER_SITE = 200
HISTOGRAM_BINS = 64
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_dataset_name(name: str) -> str:
    # The name goes into the API's URL path: keep it to characters that need no escaping.
    if not DATASET_NAME.fullmatch(name):
        raise SiteAgentError(
            f"dataset name {name!r} must start with a letter or digit and contain only "
            "letters, digits, '.', '_' and '-' (at most 100 characters)"
        )
    return name


def open_dataset(
    path: str | os.PathLike[str], fmt: str | None, preprocessor: Preprocessor | None = None
) -> ClassificationDataset:
    """The dataset at ``path``, or a :class:`SiteAgentError` saying why it cannot be read."""
    location = Path(path)
    if not location.exists():
        raise SiteAgentError(f"{location} does not exist")
    try:
        return load_dataset(location, fmt, preprocessor=preprocessor)
    except (DatasetFormatError, ValueError, OSError) as error:
        raise SiteAgentError(f"cannot open the dataset at {location}: {error}") from None


def storage_format(dataset: ClassificationDataset) -> str:
    return "npz" if isinstance(dataset, NpzDataset) else "folder"


def _npz_image(dataset: NpzDataset, index: int) -> ImageArray:
    """An .npz sample as an image: channels last, unit spacing (.npz stores none)."""
    tensor = dataset.images[index]
    pixels = tensor[0] if tensor.shape[0] == 1 else tensor.movedim(0, -1)
    dims = tensor.dim() - 1
    identity = tuple(float(row == column) for row in range(dims) for column in range(dims))
    return ImageArray(
        array=pixels.numpy(), spacing=(1.0,) * dims, origin=(0.0,) * dims, direction=identity
    )


def _raw_image(dataset: ClassificationDataset, index: int) -> ImageArray:
    if isinstance(dataset, ImageFolderDataset):
        return read_image(dataset.paths[index])
    if isinstance(dataset, NpzDataset):
        return _npz_image(dataset, index)
    raise SiteAgentError(f"cannot describe a dataset of type {type(dataset).__name__}")


def _network_channels(image: ImageArray) -> int:
    # As training.fl.data.preprocess.to_channels keeps them: grey (+alpha) 1, RGB(A) 3.
    return 1 if image.channels in (1, 2) else 3


def dataset_metadata(
    dataset: ClassificationDataset,
    *,
    class_names: list[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The PUT body that declares ``dataset`` to the server (see the module docstring)."""
    labels = dataset.labels
    num_classes = len(class_names) if class_names else dataset.num_classes
    if int(labels.max()) >= num_classes:
        raise SiteAgentError(
            f"the dataset has labels up to {int(labels.max())} but {num_classes} class names "
            "were given; give one name per class, in label order"
        )
    counts = np.bincount(labels, minlength=num_classes).tolist()

    rng = np.random.default_rng(seed)
    count = len(dataset)
    chosen = np.sort(rng.choice(count, size=min(count, SAMPLES_PER_SITE), replace=False))
    measurements, unreadable, channels = [], 0, Counter[int]()
    for index in chosen:
        try:
            image = _raw_image(dataset, int(index))
        except (ImageReadError, OSError, ValueError):
            unreadable += 1
            continue
        channels[_network_channels(image)] += 1
        measurements.append(measure_image(image, rng))
    if not measurements:
        raise SiteAgentError(f"none of the {len(chosen)} images sampled could be read")
    summary = summarise_site("", counts, measurements)
    is_npz = isinstance(dataset, NpzDataset)
    if is_npz:
        summary.spacings.clear()  # unit spacing is a stand-in, not a measurement

    shape = list(summary.shapes.most_common(1)[0][0])
    spacing = [] if is_npz else list(summary.spacings.most_common(1)[0][0])
    return {
        "num_classes": num_classes,
        "class_names": list(class_names or []),
        "counts_per_class": counts,
        "num_samples": count,
        "channels": channels.most_common(1)[0][0],
        "image_shape": shape,
        "spacing": spacing,
        "storage_format": storage_format(dataset),
        "statistics": site_statistics(summary, unreadable),
    }


def site_statistics(summary: SiteSummary, unreadable: int) -> dict[str, Any]:
    """The site's intensity and geometry summary: aggregates only, no pixel values."""
    pixels = summary.pixel_sample
    if pixels.size:
        low, high = (float(v) for v in np.percentile(pixels, [1, 99]))
        if high <= low:
            low, high = low - 0.5, high + 0.5
        histogram, _ = np.histogram(pixels, bins=HISTOGRAM_BINS, range=(low, high))
        fractions = (histogram / pixels.size).tolist()
        percentiles = dict(
            zip(
                (f"p{p}" for p in PERCENTILES),
                (float(v) for v in np.percentile(pixels, PERCENTILES)),
                strict=True,
            )
        )
    else:
        low, high, fractions, percentiles = 0.0, 1.0, [], {}
    return {
        "num_sampled": summary.num_sampled,
        "num_unreadable": unreadable,
        "pixel_count": summary.pixel_count,
        "mean": summary.mean,
        "std": summary.std,
        "percentiles": percentiles,
        "histogram": {"low": low, "high": high, "bins": HISTOGRAM_BINS, "fractions": fractions},
        "shapes": [{"shape": list(s), "count": n} for s, n in summary.shapes.most_common()],
        "spacings": [{"spacing": list(s), "count": n} for s, n in summary.spacings.most_common()],
    }


# --- the machine ---------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_devices() -> list[dict[str, Any]]:
    """The GPUs this node trains on, or its CPU when it has none."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count():
        return [
            {
                "kind": "cuda",
                "name": torch.cuda.get_device_name(index),
                "memory_mb": torch.cuda.get_device_properties(index).total_memory // 2**20,
                "threads": None,
            }
            for index in range(torch.cuda.device_count())
        ]
    return [
        {
            "kind": "cpu",
            "name": cpu_name(),
            "memory_mb": None,
            # What this process may run on, which a container or cgroup may narrow.
            "threads": len(os.sched_getaffinity(0)),
        }
    ]
