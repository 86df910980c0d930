"""What a site tells the server about its datasets and its machine.

A dataset's description is metadata only: class counts, image geometry, intensity
statistics and, for segmentation, each class's volume, aggregated over the site (the ones
the server's viewer shows, from training.fl.data.statistics). Neither the dataset's path
nor any image, pixel sample or file name is part of it; read errors are counted, not
quoted, since they name files.
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
    ImageReadError,
    Preprocessor,
    load_dataset,
)
from training.fl.data.datasets import SegmentationDataset
from training.fl.data.formats import get_format
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
    path: str | os.PathLike[str],
    fmt: str | None,
    preprocessor: Preprocessor | None = None,
    class_names: list[str] | None = None,
) -> ClassificationDataset | SegmentationDataset:
    """The dataset at ``path``, or a :class:`SiteAgentError` saying why it cannot be read.
    ``class_names`` declares a segmentation dataset's classes (its masks are checked)."""
    location = Path(path)
    if not location.exists():
        raise SiteAgentError(f"{location} does not exist")
    try:
        return load_dataset(
            location, fmt, preprocessor=preprocessor, class_names=class_names or None
        )
    except (DatasetFormatError, ImageReadError, ValueError, OSError) as error:
        raise SiteAgentError(f"cannot open the dataset at {location}: {error}") from None


def _network_channels(image: ImageArray) -> int:
    # As training.fl.data.preprocess.to_channels keeps them: grey (+alpha) 1, RGB(A) 3.
    return 1 if image.channels in (1, 2) else 3


def dataset_metadata(
    dataset: ClassificationDataset | SegmentationDataset,
    *,
    class_names: list[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The PUT body that declares ``dataset`` to the server (see the module docstring).
    A segmentation dataset's labels are its masks' most frequent foreground classes."""
    segmentation = isinstance(dataset, SegmentationDataset)
    if segmentation and not class_names:
        class_names = list(dataset.class_names)
    try:
        labels = dataset.labels
    except (DatasetFormatError, ImageReadError, OSError) as error:
        raise SiteAgentError(f"cannot read the dataset's masks: {error}") from None
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
            image, mask = dataset.raw_sample(int(index))
        except (ImageReadError, OSError, ValueError):
            unreadable += 1
            continue
        channels[_network_channels(image)] += 1
        measurements.append(measure_image(image, rng, mask, num_classes))
    if not measurements:
        raise SiteAgentError(f"none of the {len(chosen)} images sampled could be read")
    summary = summarise_site("", counts, measurements)
    stores_geometry = get_format(dataset.storage_format).stores_geometry
    if not stores_geometry:
        summary.spacings.clear()  # unit spacing is a stand-in, not a measurement

    shape = list(summary.shapes.most_common(1)[0][0])
    spacing = list(summary.spacings.most_common(1)[0][0]) if stores_geometry else []
    return {
        "num_classes": num_classes,
        "class_names": list(class_names or []),
        "counts_per_class": counts,
        "num_samples": count,
        "channels": channels.most_common(1)[0][0],
        "image_shape": shape,
        "spacing": spacing,
        "storage_format": dataset.storage_format,
        "statistics": site_statistics(summary, unreadable, class_names or []),
    }


def site_statistics(
    summary: SiteSummary, unreadable: int, class_names: list[str] | None = None
) -> dict[str, Any]:
    """The site's intensity and geometry summary: aggregates only, no pixel values; with
    masks, each class's volume over the sampled images (``class_volumes``)."""
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
        **({"class_volumes": class_volumes(summary, class_names)} if summary.class_voxels else {}),
    }


def class_volumes(summary: SiteSummary, class_names: list[str] | None) -> list[dict[str, Any]]:
    """Each class's voxels and mm³ over the sampled masks, and its mean mm³ per image."""
    names = list(class_names or [])
    sampled = max(summary.num_sampled, 1)
    return [
        {
            "label": label,
            "name": names[label] if label < len(names) else f"class {label}",
            "voxels": voxels,
            "mm3": mm3,
            "mean_mm3": mm3 / sampled,
        }
        for label, (voxels, mm3) in enumerate(
            zip(summary.class_voxels, summary.class_mm3, strict=True)
        )
    ]


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
