"""Image readers: every supported format round-trips pixels and geometry."""

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from training.fl.data.readers import (
    ImageArray,
    ImageReadError,
    image_shape,
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


def test_write_rejects_an_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        write_image(make_image(2), tmp_path / "image.nii", dtype="int64")


# --- Truncated and corrupt files, refused with the file named -------------------------------


def write_volume(path: Path) -> ImageArray:
    image = make_image(3)
    write_image(image, path)
    return image


@pytest.mark.parametrize("name", ["scan.nii", "scan.nii.gz"])
def test_truncated_nifti_is_refused_instead_of_read_as_zeros(tmp_path: Path, name: str) -> None:
    # Given a NIfTI file cut in the middle of its voxel data (ITK pads it with zeros)
    path = tmp_path / name
    write_volume(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    # When it is read, or its shape asked for, then both refuse it naming the file
    named = re.escape(name)
    with pytest.raises(ImageReadError, match=f"{named}: .*truncated"):
        read_image(path)
    with pytest.raises(ImageReadError, match=named):
        image_shape(path)


def test_nii_gz_whose_data_ends_early_inside_a_complete_gzip_stream_is_refused(
    tmp_path: Path,
) -> None:
    # Given a .nii.gz whose gzip stream is intact but holds fewer bytes than its header says
    plain = tmp_path / "scan.nii"
    write_volume(plain)
    data = plain.read_bytes()
    path = tmp_path / "short.nii.gz"
    path.write_bytes(gzip.compress(data[: len(data) - 100]))
    # Then it is refused, saying how many bytes it holds of how many
    with pytest.raises(
        ImageReadError, match=rf"short\.nii\.gz: truncated: holds {len(data) - 100} "
    ):
        read_image(path)


def test_nii_gz_with_a_corrupted_byte_is_refused(tmp_path: Path) -> None:
    # Given a .nii.gz with one byte of its compressed stream changed (CRC no longer matches)
    path = tmp_path / "scan.nii.gz"
    write_volume(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match=r"scan\.nii\.gz: .*(truncated or corrupt|cannot)"):
        read_image(path)


def test_truncated_png_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = write_image(make_image(2, integer=True, low=0, high=255), tmp_path / "xray.png")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"xray\.png: cannot read image"):
        read_image(path)


def test_truncated_dicom_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = write_image(make_image(2, integer=True), tmp_path / "slice.dcm")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ImageReadError, match=r"slice\.dcm: cannot read image"):
        read_image(path)


# --- DICOM files named without .dcm --------------------------------------------------------


@pytest.mark.parametrize("name", ["IM0001", "1.2.840.113619.2.55.3.12"])
def test_dicom_file_without_its_extension_is_read_by_its_marker(tmp_path: Path, name: str) -> None:
    # Given a DICOM file named as scanners and PACS exports name them (no .dcm)
    image = make_image(2, integer=True)
    write_image(image, tmp_path / "slice.dcm").rename(tmp_path / name)
    # When it is read, then it is read as DICOM (the "DICM" marker at byte 128)
    assert_same_image(read_image(tmp_path / name), image)
    assert image_shape(tmp_path / name) == (12, 10)


def test_file_without_extension_that_is_not_dicom_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes"
    path.write_bytes(b"x" * 300)
    with pytest.raises(
        ImageReadError, match=r"notes: unsupported extension '\(none\)'.*DICOM file"
    ):
        read_image(path)


# --- 4D NIfTI: one volume, chosen -----------------------------------------------------------


def write_four_dimensional(path: Path) -> np.ndarray:
    """Three volumes of 5 x 4 x 3 (x, y, z), each filled with its own index plus a ramp."""
    volumes = np.stack(
        [np.arange(60, dtype=np.float32).reshape(3, 4, 5) + 100 * t for t in range(3)]
    )
    sitk.WriteImage(sitk.GetImageFromArray(volumes, isVector=False), str(path))
    return volumes


def test_four_dimensional_nifti_without_a_chosen_volume_says_how_to_choose(
    tmp_path: Path,
) -> None:
    path = tmp_path / "timeseries.nii.gz"
    write_four_dimensional(path)
    with pytest.raises(ImageReadError, match=r"timeseries\.nii\.gz: is 4D with 3 volumes.*#N"):
        read_image(path)
    with pytest.raises(ImageReadError, match="is 4D with 3 volumes"):
        image_shape(path)


@pytest.mark.parametrize("how", ["suffix", "keyword"])
def test_volume_of_a_four_dimensional_nifti_is_read_when_chosen(tmp_path: Path, how: str) -> None:
    # Given a 4D NIfTI of three volumes
    path = tmp_path / "timeseries.nii.gz"
    volumes = write_four_dimensional(path)
    # When volume 2 is chosen, by a "#2" suffix or the keyword
    image = read_image(f"{path}#2") if how == "suffix" else read_image(path, volume=2)
    # Then that volume is read as a 3D image, and its shape is what the viewer lists
    assert image.spatial_dims == 3
    np.testing.assert_array_equal(image.array, volumes[2])
    assert image_shape(f"{path}#2") == (3, 4, 5)


def test_volume_past_the_last_is_refused_naming_the_range(tmp_path: Path) -> None:
    path = tmp_path / "timeseries.nii"
    write_four_dimensional(path)
    with pytest.raises(
        ImageReadError, match=r"timeseries\.nii: has volumes 0 to 2; there is no volume 3"
    ):
        read_image(f"{path}#3")


def test_volume_of_a_three_dimensional_image_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scan.nii.gz"
    write_volume(path)
    with pytest.raises(ImageReadError, match=r"scan\.nii\.gz: is 3D and has no volumes"):
        read_image(f"{path}#0")


# --- NIfTI-2 --------------------------------------------------------------------------------


def nifti1_as_nifti2(data: bytes) -> bytes:
    """A little-endian single-file NIfTI-1 rewritten with the NIfTI-2 header (540 bytes,
    64-bit dims and offsets, doubles), data moved to offset 544: the layout of the
    NIfTI-2 specification, written field by field."""
    assert struct.unpack_from("<i", data)[0] == 348

    def field(fmt: str, offset: int) -> tuple:
        return struct.unpack_from("<" + fmt, data, offset)

    intent_code, datatype, bitpix, slice_start = field("4h", 68)
    header = (
        struct.pack("<i", 540)
        + b"n+2\x00\r\n\x1a\n"
        + struct.pack("<2h", datatype, bitpix)
        + struct.pack("<8q", *field("8h", 40))
        + struct.pack("<3d", *field("3f", 56))
        + struct.pack("<8d", *field("8f", 76))
        + struct.pack("<q", 544)
        + struct.pack("<6d", *field("2f", 112), *field("4f", 124))
        + struct.pack("<2q", slice_start, field("h", 120)[0])
        + data[148:252]  # descrip, aux_file
        + struct.pack("<2i", *field("2h", 252))
        + struct.pack("<6d", *field("6f", 256))
        + struct.pack("<12d", *field("12f", 280))
        + struct.pack("<3i", data[122], data[123], intent_code)
        + data[328:344]
        + bytes(16)
    )
    assert len(header) == 540
    vox_offset = int(field("f", 108)[0])
    return header + bytes(4) + data[vox_offset:]


@pytest.mark.parametrize("compressed", [False, True])
def test_nifti2_file_is_read_with_its_values_and_geometry(tmp_path: Path, compressed: bool) -> None:
    # Given a 3D NIfTI-2 file (the NIfTI-1 one SimpleITK writes, with its header rewritten)
    image = make_image(3)
    plain = write_image(image, tmp_path / "nifti1.nii")
    converted = nifti1_as_nifti2(plain.read_bytes())
    path = tmp_path / ("nifti2.nii.gz" if compressed else "nifti2.nii")
    path.write_bytes(gzip.compress(converted) if compressed else converted)
    # When it is read, then values and geometry are those of the original
    assert_same_image(read_image(path), image)
    assert image_shape(path) == (5, 12, 10)


def test_truncated_nifti2_is_refused(tmp_path: Path) -> None:
    plain = write_image(make_image(3), tmp_path / "nifti1.nii")
    converted = nifti1_as_nifti2(plain.read_bytes())
    path = tmp_path / "nifti2.nii"
    path.write_bytes(converted[:-50])
    with pytest.raises(ImageReadError, match=r"nifti2\.nii: truncated"):
        read_image(path)
