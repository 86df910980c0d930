"""Medical image I/O, preprocessing, datasets, synthetic data and client partitioning.

The datasets (PyTorch) and the synthetic generators (SciPy) are imported on first use of
their names: web processes use this package to validate what users send, and start faster
without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from training.fl.data.errors import DatasetFormatError
from training.fl.data.partition import holdout_split, parse_partition_spec, partition_indices
from training.fl.data.preprocess import (
    NORMALIZATION_FORMS,
    Normalization,
    NormalizationError,
    Preprocessor,
    check_normalization,
    normalize_intensity,
    parse_normalization,
    resample,
)
from training.fl.data.readers import (
    ImageArray,
    ImageReadError,
    read_image,
    write_dicom_series,
    write_image,
)

if TYPE_CHECKING:
    from training.fl.data.datasets import (
        ClassificationDataset,
        ImageFolderDataset,
        NpzDataset,
        load_dataset,
        native_channels,
    )
    from training.fl.data.synthetic import (
        generate_segmentation_dataset,
        generate_synthetic_dataset,
        generate_volume_classification_dataset,
    )

# Name -> the module that defines it, imported when the name is first looked up.
_ON_FIRST_USE = {
    "ClassificationDataset": "training.fl.data.datasets",
    "ImageFolderDataset": "training.fl.data.datasets",
    "NpzDataset": "training.fl.data.datasets",
    "load_dataset": "training.fl.data.datasets",
    "native_channels": "training.fl.data.datasets",
    "generate_segmentation_dataset": "training.fl.data.synthetic",
    "generate_synthetic_dataset": "training.fl.data.synthetic",
    "generate_volume_classification_dataset": "training.fl.data.synthetic",
}


def __getattr__(name: str) -> Any:
    module = _ON_FIRST_USE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "NORMALIZATION_FORMS",
    "ClassificationDataset",
    "DatasetFormatError",
    "ImageArray",
    "ImageFolderDataset",
    "ImageReadError",
    "Normalization",
    "NormalizationError",
    "NpzDataset",
    "Preprocessor",
    "check_normalization",
    "generate_segmentation_dataset",
    "generate_synthetic_dataset",
    "generate_volume_classification_dataset",
    "holdout_split",
    "load_dataset",
    "native_channels",
    "normalize_intensity",
    "parse_normalization",
    "parse_partition_spec",
    "partition_indices",
    "read_image",
    "resample",
    "write_dicom_series",
    "write_image",
]
