"""The errors that reading a dataset raises, shared by the datasets and the format registry."""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_VOLUME_VOXELS", "DatasetFormatError"]

# The largest image (voxels times components) a dataset reads: 512^3, 512 MiB as float32.
# Django settings pass their own (FEDLENS_MAX_VOLUME_VOXELS); training/fl reads none.
DEFAULT_MAX_VOLUME_VOXELS = 512**3


class DatasetFormatError(ValueError):
    """A dataset's layout, label file or masks are not what the loader expects; the message
    names the file at fault."""
