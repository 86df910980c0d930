"""A poisoned site against robust aggregation, through the pure engine (no Django).

Five clients train cnn-small on an iid split of the synthetic lesion set (5 scanners, 120
images of 32x32 each, a stratified quarter held out). Client 2 is poisoned: in every round
it sends ``start + (-10) * (trained - start)`` for every floating-point tensor, where
``start`` is the round's global weights and ``trained`` what its honest training
produced: its update scaled by -10. Its site state and report are an honest client's.
"""

from __future__ import annotations

import pytest
import torch

from training.fl.data import generate_synthetic_dataset
from training.fl.data.datasets import ImageFolderDataset
from training.fl.data.partition import holdout_split, partition_indices
from training.fl.local import TrainConfig
from training.fl.networks import build_network
from training.fl.simulation import run_simulation, scaled_update
from training.fl.strategies import build_strategy

CPU = torch.device("cpu")
CONFIG = TrainConfig(epochs=1, batch_size=16, lr=0.003, optimizer="adam", seed=1)
ROUNDS = 3
POISONED_CLIENT = 2


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    folder = generate_synthetic_dataset(
        tmp_path_factory.mktemp("poisoned"), sites=5, per_site=120, size=32, seed=3
    )
    dataset = ImageFolderDataset(folder)
    kept, held_out = holdout_split(dataset.labels, fraction=0.25, seed=0)
    kept_list = [int(index) for index in kept]
    parts = partition_indices("iid", labels=dataset.labels[kept_list], num_clients=5, seed=0)
    partitions = [[kept_list[i] for i in part] for part in parts]
    return dataset, partitions, [int(index) for index in held_out]


def final_accuracy(federation, strategy: str, *, poisoned: bool, **params: object) -> float:
    dataset, partitions, held_out = federation
    result = run_simulation(
        model=build_network("cnn-small", in_channels=1, num_classes=2, seed=0),
        dataset=dataset,
        partitions=partitions,
        rounds=ROUNDS,
        config=CONFIG,
        strategy=build_strategy(strategy, **params),
        eval_dataset=dataset,
        eval_indices=held_out,
        device=CPU,
        attacks={POISONED_CLIENT: scaled_update(-10.0)} if poisoned else None,
    )
    metrics = result.rounds[-1].eval_metrics
    assert metrics is not None
    return float(metrics["accuracy"])


def test_a_site_sending_its_update_scaled_by_minus_ten_ruins_fedavg_but_not_robust_strategies(
    federation,
) -> None:
    # Given FedAvg learns the task from five honest clients (about 0.8 here)
    assert final_accuracy(federation, "fedavg", poisoned=False) >= 0.7
    # When one client of five sends its update scaled by -10, FedAvg collapses to a
    # constant answer: at most the majority class's share of the held-out set (0.56)
    assert final_accuracy(federation, "fedavg", poisoned=True) <= 0.6
    # While the median, the trimmed mean and Krum keep learning
    assert final_accuracy(federation, "fedmedian", poisoned=True) >= 0.7
    assert final_accuracy(federation, "fedtrimmedavg", poisoned=True, beta=0.2) >= 0.7
    assert final_accuracy(federation, "krum", poisoned=True, f=1) >= 0.7


def test_scaled_update_moves_floating_entries_and_keeps_counters() -> None:
    start = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    trained = {"w": torch.tensor([1.5, 1.0]), "n": torch.tensor(4)}
    sent = scaled_update(-10.0)(start, trained)
    assert torch.equal(sent["w"], torch.tensor([-4.0, 12.0]))
    assert torch.equal(sent["n"], torch.tensor(4))


class ImagesWithBrokenRows(torch.utils.data.Dataset):
    """Random 1x32x32 images; rows from ``broken`` on are NaN, so training on them diverges."""

    def __init__(self, count: int, broken: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(count, 1, 32, 32, generator=generator)
        self.images[broken:] = float("nan")
        self.labels = [index % 2 for index in range(count)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.labels[index]


def test_a_client_whose_training_fails_is_left_out_of_its_round_as_the_server_does() -> None:
    dataset = ImagesWithBrokenRows(24, broken=16)
    partitions = [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    result = run_simulation(
        model=build_network("cnn-small", in_channels=1, num_classes=2, seed=0),
        dataset=dataset,
        partitions=partitions,
        rounds=2,
        config=TrainConfig(epochs=1, batch_size=4, lr=0.01, momentum=0.0),
        device=CPU,
    )
    for summary in result.rounds:
        assert list(summary.failures) == [2]
        assert "diverged" in summary.failures[2]
        assert summary.train_metrics["num_clients"] == 2
    assert all(bool(torch.isfinite(t).all()) for t in result.final_weights.values())


def test_a_round_whose_clients_all_fail_stops_the_simulation_with_their_reasons() -> None:
    with pytest.raises(RuntimeError, match=r"every client of round 0 failed: \{0: 'Floating"):
        run_simulation(
            model=build_network("cnn-small", in_channels=1, num_classes=2, seed=0),
            dataset=ImagesWithBrokenRows(8, broken=0),
            partitions=[list(range(8))],
            rounds=1,
            config=TrainConfig(epochs=1, batch_size=4, lr=0.01, momentum=0.0),
            device=CPU,
        )
