"""Medical image I/O, preprocessing, datasets, synthetic data and client partitioning."""

from training.fl.data.datasets import (
    ClassificationDataset,
    DatasetFormatError,
    ImageFolderDataset,
    NpzDataset,
    load_dataset,
)
from training.fl.data.partition import holdout_split, parse_partition_spec, partition_indices
from training.fl.data.preprocess import Preprocessor, normalize_intensity, resample
from training.fl.data.readers import (
    ImageArray,
    ImageReadError,
    read_image,
    write_dicom_series,
    write_image,
)
from training.fl.data.synthetic import generate_synthetic_dataset

__all__ = [
    "ClassificationDataset",
    "DatasetFormatError",
    "ImageArray",
    "ImageFolderDataset",
    "ImageReadError",
    "NpzDataset",
    "Preprocessor",
    "generate_synthetic_dataset",
    "holdout_split",
    "load_dataset",
    "normalize_intensity",
    "parse_partition_spec",
    "partition_indices",
    "read_image",
    "resample",
    "write_dicom_series",
    "write_image",
]
