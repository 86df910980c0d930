"""Network registry: every network builds and maps inputs to (N, num_classes) logits."""

import pytest
import torch

from training.fl.networks import available_networks, build_network


def test_available_networks_lists_the_three_registered_networks() -> None:
    assert available_networks() == ["cnn-small", "cnn3d-small", "resnet18-small"]


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
