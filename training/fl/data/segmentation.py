"""Images paired with label masks, the dataset that segmentation trains on.

``ds[i]`` is ``(image, mask)``: the image float32 ``[C, *spatial]`` as the preprocessor
makes it (resampled with its linear interpolation), the mask int64 ``[1, *spatial]`` on
the same grid, resampled with nearest neighbour so that its label values survive.
Each pair is checked when read: the mask must have its image's shape and spacing and
hold only the declared classes' labels; each error names the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset

from training.fl.data.cache import (
    DECODING,
    SAMPLE_ERRORS,
    DecodedCache,
    EntryWriter,
    SampleArrays,
    files_fingerprint,
    preprocessing_key,
    smallest_label_dtype,
)
from training.fl.data.errors import DEFAULT_MAX_VOLUME_VOXELS, DatasetFormatError
from training.fl.data.headers import check_volume_size, read_header
from training.fl.data.preprocess import Preprocessor, resample
from training.fl.data.readers import ImageArray, image_shape, read_image

__all__ = ["SPACING_TOLERANCE", "SegmentationDataset", "check_mask", "dominant_class"]

# Relative difference of spacing tolerated between a mask and its image: headers written
# by different tools round spacing differently in the last digits.
SPACING_TOLERANCE = 1e-3


def _describe_classes(class_names: Sequence[str]) -> str:
    return ", ".join(f"{label} {name}" for label, name in enumerate(class_names))


def check_mask(
    mask: ImageArray,
    *,
    image_shape: Sequence[int],
    image_spacing: Sequence[float],
    image_path: Path,
    mask_path: Path,
    class_names: Sequence[str],
) -> npt.NDArray[np.int64]:
    """The mask's labels as int64, or a :class:`DatasetFormatError` naming the mask file
    when its grid differs from its image's (``image_shape`` in array order,
    ``image_spacing`` x, y[, z]) or it holds a label no class declares."""
    if mask.channels != 1 or mask.array.ndim != mask.spatial_dims:
        raise DatasetFormatError(
            f"{mask_path}: a mask holds one label per voxel; this one has "
            f"{mask.channels} components per voxel"
        )
    if tuple(image_shape) != mask.array.shape:
        raise DatasetFormatError(
            f"{mask_path}: mask shape {tuple(mask.array.shape)} differs from its image "
            f"{image_path} ({tuple(image_shape)}); a mask must lie on its image's voxel grid"
        )
    if len(image_spacing) != len(mask.spacing) or not np.allclose(
        mask.spacing, image_spacing, rtol=SPACING_TOLERANCE, atol=1e-6
    ):
        raise DatasetFormatError(
            f"{mask_path}: mask spacing {_rounded(mask.spacing)} mm differs from its image "
            f"{image_path} ({_rounded(image_spacing)} mm, both x, y[, z]); a mask must lie "
            "on its image's voxel grid"
        )
    values = mask.array
    if not np.array_equal(values, np.rint(values)):
        raise DatasetFormatError(
            f"{mask_path}: mask holds non-integer values; each voxel must be a class label "
            f"({_describe_classes(class_names)})"
        )
    labels = values.astype(np.int64)
    present = np.unique(labels)
    outside = present[(present < 0) | (present >= len(class_names))]
    if outside.size:
        raise DatasetFormatError(
            f"{mask_path}: label value(s) {', '.join(map(str, outside.tolist()))} outside the "
            f"declared classes ({_describe_classes(class_names)}); declare every class "
            "(dataset.json 'labels' or --class-names) or fix the mask"
        )
    return labels


def _rounded(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(f"{value:.6g}") for value in values)


def dominant_class(labels: npt.NDArray[np.int64], num_classes: int) -> int:
    """The foreground class with the most voxels, 0 when the mask is all background."""
    counts = np.bincount(labels.reshape(-1), minlength=num_classes)
    foreground = counts[1:]
    return int(foreground.argmax()) + 1 if foreground.sum() else 0


class SegmentationDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Images with per-voxel class masks, listed by a format (MSD, mask folder).

    ``class_names`` names every class in label order, the background (label 0) first;
    ``num_classes`` counts it. ``labels`` gives each sample its most frequent foreground
    class (0 for none), read from the masks on first use, so that partitioners can
    stratify without loading images.

    With a ``decoded_cache``, the first pair asked for decodes every pair into it (or maps
    what another process decoded), and ``labels`` are kept there too; without one,
    preprocessed pairs are kept in memory after their first use when ``cache`` is on.
    """

    task = "segmentation"

    def __init__(
        self,
        *,
        source: str | os.PathLike[str],
        storage_format: str,
        images: Sequence[Path],
        masks: Sequence[Path],
        class_names: Sequence[str],
        sites: list[str] | None = None,
        preprocessor: Preprocessor | None = None,
        cache: bool = True,
        max_voxels: int = DEFAULT_MAX_VOLUME_VOXELS,
        decoded_cache: DecodedCache | None = None,
    ) -> None:
        self.source = Path(source)
        self.storage_format = storage_format
        if not images:
            raise DatasetFormatError(f"{self.source}: dataset has no samples")
        if len(images) != len(masks):
            raise ValueError("every image needs exactly one mask")
        if sites is not None and len(sites) != len(images):
            raise ValueError("give one site per image, or none")
        if len(class_names) < 2:
            raise DatasetFormatError(
                f"{self.source}: a segmentation dataset needs the background and at least "
                f"one class; got {list(class_names)}"
            )
        self.image_paths = list(images)
        self.mask_paths = list(masks)
        self.class_names = list(class_names)
        self.sites = sites
        self.preprocessor = preprocessor or Preprocessor()
        self.cache = cache
        self.max_voxels = max_voxels
        self._cached: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._labels: npt.NDArray[np.int64] | None = None
        self.decoded_cache = decoded_cache
        self._decoded: tuple[SampleArrays, SampleArrays] | None = None
        self._failures: dict[int, Exception] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> npt.NDArray[np.int64]:
        if self._labels is None:
            if self.decoded_cache is None:
                self._labels = self._read_labels()
            else:
                with DECODING:
                    entry = self.decoded_cache.entry(
                        self._cache_key("labels"),
                        lambda writer: writer.add_array("labels", self._read_labels()),
                    )
                self._labels = np.asarray(entry.array("labels"), dtype=np.int64)
        return self._labels

    def _read_labels(self) -> npt.NDArray[np.int64]:
        return np.array(
            [dominant_class(self._read_mask_labels(i), self.num_classes) for i in range(len(self))],
            dtype=np.int64,
        )

    def _cache_key(self, kind: str, **more: object) -> dict[str, object]:
        return {
            "source": str(self.source.resolve()),
            "format": self.storage_format,
            "kind": kind,
            "class_names": self.class_names,
            "fingerprint": files_fingerprint([*self.image_paths, *self.mask_paths]),
            **more,
        }

    def _decoded_pairs(self, decoded_cache: DecodedCache) -> tuple[SampleArrays, SampleArrays]:
        if self._decoded is None:
            with DECODING:
                if self._decoded is None:
                    preprocessing = preprocessing_key(self.preprocessor)
                    key = self._cache_key("pairs", preprocessing=preprocessing)
                    entry = decoded_cache.entry(key, self._write_pairs)
                    self._failures = entry.failures()
                    self._decoded = entry.samples("images"), entry.samples("masks")
        return self._decoded

    def _write_pairs(self, writer: EntryWriter) -> None:
        # Masks hold class labels: stored in the narrowest integer type, read back as int64.
        mask_type = smallest_label_dtype(self.num_classes)
        for index in range(len(self)):
            try:
                image, labels = self._decode_pair(index)
            except SAMPLE_ERRORS as error:
                writer.add_failure(index, error)
                image, labels = np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
            writer.add_sample("images", image)
            writer.add_sample("masks", labels.astype(mask_type))

    def memory_bytes(self) -> int:
        """Bytes of decoded pairs this object holds in memory or maps from the decoded
        cache (see ClassificationDataset.memory_bytes)."""
        images, masks = self._decoded if self._decoded is not None else (None, None)
        mapped = images.nbytes + masks.nbytes if images is not None and masks is not None else 0
        return mapped + sum(image.nbytes + mask.nbytes for image, mask in self._cached.values())

    def _read_mask_labels(self, index: int) -> npt.NDArray[np.int64]:
        """A mask's labels, checked against its image's header (its pixels stay unread)."""
        image_path, mask_path = self.image_paths[index], self.mask_paths[index]
        check_volume_size(mask_path, self.max_voxels)
        header = read_header(image_path)
        shape = image_shape(image_path)
        # A DICOM series' or single slice's header does not give the grid that reading
        # the image does: read the image.
        if header is None or image_path.is_dir() or len(shape) != len(header.size):
            _, mask = self.raw_sample(index)
            return mask.array.astype(np.int64)
        check_volume_size(image_path, self.max_voxels)
        return check_mask(
            read_image(mask_path),
            image_shape=shape,
            image_spacing=header.spacing[: len(header.size)],
            image_path=image_path,
            mask_path=mask_path,
            class_names=self.class_names,
        )

    def _labels_of(self, image: ImageArray, mask: ImageArray, index: int) -> npt.NDArray[np.int64]:
        return check_mask(
            mask,
            image_shape=image.array.shape[: image.spatial_dims],
            image_spacing=image.spacing,
            image_path=self.image_paths[index],
            mask_path=self.mask_paths[index],
            class_names=self.class_names,
        )

    def raw_sample(self, index: int) -> tuple[ImageArray, ImageArray]:
        """The stored image and mask, checked against each other, not preprocessed."""
        image_path, mask_path = self.image_paths[index], self.mask_paths[index]
        check_volume_size(image_path, self.max_voxels)
        check_volume_size(mask_path, self.max_voxels)
        image, mask = read_image(image_path), read_image(mask_path)
        labels = self._labels_of(image, mask, index)
        checked = ImageArray(
            array=labels.astype(np.float32),
            spacing=mask.spacing,
            origin=mask.origin,
            direction=mask.direction,
        )
        return image, checked

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.decoded_cache is not None:
            images, masks = self._decoded_pairs(self.decoded_cache)
            failure = self._failures.get(index)
            if failure is not None:
                raise failure
            mask = torch.from_numpy(np.asarray(masks[index], dtype=np.int64))
            return torch.from_numpy(images[index]), mask
        pair = self._cached.get(index)
        if pair is None:
            pair = self.read_sample(index)
            if self.cache:
                self._cached[index] = pair
        return pair

    def read_sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``self[index]`` without the cache (a web process must not keep every image)."""
        image, labels = self._decode_pair(index)
        return torch.from_numpy(image), torch.from_numpy(labels)

    def _decode_pair(self, index: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        image, mask = self.raw_sample(index)
        size, spacing = self.preprocessor.size, self.preprocessor.spacing
        if size is not None or spacing is not None:
            mask = resample(mask, size=size, spacing=spacing, interpolator="nearest")
        labels = np.rint(mask.array).astype(np.int64)[np.newaxis]
        return self.preprocessor.array(image), np.ascontiguousarray(labels)

    def spacing(self, index: int) -> tuple[float, ...]:
        """Physical spacing of sample ``index`` after resampling, in mm and in array order
        ((z,) y, x) like the tensors, for distances such as HD95."""
        size, spacing = self.preprocessor.size, self.preprocessor.spacing
        if spacing is not None:
            return tuple(float(step) for step in reversed(spacing))
        header = read_header(self.image_paths[index])
        if header is None:  # no readable header (a single-slice DICOM folder): read it all
            image, _ = self.raw_sample(index)
            stored_spacing, stored_size = (
                image.spacing,
                image.array.shape[: image.spatial_dims][::-1],
            )
        else:
            stored_spacing, stored_size = header.spacing, header.size
        stored = np.asarray(stored_spacing, dtype=np.float64)
        if size is not None:
            stored = (
                stored
                * np.asarray(stored_size[: len(size)], dtype=np.float64)
                / np.asarray(size, dtype=np.float64)
            )
        return tuple(float(step) for step in stored[::-1])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one image tensor, channels first."""
        return tuple(self[0][0].shape)

    @property
    def in_channels(self) -> int:
        return self.sample_shape[0]

    @property
    def spatial_dims(self) -> int:
        return len(self.sample_shape) - 1
