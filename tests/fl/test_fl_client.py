"""The client protocol: a task's wire form, and what a client does and reports through its
connection, whichever connection that is."""

import json
from pathlib import Path

import pytest
import torch

from tests.fl.connections import RecordingConnection
from training.fl.client import (
    ClientTask,
    DataSpec,
    NetworkSpec,
    TaskFormatError,
    run_client_task,
)
from training.fl.data.datasets import ImageFolderDataset
from training.fl.local import TrainConfig
from training.fl.networks import build_network
from training.fl.strategies import FedAvg


def a_task(**change) -> ClientTask:
    fields = {
        "client_update": 7, "round_id": 3, "round_number": 2, "experiment": 5, "site": "st-mary",
        "kind": "train",
        "network": NetworkSpec(name="cnn-small", in_channels=1, num_classes=2, spatial_dims=2),
        "data": DataSpec(name="lesions", num_classes=2, class_names=["normal", "lesion"],
                         channels=1, image_shape=[32, 32]),
        "train": TrainConfig(epochs=1, batch_size=8, lr=0.05, seed=11),
        "start_epoch": 1, "options": {}, "weights_sha256": "ab" * 32,
        **change,
    }  # fmt: skip
    return ClientTask(**fields)


def network(task: ClientTask) -> torch.nn.Module:
    return build_network(task.network.name, in_channels=1, num_classes=2, seed=1)


def test_a_task_survives_its_json_form_unchanged() -> None:
    task = a_task(options={"mu": 0.1}, network=NetworkSpec(
        name="resnet18-small", in_channels=3, num_classes=4, spatial_dims=2, params={"width": 8}
    ))  # fmt: skip

    assert ClientTask.from_json(json.loads(json.dumps(task.to_json()))) == task


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda d: d.pop("weights_sha256"), "no 'weights_sha256'"),
        (lambda d: d["train"].update(lr=-1), "lr must be a positive number"),
        (lambda d: d["network"].update(depth=3), "malformed"),
    ],
)
def test_a_malformed_or_unknown_task_is_refused_with_what_is_wrong(spoil, message) -> None:
    described = a_task().to_json()
    spoil(described)

    with pytest.raises(TaskFormatError, match=message):
        ClientTask.from_json(described)


def test_a_client_trains_the_global_model_and_reports_without_changing_it(
    small_synthetic_dir: Path,
) -> None:
    data = ImageFolderDataset(small_synthetic_dir)
    shared = build_network("cnn-small", in_channels=1, num_classes=2, seed=0).state_dict()
    before = {name: tensor.clone() for name, tensor in shared.items()}
    connection = RecordingConnection(shared)

    counted = run_client_task(
        a_task(), connection, local_data=lambda task: (data, range(16)), network=network
    )

    assert counted and not connection.failures
    (trained, report), = connection.updates  # fmt: skip
    assert report.num_samples == 16
    assert {"loss", "accuracy", "train_seconds", "device", "update_norm"} <= set(report.metrics)
    assert report.metrics["update_norm"] > 0
    assert any(not torch.equal(trained[name], before[name]) for name in before)
    for name, tensor in shared.items():  # the shared starting weights are untouched
        assert torch.equal(tensor, before[name])


@pytest.mark.parametrize(
    ("change", "named"),
    [({"options": {"server_secret": 1}}, "['server_secret']"), ({"kind": "distill"}, "'distill'")],
)
def test_what_the_client_cannot_do_fails_the_task_before_any_work(change, named) -> None:
    connection = RecordingConnection({})
    task = ClientTask.from_json(a_task(**change).to_json())  # its wire form is still valid

    run_client_task(
        task, connection, local_data=lambda task: pytest.fail("no data may be read"),
        network=network,
    )  # fmt: skip

    assert connection.fetched == 0 and not connection.updates
    assert named in connection.failures[0]
    assert "upgrade the FedLens site agent" in connection.failures[0]


def test_a_client_whose_data_cannot_be_read_reports_the_reason_as_its_failure() -> None:
    connection = RecordingConnection(build_network("cnn-small", in_channels=1,
                                                   num_classes=2, seed=0).state_dict())  # fmt: skip

    def unreadable(task: ClientTask):
        raise FileNotFoundError("no dataset named lesions on this node")

    run_client_task(a_task(), connection, local_data=unreadable, network=network)

    assert connection.failures == ["FileNotFoundError: no dataset named lesions on this node"]
    assert not connection.updates


class ExtrasRecordingFedAvg(FedAvg):
    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[dict, int]] = []

    def _receive_extras(self, extras, num_samples: int) -> None:
        self.received.append((dict(extras), num_samples))


def test_a_strategy_receives_each_clients_extra_results_beside_its_weights() -> None:
    weights = {"w": torch.ones(2)}
    strategy = ExtrasRecordingFedAvg()
    strategy.begin_round(weights)

    strategy.accumulate(weights, num_samples=3, extras={"control_norm": 0.5})
    strategy.accumulate(weights, num_samples=5)

    assert strategy.received == [({"control_norm": 0.5}, 3), ({}, 5)]
