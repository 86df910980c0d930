"""The single-process FedAvg simulation loop."""

from pathlib import Path

import torch

from training.fl.data.datasets import ImageFolderDataset
from training.fl.data.partition import partition_indices
from training.fl.local import TrainConfig, client_seed, train_local
from training.fl.networks import build_network
from training.fl.simulation import RoundSummary, run_simulation

CPU = torch.device("cpu")
CONFIG = TrainConfig(epochs=1, batch_size=8, lr=0.05, momentum=0.0, seed=5)


def fresh_model() -> torch.nn.Module:
    return build_network("cnn-small", in_channels=1, num_classes=2, seed=1)


def test_single_client_simulation_equals_centralised_training(small_synthetic_dir: Path) -> None:
    # Given a federation of one client that holds every sample
    dataset = ImageFolderDataset(small_synthetic_dir)
    everything = list(range(len(dataset)))
    federated = fresh_model()
    # When it runs 3 rounds of 1 epoch
    run_simulation(
        model=federated,
        dataset=dataset,
        partitions=[everything],
        rounds=3,
        config=CONFIG,
        device=CPU,
    )
    # Then it matches 3 centralised epochs with that client's seed
    centralised = fresh_model()
    central_config = TrainConfig(
        **{**vars(CONFIG), "epochs": 3, "seed": client_seed(CONFIG.seed, 0)}
    )
    train_local(centralised, dataset, everything, central_config, device=CPU)
    for name, tensor in centralised.state_dict().items():
        torch.testing.assert_close(federated.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)


def test_simulation_reports_every_round_and_is_reproducible(small_synthetic_dir: Path) -> None:
    # Given three site clients and a callback collecting round summaries
    dataset = ImageFolderDataset(small_synthetic_dir)
    assert dataset.sites is not None
    partitions = partition_indices(
        "site", labels=dataset.labels, num_clients=3, seed=0, sites=dataset.sites
    )
    seen: list[RoundSummary] = []

    def simulate() -> tuple[torch.nn.Module, list[RoundSummary]]:
        model = fresh_model()
        result = run_simulation(
            model=model,
            dataset=dataset,
            partitions=partitions,
            rounds=2,
            config=CONFIG,
            eval_dataset=dataset,
            device=CPU,
            on_round_end=seen.append,
        )
        assert all(torch.equal(model.state_dict()[n], t) for n, t in result.final_weights.items())
        return model, result.rounds

    # When the same simulation runs twice
    first_model, first_rounds = simulate()
    second_model, second_rounds = simulate()
    # Then every round is summarised with client results and global evaluation
    assert [summary.round_index for summary in seen] == [0, 1, 0, 1]
    assert all(len(summary.clients) == 3 for summary in first_rounds)
    assert first_rounds[-1].train_metrics["num_samples"] == len(dataset)
    assert first_rounds[-1].eval_metrics is not None
    assert first_rounds[-1].eval_metrics["num_samples"] == len(dataset)
    # And both runs agree exactly
    assert [r.eval_metrics for r in first_rounds] == [r.eval_metrics for r in second_rounds]
    for name, tensor in first_model.state_dict().items():
        assert torch.equal(second_model.state_dict()[name], tensor)
