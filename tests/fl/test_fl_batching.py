"""Batches of local training: what a DataLoader collates, read once, kept on a GPU."""

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from training.fl.batching import ClientSamples, forget_resident_samples
from training.fl.data.datasets import ImageFolderDataset
from training.fl.local import TrainConfig, derive_seed, train_local
from training.fl.networks import build_network

CPU = torch.device("cpu")


def loader_batches(dataset, indices, order, batch_size):
    sampler = [indices[position] for position in order.tolist()]
    return list(DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0))


@pytest.mark.parametrize("resident_bytes", [2**30, 0], ids=["read-once", "batch-by-batch"])
def test_batches_hold_what_a_dataloader_collates(
    small_synthetic_dir: Path, resident_bytes: int
) -> None:
    # Given a client's samples and an order over them
    dataset = ImageFolderDataset(small_synthetic_dir)
    indices = [3, 7, 8, 15, 21, 30, 41, 50, 52]
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(5))
    # When they are batched in that order, read at once or batch by batch
    samples = ClientSamples(dataset, indices, CPU, resident_bytes=resident_bytes)
    batches = list(samples.batches(order, 4))
    # Then every batch equals, bit for bit and in dtype, the DataLoader's batch
    expected = loader_batches(dataset, indices, order, 4)
    assert [len(targets) for _, targets in batches] == [4, 4, 1]
    for (inputs, targets), (loader_inputs, loader_targets) in zip(batches, expected, strict=True):
        assert torch.equal(inputs, loader_inputs)
        assert torch.equal(targets, loader_targets)
        assert targets.dtype == loader_targets.dtype == torch.int64


def reference_training(model, dataset, indices, config):
    """train_local's loop as it was with a DataLoader (SGD, no options), on the CPU."""
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    for epoch in range(config.epochs):
        seed = derive_seed(config.seed, epoch)
        torch.default_generator.manual_seed(seed)
        order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))
        for inputs, targets in loader_batches(dataset, indices, order, config.batch_size):
            optimizer.zero_grad(set_to_none=True)
            criterion(model(inputs), targets).backward()
            optimizer.step()


def test_train_local_on_the_cpu_is_bit_for_bit_the_dataloader_loop(
    small_synthetic_dir: Path,
) -> None:
    # Given two copies of a network and a client of 25 samples
    dataset = ImageFolderDataset(small_synthetic_dir)
    indices = list(range(2, 52, 2))
    config = TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=9)
    trained = build_network("cnn-small", in_channels=1, num_classes=2, seed=1)
    reference = build_network("cnn-small", in_channels=1, num_classes=2, seed=1)
    # When train_local trains one and the former DataLoader loop the other
    with torch.random.fork_rng(devices=[]):
        train_local(trained, dataset, indices, config, device=CPU)
        reference_training(reference, dataset, indices, config)
    # Then their weights are equal bit for bit
    for name, tensor in trained.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_samples_stay_on_the_gpu_between_calls() -> None:
    # Given a small dataset on the host
    forget_resident_samples()
    cuda = torch.device("cuda")
    dataset = TensorDataset(torch.randn(40, 1, 8, 8), torch.randint(0, 2, (40,)))
    indices = list(range(0, 40, 3))
    order = torch.randperm(len(indices))
    # When one client's samples are batched twice (two rounds' tasks)
    first = ClientSamples(dataset, indices, cuda)
    second = ClientSamples(dataset, indices, cuda)
    # Then the batches are on the GPU, equal to the host's, from the same device copy
    (inputs, targets), *_ = first.batches(order, 64)
    assert inputs.device.type == "cuda"
    assert torch.equal(inputs.cpu(), dataset.tensors[0][[indices[p] for p in order.tolist()]])
    assert torch.equal(targets.cpu(), dataset.tensors[1][[indices[p] for p in order.tolist()]])
    assert first._whole[0].data_ptr() == second._whole[0].data_ptr()
    # And a limit too small for them streams batches from pinned host memory instead
    streamed = ClientSamples(dataset, indices, cuda, resident_bytes=0)
    (streamed_inputs, _), *_ = streamed.batches(order, 64)
    assert torch.equal(streamed_inputs, inputs)
    forget_resident_samples()
