"""The global CPU generator under threads: seeded builds and training give what they give
alone, whatever trains beside them (training.fl.randomness)."""

import hashlib
import threading

import torch
from torch import nn
from torch.utils.data import TensorDataset

from training.fl.local import TrainConfig, train_local
from training.fl.networks import build_network
from training.fl.randomness import draws_random_numbers


def fingerprint(network: nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in network.state_dict().values():
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def small_network(dropout: float) -> nn.Module:
    network = build_network("cnn-small", in_channels=1, num_classes=2, spatial_dims=2, seed=1)
    return nn.Sequential(nn.Dropout(dropout), network) if dropout else network


def trained(dropout: float, data: TensorDataset) -> str:
    network = small_network(dropout)
    train_local(network, data, range(len(data)), TrainConfig(batch_size=8, lr=0.1, seed=5))
    return fingerprint(network)


def test_only_networks_that_drop_something_count_as_drawing_random_numbers():
    small = build_network("cnn-small", in_channels=1, num_classes=2, spatial_dims=2)

    assert draws_random_numbers(small) is False
    assert draws_random_numbers(nn.Sequential(small, nn.Dropout(0.0))) is False
    assert draws_random_numbers(nn.Sequential(small, nn.Dropout2d(0.2))) is True


def test_builds_and_training_beside_other_training_threads_give_what_they_give_alone():
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 16, 16, generator=generator),
                         torch.randint(0, 2, (64,), generator=generator))  # fmt: skip
    seeded = build_network("cnn-small", in_channels=1, num_classes=2, spatial_dims=2, seed=3)
    alone = {
        "build": fingerprint(seeded),
        "plain": trained(0.0, data),
        "dropout": trained(0.5, data),
    }
    seen: dict[str, set[str]] = {name: set() for name in alone}

    def keep_training(dropout: float, name: str) -> None:
        for _ in range(6):
            seen[name].add(trained(dropout, data))

    threads = [
        threading.Thread(target=keep_training, args=(0.0, "plain")),
        threading.Thread(target=keep_training, args=(0.5, "dropout")),
    ]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        built = build_network("cnn-small", in_channels=1, num_classes=2, spatial_dims=2, seed=3)
        seen["build"].add(fingerprint(built))
    for thread in threads:
        thread.join()

    assert seen == {name: {value} for name, value in alone.items()}
