"""Medical image I/O, preprocessing, datasets, synthetic data and client partitioning."""

from training.fl.data.datasets import (
    ClassificationDataset,
    DatasetFormatError,
    ImageFolderDataset,
    NpzDataset,
    load_dataset,
    native_channels,
)
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
from training.fl.data.synthetic import (
    generate_segmentation_dataset,
    generate_synthetic_dataset,
    generate_volume_classification_dataset,
)

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
