"""Preprocessing: resampling, channel handling and intensity normalisation."""

import numpy as np
import pytest
import torch

from training.fl.data.preprocess import Preprocessor, normalize_intensity, resample, to_channels
from training.fl.data.readers import ImageArray

IDENTITY_2D = (1.0, 0.0, 0.0, 1.0)


def grey_image(shape: tuple[int, ...], spacing: tuple[float, ...]) -> ImageArray:
    dims = len(shape)
    rng = np.random.default_rng(0)
    return ImageArray(
        array=rng.normal(50, 10, shape).astype(np.float32),
        spacing=spacing,
        origin=(0.0,) * dims,
        direction=tuple(np.eye(dims).ravel()),
    )


def physical_centre(image: ImageArray) -> np.ndarray:
    dims = image.spatial_dims
    size = np.array(image.array.shape[:dims][::-1])
    direction = np.array(image.direction).reshape(dims, dims)
    return np.array(image.origin) + direction @ (np.array(image.spacing) * (size - 1) / 2)


def test_zscore_gives_zero_mean_and_unit_variance() -> None:
    values = np.random.default_rng(1).normal(300, 40, (16, 16)).astype(np.float32)
    normalised = normalize_intensity(values, "zscore")
    assert abs(float(normalised.mean())) < 1e-5
    assert float(normalised.std()) == pytest.approx(1.0, abs=1e-5)


def test_minmax_spans_zero_to_one() -> None:
    normalised = normalize_intensity(np.array([[-5.0, 0.0], [5.0, 15.0]], np.float32), "minmax")
    np.testing.assert_allclose(normalised, [[0.0, 0.25], [0.5, 1.0]])


def test_ct_window_clips_to_the_window_and_scales_to_unit_range() -> None:
    hounsfield = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0], np.float32)
    normalised = normalize_intensity(hounsfield, "ct-window", window_center=40, window_width=400)
    np.testing.assert_allclose(normalised, [0.0, 0.0, 0.5, 1.0, 1.0])


@pytest.mark.parametrize("method", ["zscore", "minmax"])
def test_constant_image_normalises_to_zeros_not_nan(method: str) -> None:
    normalised = normalize_intensity(np.full((4, 4), 7.0, np.float32), method)
    assert np.array_equal(normalised, np.zeros((4, 4), np.float32))


def test_unknown_normalization_is_rejected_listing_the_known_ones() -> None:
    with pytest.raises(ValueError, match="zscore"):
        normalize_intensity(np.zeros(3, np.float32), "histogram")


def test_resample_to_size_keeps_the_field_of_view() -> None:
    # Given a 40x20 image (x by y) of 0.5 x 1.0 mm pixels
    image = grey_image((20, 40), (0.5, 1.0))
    # When it is resampled onto 20x10 pixels
    resampled = resample(image, size=(20, 10))
    # Then pixels are twice as large and the image centre has not moved
    assert resampled.array.shape == (10, 20)
    np.testing.assert_allclose(resampled.spacing, (1.0, 2.0))
    np.testing.assert_allclose(physical_centre(resampled), physical_centre(image))


def test_resample_to_size_and_spacing_centres_the_new_grid() -> None:
    image = grey_image((6, 30, 30), (1.0, 1.0, 3.0))
    resampled = resample(image, size=(16, 16, 8), spacing=(1.5, 1.5, 1.5))
    assert resampled.array.shape == (8, 16, 16)
    np.testing.assert_allclose(resampled.spacing, (1.5, 1.5, 1.5))
    np.testing.assert_allclose(physical_centre(resampled), physical_centre(image))


def test_resample_rejects_a_size_of_the_wrong_dimension() -> None:
    with pytest.raises(ValueError, match="size must be 2"):
        resample(grey_image((8, 8), (1.0, 1.0)), size=(4, 4, 4))


def test_grey_to_three_channels_repeats_the_image() -> None:
    image = grey_image((5, 7), (1.0, 1.0))
    channels = to_channels(image, 3)
    assert channels.shape == (3, 5, 7)
    assert all(np.array_equal(channels[c], image.array) for c in range(3))


def test_rgb_to_one_channel_uses_luma_weights() -> None:
    rgb = np.zeros((2, 2, 3), np.float32)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100.0, 200.0, 50.0
    image = ImageArray(array=rgb, spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=IDENTITY_2D)
    grey = to_channels(image, 1)
    np.testing.assert_allclose(grey, np.full((1, 2, 2), 0.299 * 100 + 0.587 * 200 + 0.114 * 50))


def test_rgba_keeps_three_colour_channels_and_drops_alpha() -> None:
    rgba = np.random.default_rng(0).uniform(0, 255, (4, 4, 4)).astype(np.float32)
    image = ImageArray(array=rgba, spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=IDENTITY_2D)
    channels = to_channels(image)
    np.testing.assert_array_equal(channels, np.moveaxis(rgba[..., :3], -1, 0))


def test_preprocessor_makes_channels_first_float_tensors_of_the_target_size() -> None:
    preprocess = Preprocessor(size=(32, 24), channels=3)
    tensor = preprocess(grey_image((50, 70), (0.8, 0.8)))
    assert tensor.dtype == torch.float32
    assert tensor.shape == (3, 24, 32)
    assert abs(float(tensor.mean())) < 1e-4  # z-scored by default


def test_preprocessor_handles_volumes() -> None:
    tensor = Preprocessor(size=(16, 16, 8), normalization="minmax")(
        grey_image((10, 20, 20), (1.0, 1.0, 2.0))
    )
    assert tensor.shape == (1, 8, 16, 16)
    assert float(tensor.min()) >= 0.0
    assert float(tensor.max()) <= 1.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"normalization": "ct-window"}, "window_width"),
        ({"normalization": "ct-window", "window_center": 40, "window_width": 0}, "window_width"),
        ({"normalization": "gamma"}, "unknown normalization"),
        ({"channels": 2}, "channels"),
        ({"size": (0, 4)}, "size"),
    ],
)
def test_preprocessor_rejects_invalid_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Preprocessor(**options)  # type: ignore[arg-type]
