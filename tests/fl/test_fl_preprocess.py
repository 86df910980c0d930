"""Preprocessing: resampling, channel handling and intensity normalisation."""

import statistics

import numpy as np
import pytest
import torch

from training.fl.data.preprocess import (
    NormalizationError,
    Preprocessor,
    check_normalization,
    normalize_intensity,
    parse_normalization,
    resample,
    to_channels,
)
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
    normalised = normalize_intensity(hounsfield, "ct-window:40,400")
    np.testing.assert_allclose(normalised, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_mean_std_with_one_pair_applies_it_to_every_pixel() -> None:
    # MedMNIST's convention on pixels already scaled to [0, 1]: [0, 1] becomes [-1, 1].
    pixels = np.array([[[0.0, 0.25], [0.5, 1.0]]], np.float32)
    normalised = normalize_intensity(pixels, "mean-std:0.5,0.5")
    np.testing.assert_allclose(normalised, [[[-1.0, -0.5], [0.0, 1.0]]])


def test_mean_std_per_channel_uses_each_channels_own_mean_and_std() -> None:
    # Given a 3-channel image and ImageNet's per-channel statistics
    means, stds = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    image = np.random.default_rng(2).uniform(0, 1, (3, 4, 5)).astype(np.float32)
    # When it is normalised
    normalised = normalize_intensity(image, "mean-std:0.485,0.456,0.406/0.229,0.224,0.225")
    # Then every pixel of channel c is (x - mean[c]) / std[c]
    for channel in range(3):
        for row in range(4):
            for column in range(5):
                pixel = float(image[channel, row, column])
                expected = (pixel - means[channel]) / stds[channel]
                assert float(normalised[channel, row, column]) == pytest.approx(expected, abs=1e-5)


def test_mean_std_may_share_one_mean_between_per_channel_stds() -> None:
    image = np.ones((3, 2, 2), np.float32)
    normalised = normalize_intensity(image, "mean-std:0.5/0.5,0.25,0.1")
    np.testing.assert_allclose(normalised[:, 0, 0], [1.0, 2.0, 5.0], rtol=1e-6)


def test_per_channel_values_refuse_an_image_with_another_channel_count() -> None:
    with pytest.raises(NormalizationError, match="3 values per channel but the image has 1"):
        normalize_intensity(np.zeros((1, 4, 4), np.float32), "mean-std:0.1,0.2,0.3/1")


@pytest.mark.parametrize("spec", ["zscore", "minmax"])
def test_per_image_normalizations_of_a_batch_treat_each_image_alone(spec: str) -> None:
    # Given two images of very different intensity ranges
    rng = np.random.default_rng(3)
    batch = np.stack([rng.normal(10, 2, (1, 6, 6)), rng.normal(900, 300, (1, 6, 6))])
    # When the batch is normalised
    normalised = parse_normalization(spec).batch(batch.astype(np.float32))
    # Then each image is normalised with its own statistics, computed here with Python's own
    for image, result in zip(batch, normalised, strict=True):
        values = [float(v) for v in image.astype(np.float32).ravel()]
        if spec == "zscore":
            mean, std = statistics.fmean(values), statistics.pstdev(values)
            expected = [(v - mean) / std for v in values]
        else:
            low, high = min(values), max(values)
            expected = [(v - low) / (high - low) for v in values]
        np.testing.assert_allclose(result.ravel(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "spec", ["none", "zscore", "minmax", "mean-std:0.2,0.4/0.5,2", "ct-window:0.5,0.5"]
)
def test_a_batch_normalises_like_its_images_one_by_one(spec: str) -> None:
    batch = np.random.default_rng(4).uniform(0, 1, (3, 2, 5, 5)).astype(np.float32)
    normalization = parse_normalization(spec)
    np.testing.assert_allclose(
        normalization.batch(batch), np.stack([normalization(image) for image in batch])
    )


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("none", "none"),
        (" ZScore ", "zscore"),
        ("minmax", "minmax"),
        ("mean-std:0.5,0.5", "mean-std:0.5,0.5"),
        (
            "mean-std: 0.485, 0.456, 0.406 / 0.229, 0.224, 0.225",
            "mean-std:0.485,0.456,0.406/0.229,0.224,0.225",
        ),
        ("mean-std:0.5/0.25", "mean-std:0.5,0.25"),
        ("ct-window:40,400", "ct-window:40,400"),
        ("ct-window:-600,1500.5", "ct-window:-600,1500.5"),
    ],
)
def test_valid_specs_parse_to_their_canonical_text(spec: str, canonical: str) -> None:
    assert parse_normalization(spec).spec == canonical
    assert parse_normalization(canonical) == parse_normalization(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "the normalization is empty; use one of none, minmax, zscore"),
        ("histogram", "unknown normalization 'histogram'; use one of none, minmax, zscore"),
        ("zscore:1", "zscore takes no values: write just 'zscore'"),
        ("mean-std", "mean-std needs its numbers: write mean-std:M,S"),
        ("mean-std:0.5", "takes a mean and a standard deviation .mean-std:M,S., got 1 numbers"),
        ("mean-std:0.4,0.5,0.6,0.2,0.2,0.2", "separate the means from the standard deviations"),
        ("mean-std:0.5,abc", "mean-std: 'abc' is not a number; write e.g. mean-std:0.5,0.5"),
        ("mean-std:nan,1", "'nan' is not a finite number"),
        ("mean-std:0.5,0", "standard deviations must be positive, got 0"),
        ("mean-std:0.1,0.2,0.3/0.5,0.6", "3 means but 2 standard deviations"),
        ("mean-std:0.1/0.2/0.3", "use one '/' between the means and the standard deviations"),
        ("ct-window", "ct-window needs its numbers: write ct-window:LEVEL,WIDTH"),
        ("ct-window:40", "ct-window takes a level and a width .ct-window:LEVEL,WIDTH., got 1"),
        ("ct-window:40,-400", "the width must be positive, got -400"),
    ],
)
def test_invalid_specs_are_refused_saying_what_to_write(spec: str, message: str) -> None:
    with pytest.raises(NormalizationError, match=message):
        parse_normalization(spec)


def test_check_normalization_keeps_blank_and_checks_per_channel_counts() -> None:
    assert check_normalization("  ") == ""
    assert check_normalization("mean-std:0.1,0.2,0.3/0.5", channels=3) == (
        "mean-std:0.1,0.2,0.3/0.5"
    )
    with pytest.raises(NormalizationError, match="gives 3 means but the images have 1 channel"):
        check_normalization("mean-std:0.1,0.2,0.3/0.5", channels=1)


@pytest.mark.parametrize("method", ["zscore", "minmax"])
def test_constant_image_normalises_to_zeros_not_nan(method: str) -> None:
    normalised = normalize_intensity(np.full((4, 4), 7.0, np.float32), method)
    assert np.array_equal(normalised, np.zeros((4, 4), np.float32))


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
    assert float(tensor.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


def test_preprocessor_applies_a_per_channel_mean_std_to_colour_images() -> None:
    rgb = np.zeros((2, 3, 3), np.float32)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10.0, 20.0, 30.0
    image = ImageArray(array=rgb, spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=IDENTITY_2D)
    tensor = Preprocessor(normalization="mean-std:10,10,20/1,5,2")(image)
    np.testing.assert_allclose(tensor[:, 0, 0].numpy(), [0.0, 2.0, 5.0])


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
        ({"normalization": "ct-window"}, "LEVEL,WIDTH"),
        ({"normalization": "ct-window:40,0"}, "width must be positive"),
        ({"normalization": "gamma"}, "unknown normalization"),
        ({"normalization": "mean-std:0.1,0.2,0.3/1", "channels": 1}, "3 means"),
        ({"channels": 2}, "channels"),
        ({"size": (0, 4)}, "size"),
    ],
)
def test_preprocessor_rejects_invalid_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Preprocessor(**options)  # type: ignore[arg-type]
