"""The client protocol: what one client does in one round, whoever runs it.

A client receives a :class:`ClientTask` (which ledger row it works for, the training
configuration, the network to build, the dataset's shape and the options its strategy set
for it), fetches the round's starting weights through its :class:`ClientConnection`,
trains on its own data, and sends back its weights with a :class:`ClientReport` (metrics
and any extra per-client results), or a failure. The client never knows which strategy it
serves, only the options it received.

Two connections implement the protocol: in-process for simulated sites on the server's own
workers (``training/clients.py``) and over HTTPS for a real site's agent
(``workers/site/``). A task travels between them as JSON (:meth:`ClientTask.to_json`), so
this module imports no Django.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from training.fl.local import Sample, TrainConfig, default_device, train_local
from training.fl.weights import l2_distance

__all__ = [
    "SUPPORTED_OPTIONS",
    "ClientConnection",
    "ClientReport",
    "ClientTask",
    "DataSpec",
    "NetworkSpec",
    "TaskFormatError",
    "run_client_task",
]

# The per-client options this client knows how to apply. A strategy that sends another
# one needs a newer client: the task fails with a message that says so, rather than
# training without what the strategy asked for.
SUPPORTED_OPTIONS: frozenset[str] = frozenset()
TASK_KINDS = ("train",)


class TaskFormatError(ValueError):
    """A task description is malformed or asks for what this client cannot do."""


@dataclass(frozen=True, kw_only=True)
class NetworkSpec:
    """The network to build: a name of ``training.fl.networks`` and its arguments."""

    name: str
    in_channels: int
    num_classes: int
    spatial_dims: int
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """The federated dataset the client trains on, by name, and the shape images take."""

    name: str
    num_classes: int
    class_names: Sequence[str]
    channels: int
    # (depth,) height, width: images are resampled to it; empty keeps each image's own.
    image_shape: Sequence[int]
    # The dataset's intensity normalization spec (training.fl.data.preprocess); blank
    # means the default of the format the client's data is stored in.
    normalization: str = ""
    # The seeded share of the site's samples kept for evaluation, never trained on.
    validation_fraction: float = 0.0


@dataclass(frozen=True, kw_only=True)
class ClientTask:
    """One client's work in one round, as the server describes it."""

    client_update: int
    round_id: int
    round_number: int
    experiment: int
    site: str
    kind: str
    network: NetworkSpec
    data: DataSpec
    train: TrainConfig
    # Epochs this client trained in earlier rounds: its data order continues from there.
    start_epoch: int
    options: Mapping[str, Any]
    weights_sha256: str
    # SHA-256 of the tensors the strategy sends every client of the round (SCAFFOLD's
    # server control variate); "" when it sends none.
    payload_sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        described = asdict(self)
        described["network"]["params"] = dict(self.network.params)
        described["data"]["class_names"] = list(self.data.class_names)
        described["data"]["image_shape"] = list(self.data.image_shape)
        described["options"] = dict(self.options)
        return described

    @classmethod
    def from_json(cls, described: Mapping[str, Any]) -> ClientTask:
        """The task in ``described``; raises :class:`TaskFormatError` naming what is wrong."""
        try:
            task = cls(
                client_update=int(described["client_update"]),
                round_id=int(described["round_id"]),
                round_number=int(described["round_number"]),
                experiment=int(described["experiment"]),
                site=str(described["site"]),
                kind=str(described["kind"]),
                network=NetworkSpec(**described["network"]),
                data=DataSpec(**described["data"]),
                train=TrainConfig(**described["train"]),
                start_epoch=int(described["start_epoch"]),
                options=dict(described.get("options") or {}),
                weights_sha256=str(described["weights_sha256"]),
                payload_sha256=str(described.get("payload_sha256") or ""),
            )
        except KeyError as missing:
            raise TaskFormatError(f"the task has no {missing.args[0]!r}") from None
        except (TypeError, ValueError) as error:
            raise TaskFormatError(f"the task is malformed: {error}") from None
        return task

    def check_supported(self) -> None:
        """Refuse what this client cannot do; run_client_task reports it as a failure."""
        if self.kind not in TASK_KINDS:
            raise TaskFormatError(
                f"the server asked for a {self.kind!r} task, which this client cannot do "
                f"(it does {', '.join(TASK_KINDS)}); upgrade the FedLens site agent"
            )
        unknown = sorted(set(self.options) - SUPPORTED_OPTIONS)
        if unknown:
            raise TaskFormatError(
                f"the strategy sent client options {unknown}, which this client does not "
                "support; upgrade the FedLens site agent"
            )


@dataclass(frozen=True, kw_only=True)
class ClientReport:
    """What a client reports beside its weights."""

    num_samples: int
    metrics: Mapping[str, float | str]
    # Per-client results a strategy asked for (JSON values), beside the weights.
    extras: Mapping[str, Any] = field(default_factory=dict)
    # Metrics on the site's validation split: of the round's starting model in a train
    # task, {model label: metrics} in an evaluate task.
    evaluation: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.num_samples, bool) or self.num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {self.num_samples!r}")
        for name, value in self.metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"metric {name!r} is not a finite number")


class ClientConnection(Protocol):
    """How a client talks to the server: in-process, or over HTTPS from a site."""

    def starting_weights(self, task: ClientTask) -> Mapping[str, torch.Tensor]:
        """The round's global weights, checked against ``task.weights_sha256``. The
        client must not modify them (an in-process connection shares them)."""
        ...

    def send_update(
        self, task: ClientTask, weights: Mapping[str, torch.Tensor], report: ClientReport
    ) -> bool:
        """Deliver the trained weights and report; False when the server did not count
        them (the round closed without this client, or another delivery reported)."""
        ...

    def send_failure(self, task: ClientTask, error: str) -> bool:
        """Report that this client could not do its task, and why."""
        ...


LocalData = tuple[Dataset[Sample], Sequence[int]]


def run_client_task(
    task: ClientTask,
    connection: ClientConnection,
    *,
    local_data: Callable[[ClientTask], LocalData],
    network: Callable[[ClientTask], nn.Module],
) -> bool:
    """Do ``task``: train the round's global model on this client's data and send it back.

    ``local_data`` opens the client's own samples; ``network`` gives a module of the task's
    architecture to train in (its weights are replaced). Anything that goes wrong before
    the result is sent (the weights, the data, training) is reported as this client's
    failure; a failure to reach the server propagates to the caller. Returns whether the
    server counted the result.
    """
    try:
        task.check_supported()
        shared = connection.starting_weights(task)
        model = network(task)
        # Copied into the module's own tensors: training must not change the shared ones.
        model.load_state_dict(shared)
        dataset, indices = local_data(task)
        result = train_local(model, dataset, indices, task.train, start_epoch=task.start_epoch)
        trained = model.state_dict()
        report = ClientReport(
            num_samples=result.num_samples,
            metrics={
                "loss": result.loss,
                "accuracy": result.accuracy,
                "train_seconds": result.seconds,
                "device": str(default_device()),
                # How far this client moved the model: large norms point at diverging sites.
                "update_norm": l2_distance(trained, shared),
            },
        )
    except Exception as error:  # a client's failure is recorded, not fatal to the round
        return connection.send_failure(task, f"{type(error).__name__}: {error}")
    return connection.send_update(task, trained, report)
