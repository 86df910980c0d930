"""Network registry: classification networks map inputs to (N, num_classes) logits,
segmentation networks to per-voxel logits (N, num_classes, *spatial)."""

import pytest
import torch

from training.fl.networks import (
    available_networks,
    build_network,
    check_input_shape,
    network_task,
    spatial_divisor,
)


def test_available_networks_lists_the_registered_networks() -> None:
    assert available_networks() == [
        "basicunet",
        "cnn-small",
        "cnn3d-small",
        "densenet121",
        "resnet18-small",
        "segresnet",
        "unet",
    ]


@pytest.mark.parametrize(
    ("name", "task"),
    [
        ("unet", "segmentation"),
        ("basicunet", "segmentation"),
        ("segresnet", "segmentation"),
        ("densenet121", "classification"),
        ("cnn-small", "classification"),
    ],
)
def test_network_task_says_what_each_network_learns(name: str, task: str) -> None:
    assert network_task(name) == task


@pytest.mark.parametrize("name", ["unet", "basicunet", "segresnet"])
@pytest.mark.parametrize(("spatial_dims", "size"), [(2, (32, 48)), (3, (32, 16, 16))])
def test_segmentation_network_gives_per_voxel_logits_of_the_input_shape(
    name: str, spatial_dims: int, size: tuple[int, ...]
) -> None:
    # Given a segmentation network for 3 classes (background included)
    model = build_network(name, in_channels=2, num_classes=3, spatial_dims=spatial_dims, seed=0)
    # When a batch of 2 goes through it
    logits = model(torch.randn(2, 2, *size))
    # Then every voxel gets 3 logits
    assert logits.shape == (2, 3, *size)
    assert model.spatial_divisor == spatial_divisor(name)


def test_unet_parameters_set_its_levels_and_the_divisor_they_need() -> None:
    model = build_network(
        "unet", in_channels=1, num_classes=2, spatial_dims=2, channels=[8, 16], strides=[4]
    )
    assert model.spatial_divisor == 4
    assert model(torch.randn(1, 1, 12, 20)).shape == (1, 2, 12, 20)


def test_densenet121_classifies_3d_volumes() -> None:
    model = build_network(
        "densenet121", in_channels=1, num_classes=4, spatial_dims=3, seed=0, init_features=8,
        growth_rate=4,
    )  # fmt: skip
    assert model(torch.randn(2, 1, 32, 32, 32)).shape == (2, 4)


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("unet", (36, 32), r"multiple of 8.*\[36\].*\[32, 32\]"),
        ("basicunet", (16, 16, 16), r"single voxel.*at least 32"),
        ("segresnet", (64, 60), r"multiple of 8"),
        ("densenet121", (28, 28), r"at least 32"),
    ],
)
def test_input_shape_a_network_cannot_take_is_refused_saying_what_fits(
    name: str, shape: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_input_shape(name, shape)


def test_input_shapes_that_fit_pass() -> None:
    check_input_shape("unet", (64, 64, 32))
    check_input_shape("basicunet", (32, 16))
    check_input_shape("cnn-small", (28, 28))


@pytest.mark.parametrize("name", ["cnn-small", "resnet18-small"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(28, 28), (64, 48)])
def test_2d_network_forward_gives_one_logit_row_per_image(
    name: str, channels: int, size: tuple[int, int]
) -> None:
    # Given a 2D network for 5 classes
    model = build_network(name, in_channels=channels, num_classes=5, seed=0)
    # When a batch of 3 images goes through it
    logits = model(torch.randn(3, channels, *size))
    # Then there is one row of 5 logits per image
    assert logits.shape == (3, 5)


@pytest.mark.parametrize("name", ["cnn3d-small", "resnet18-small"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(8, 8, 8), (16, 12, 20)])
def test_3d_network_forward_gives_one_logit_row_per_volume(
    name: str, channels: int, size: tuple[int, int, int]
) -> None:
    model = build_network(name, in_channels=channels, num_classes=2, spatial_dims=3, seed=0)
    logits = model(torch.randn(2, channels, *size))
    assert logits.shape == (2, 2)


def test_unknown_network_name_is_rejected_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"cnn-small.*resnet18-small"):
        build_network("vgg99", in_channels=1, num_classes=2)


def test_unknown_network_parameter_is_rejected_naming_accepted_ones() -> None:
    with pytest.raises(ValueError, match=r"depth.*accepted.*width"):
        build_network("resnet18-small", in_channels=1, num_classes=2, depth=50)


def test_resnet_width_parameter_changes_the_channel_count() -> None:
    narrow = build_network("resnet18-small", in_channels=1, num_classes=2, width=8)
    wide = build_network("resnet18-small", in_channels=1, num_classes=2, width=16)
    assert narrow.stem[0].out_channels == 8
    assert wide.stem[0].out_channels == 16


@pytest.mark.parametrize(("name", "spatial_dims"), [("cnn-small", 3), ("cnn3d-small", 2)])
def test_network_rejects_unsupported_spatial_dims(name: str, spatial_dims: int) -> None:
    with pytest.raises(ValueError, match="spatial_dims"):
        build_network(name, in_channels=1, num_classes=2, spatial_dims=spatial_dims)


def test_single_class_head_is_rejected() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_network("cnn-small", in_channels=1, num_classes=1)


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone() -> None:
    # Given the global RNG state before building
    state = torch.get_rng_state()
    # When the same network is built twice with one seed and once with another
    first = build_network("cnn-small", in_channels=1, num_classes=2, seed=7).state_dict()
    second = build_network("cnn-small", in_channels=1, num_classes=2, seed=7).state_dict()
    other = build_network("cnn-small", in_channels=1, num_classes=2, seed=8).state_dict()
    # Then equal seeds give equal weights, different seeds differ, and the RNG is untouched
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["classifier.1.weight"], other["classifier.1.weight"])
    assert torch.equal(torch.get_rng_state(), state)
