"""Image readers: every supported format round-trips pixels and geometry."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from training.fl.data.readers import (
    ImageArray,
    ImageReadError,
    read_image,
    write_dicom_series,
    write_image,
)

# A 90-degree in-plane rotation, so a reader that drops the direction is caught.
ROTATED_2D = (0.0, -1.0, 1.0, 0.0)
ROTATED_3D = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def make_image(
    dims: int, *, integer: bool = False, low: int = -500, high: int = 1500
) -> ImageArray:
    rng = np.random.default_rng(dims)
    shape = (12, 10) if dims == 2 else (5, 12, 10)
    array = rng.uniform(low, high, shape).astype(np.float32)
    if integer:
        array = np.rint(array).astype(np.float32)
    return ImageArray(
        array=array,
        spacing=(0.5, 0.75) if dims == 2 else (0.5, 0.75, 2.5),
        origin=(3.0, -4.0) if dims == 2 else (3.0, -4.0, 12.0),
        direction=ROTATED_2D if dims == 2 else ROTATED_3D,
    )


def assert_same_image(actual: ImageArray, expected: ImageArray) -> None:
    np.testing.assert_array_equal(actual.array, expected.array)
    np.testing.assert_allclose(actual.spacing, expected.spacing, rtol=1e-6)
    np.testing.assert_allclose(actual.origin, expected.origin, atol=1e-5)
    np.testing.assert_allclose(actual.direction, expected.direction, atol=1e-6)


def stored_dicom_position(path: Path) -> str:
    """ImagePositionPatient as written in the file; GDCM can otherwise fill in geometry it
    remembers from an earlier write in the same process, hiding a file that lacks it."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    # DICOM pads odd-length values with a space.
    return reader.GetMetaData("0020|0032").strip() if reader.HasMetaDataKey("0020|0032") else ""


@pytest.mark.parametrize("extension", [".nii", ".nii.gz", ".mha", ".mhd", ".nrrd"])
@pytest.mark.parametrize("dims", [2, 3])
def test_volume_formats_round_trip_values_and_geometry(
    tmp_path: Path, extension: str, dims: int
) -> None:
    # Given a float image with non-trivial spacing, origin and direction
    image = make_image(dims)
    # When it is written and read back
    restored = read_image(write_image(image, tmp_path / f"image{extension}"))
    # Then pixels and geometry are unchanged
    assert restored.array.dtype == np.float32
    assert_same_image(restored, image)


def test_png_round_trips_uint8_values(tmp_path: Path) -> None:
    image = make_image(2, integer=True, low=0, high=255)
    restored = read_image(write_image(image, tmp_path / "image.png"))
    np.testing.assert_array_equal(restored.array, image.array)
    assert restored.channels == 1


def test_png_round_trips_rgb_as_three_components(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (8, 9, 3)).astype(np.float32)
    image = ImageArray(array=rgb, spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=(1, 0, 0, 1))
    restored = read_image(write_image(image, tmp_path / "rgb.png"))
    assert restored.channels == 3
    np.testing.assert_array_equal(restored.array, rgb)


def test_png_rejects_values_that_do_not_fit_its_integer_type(tmp_path: Path) -> None:
    image = make_image(2, low=-10, high=10)
    with pytest.raises(ValueError, match="do not fit"):
        write_image(image, tmp_path / "image.png")


def test_single_dicom_file_round_trips_a_2d_slice(tmp_path: Path) -> None:
    # Given a 2D integer image (DICOM stores integers)
    image = make_image(2, integer=True)
    # When it is written as one .dcm file and read back
    restored = read_image(write_image(image, tmp_path / "slice.dcm"))
    # Then it comes back 2D with values, spacing, origin and direction intact
    assert stored_dicom_position(tmp_path / "slice.dcm") == "3\\-4\\0"
    assert restored.spatial_dims == 2
    assert_same_image(restored, image)


def test_dicom_series_folder_round_trips_a_volume(tmp_path: Path) -> None:
    # Given a 3D integer volume written as one DICOM file per slice
    image = make_image(3, integer=True)
    files = write_dicom_series(image, tmp_path / "series")
    assert len(files) == 5
    assert stored_dicom_position(files[-1]) == "3\\-4\\22"
    # When the folder is read
    restored = read_image(tmp_path / "series")
    # Then slices are stacked in order with the volume's geometry
    assert_same_image(restored, image)


def test_folder_without_dicom_series_raises_naming_the_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="empty: no DICOM series"):
        read_image(tmp_path / "empty")


@pytest.mark.parametrize(
    "name", ["broken.nii.gz", "broken.nii", "broken.mha", "broken.nrrd", "broken.png", "broken.dcm"]
)
def test_corrupt_file_raises_image_read_error_naming_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"this is not an image" * 20)
    with pytest.raises(ImageReadError, match=name.replace(".", r"\.")) as caught:
        read_image(path)
    assert isinstance(caught.value, ValueError)


def test_unsupported_extension_raises_listing_the_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "scan.jpg"
    path.write_bytes(b"\xff\xd8\xff")
    with pytest.raises(ImageReadError, match=r"scan\.jpg.*unsupported.*\.nii\.gz.*\.dcm.*\.png"):
        read_image(path)


def test_missing_file_raises_image_read_error(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=r"absent\.nii: no such file"):
        read_image(tmp_path / "absent.nii")


def test_image_array_rejects_geometry_of_the_wrong_dimension() -> None:
    with pytest.raises(ValueError, match="origin and direction"):
        ImageArray(
            array=np.zeros((4, 4), np.float32),
            spacing=(1, 1),
            origin=(0, 0, 0),
            direction=(1, 0, 0, 1),
        )


def test_four_dimensional_image_is_rejected_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "timeseries.nii.gz"
    sitk.WriteImage(sitk.Image([5, 4, 3, 2], sitk.sitkFloat32), str(path))
    with pytest.raises(ImageReadError, match=r"timeseries\.nii\.gz: only 2D and 3D"):
        read_image(path)


def test_write_rejects_an_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        write_image(make_image(2), tmp_path / "image.nii", dtype="int64")
