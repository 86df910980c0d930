"""What the datasets and the format registry share: the errors that reading a dataset raises,
the limit on an image's size and the name of a folder's labels file (all without PyTorch,
which the registry's users in web processes do not load)."""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_VOLUME_VOXELS", "LABELS_FILE", "DatasetFormatError"]

LABELS_FILE = "labels.csv"

# The largest image (voxels times components) a dataset reads: 512^3, 512 MiB as float32.
# Django settings pass their own (FEDLENS_MAX_VOLUME_VOXELS); training/fl reads none.
DEFAULT_MAX_VOLUME_VOXELS = 512**3


class DatasetFormatError(ValueError):
    """A dataset's layout, label file or masks are not what the loader expects; the message
    names the file at fault."""
