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
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from training.fl.client_options import SUPPORTED_OPTIONS, ClientOptions
from training.fl.evaluation import evaluate_model, validation_split
from training.fl.local import Sample, TrainConfig, default_device, train_local
from training.fl.networks import network_task
from training.fl.privacy import add_gaussian_noise_, clip_update, epsilon_spent
from training.fl.weights import l2_distance

__all__ = [
    "GLOBAL_MODEL",
    "SITE_STATE_NAME",
    "SUPPORTED_OPTIONS",
    "TASK_KINDS",
    "ClientConnection",
    "ClientReport",
    "ClientTask",
    "DataSpec",
    "NetworkSpec",
    "SiteState",
    "TaskFormatError",
    "run_client_task",
]

# SUPPORTED_OPTIONS (training/fl/client_options.py) are the per-client options this client
# knows how to apply. A strategy that sends another one needs a newer client: the task
# fails with a message that says so, rather than training without what it asked for.
# "train": train the round's starting model; "evaluate": evaluate the models named in the
# task's "models" option on the site's validation split (the cross-site round).
TASK_KINDS = ("train", "evaluate")
# What a dataset's labels are (DataSpec.task): a class per image or a mask per image.
LEARNING_TASKS = ("classification", "segmentation")
# The label of the experiment's global model in an evaluate task (others are site slugs).
GLOBAL_MODEL = "global"
# Names a site state entry may have: they become file names at the site.
SITE_STATE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
# What the site keeps between rounds, in its site state.
FEDBN_LOCAL = "fedbn_local"
SCAFFOLD_CONTROL = "scaffold_control"
LOCAL_DP_SGD = "local_dp_sgd"


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
    # One of LEARNING_TASKS; for segmentation num_classes counts the background.
    task: str = "classification"


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
        try:
            options = ClientOptions.parse(self.options)
        except ValueError as error:
            raise TaskFormatError(str(error)) from None
        if self.kind == "evaluate" and not options.models:
            raise TaskFormatError("an evaluate task must name its models (option 'models')")
        if self.data.task not in LEARNING_TASKS:
            raise TaskFormatError(
                f"the server asked for {self.data.task!r}, which this client cannot learn (it "
                f"does {', '.join(LEARNING_TASKS)}); upgrade the FedLens site agent"
            )
        try:
            learns: str | None = network_task(self.network.name)
        except ValueError:
            learns = None  # not a registered name: the client's own network factory decides
        if learns is not None and learns != self.data.task:
            raise TaskFormatError(
                f"network {self.network.name!r} does {learns}, but dataset {self.data.name} "
                f"is for {self.data.task}"
            )
        if self.data.task == "segmentation" and options.dp_sgd is not None:
            raise TaskFormatError(
                "local DP-SGD is not available for segmentation networks (Opacus computes no "
                "per-sample gradients for their layers); use client-level DP instead"
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


class SiteState(Protocol):
    """Tensors a site keeps between rounds of one experiment (FedBN's local layers,
    SCAFFOLD's control variate); they never leave the site."""

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        """The tensors saved under ``name``, or None when there are none yet."""
        ...

    def save(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Keep ``tensors`` under ``name``, replacing what was there."""
        ...


class ClientConnection(Protocol):
    """How a client talks to the server: in-process, or over HTTPS from a site."""

    def starting_weights(self, task: ClientTask) -> Mapping[str, torch.Tensor]:
        """The round's global weights, checked against ``task.weights_sha256``. The
        client must not modify them (an in-process connection shares them)."""
        ...

    def strategy_payload(self, task: ClientTask) -> Mapping[str, torch.Tensor]:
        """The tensors the strategy sends every client of the round, checked against
        ``task.payload_sha256`` (asked only when it is not "")."""
        ...

    def site_state(self, task: ClientTask) -> SiteState:
        """This site's state in the task's experiment."""
        ...

    def evaluation_weights(self, task: ClientTask, label: str) -> Mapping[str, torch.Tensor]:
        """A model an evaluate task names: the experiment's final global model for
        "global", else the last update the site with slug ``label`` trained."""
        ...

    def send_update(
        self, task: ClientTask, weights: Mapping[str, torch.Tensor], report: ClientReport
    ) -> bool:
        """Deliver the trained weights and report; False when the server did not count
        them (the round closed without this client, or another delivery reported)."""
        ...

    def send_evaluation(self, task: ClientTask, report: ClientReport) -> bool:
        """Deliver an evaluate task's report (``report.evaluation``: label to metrics)."""
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
    """Do ``task``: train the round's global model on this client's data and send it back,
    or, for an evaluate task, evaluate the models it names and send their metrics.

    ``local_data`` opens the client's own samples; ``network`` gives a module of the task's
    architecture to work in (its weights are replaced). Anything that goes wrong before
    the result is sent (the weights, the data, training) is reported as this client's
    failure; a failure to reach the server propagates to the caller. Returns whether the
    server counted the result.
    """
    try:
        task.check_supported()
        options = ClientOptions.parse(task.options)
        state = connection.site_state(task)
        if task.kind == "evaluate":
            report = evaluate_models(task, options, connection, state, local_data, network)
        else:
            weights, report, keep = train_round(
                task, options, connection, state, local_data, network
            )
    except Exception as error:  # a client's failure is recorded, not fatal to the round
        return connection.send_failure(task, f"{type(error).__name__}: {error}")
    if task.kind == "evaluate":
        return connection.send_evaluation(task, report)
    counted = connection.send_update(task, weights, report)
    # Kept only once the server counted the update: SCAFFOLD's server variate moves with
    # the counted clients' alone, and the site's must move with it.
    if counted:
        for name, tensors in keep.items():
            state.save(name, tensors)
    return counted


def split_local_data(
    task: ClientTask, local_data: Callable[[ClientTask], LocalData]
) -> tuple[Dataset[Sample], list[int], list[int]]:
    """The site's samples, its training indices and its validation indices."""
    dataset, indices = local_data(task)
    holds = getattr(dataset, "task", "classification")
    if holds != task.data.task:
        raise ValueError(
            f"this site's copy of dataset {task.data.name} is a {holds} dataset, but the "
            f"experiment is for {task.data.task}: declare the site's data again"
        )
    training, validation = validation_split(
        indices, task.data.validation_fraction, f"{task.data.name}/{task.site}"
    )
    return dataset, training, validation


def with_local_layers(
    model: nn.Module, state: SiteState, names: Sequence[str] | None = None
) -> None:
    """Load the site's FedBN layers over the global ones in ``model`` (those of ``names``,
    or all it kept); nothing when it kept none yet (its first round)."""
    kept = state.load(FEDBN_LOCAL)
    if not kept:
        return
    wanted = kept.keys() if names is None else set(names) & kept.keys()
    model.load_state_dict({name: kept[name] for name in wanted}, strict=False)


def train_round(
    task: ClientTask,
    options: ClientOptions,
    connection: ClientConnection,
    state: SiteState,
    local_data: Callable[[ClientTask], LocalData],
    network: Callable[[ClientTask], nn.Module],
) -> tuple[dict[str, torch.Tensor], ClientReport, dict[str, dict[str, torch.Tensor]]]:
    """Train one round: the weights to send, the report, and the site state to keep."""
    shared = connection.starting_weights(task)
    model = network(task)
    # Copied into the module's own tensors: training must not change the shared ones.
    model.load_state_dict(shared)
    local_names = options.local_parameters
    unknown = sorted(set(local_names) - shared.keys())
    if unknown:
        raise ValueError(f"the local parameters {unknown[:5]} are not in the network")
    if local_names:
        with_local_layers(model, state, local_names)
    dataset, training, validation = split_local_data(task, local_data)
    # The round's starting model (with this site's own layers) on data it never trains on.
    evaluation = (
        evaluate_model(
            model,
            dataset,
            validation,
            batch_size=task.train.batch_size,
            patch_size=task.train.patch_size,
        )
        if validation
        else {}
    )
    keep: dict[str, dict[str, torch.Tensor]] = {}
    variates, correction = None, None
    if options.scaffold:
        variates = scaffold_variates(task, connection, state, shared)
        client, server = variates
        correction = {name: server[name] - client[name] for name in client}
    result = train_local(
        model,
        dataset,
        training,
        task.train,
        start_epoch=task.start_epoch,
        proximal_mu=options.proximal_mu,
        gradient_correction=correction,
        dp_sgd=options.dp_sgd,
    )
    trained = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    metrics: dict[str, float | str] = {
        "loss": result.loss,
        "train_seconds": result.seconds,
        "device": str(default_device()),
    }
    # Accuracy for classification, Dice for segmentation.
    for name, value in (("accuracy", result.accuracy), ("dice", result.dice)):
        if value is not None:
            metrics[name] = value
    extras: dict[str, Any] = {}
    if local_names:
        keep[FEDBN_LOCAL] = {name: trained[name].clone() for name in local_names}
    sent = trained
    if options.dp_clip is not None:
        sent, metrics["update_norm_before_clip"] = clip_update(trained, shared, options.dp_clip)
        sent = {name: tensor.clone() for name, tensor in sent.items()}
        # Fresh randomness: noise the server could draw again (from the task's seed) would
        # protect nothing.
        add_gaussian_noise_(
            sent, options.dp_noise_std, torch.Generator().manual_seed(secrets.randbits(63))
        )
    if options.dp_sgd is not None and result.sample_rate is not None:
        steps = result.batches_drawn + local_dp_steps(state)
        keep[LOCAL_DP_SGD] = {"steps": torch.tensor(steps, dtype=torch.int64)}
        epsilon = epsilon_spent(
            noise_multiplier=options.dp_sgd.noise_multiplier,
            sample_rate=result.sample_rate,
            steps=steps,
            delta=options.local_dp_delta,
        )
        if math.isfinite(epsilon):  # no noise: no guarantee to report
            metrics["local_epsilon"] = epsilon
    if variates is not None:
        keep[SCAFFOLD_CONTROL] = scaffold_control_update(
            *variates, shared, sent, steps=result.steps, lr=task.train.lr
        )
        extras.update(local_steps=result.steps, learning_rate=task.train.lr)
    # How far this client moved the model: large norms point at diverging sites.
    metrics["update_norm"] = l2_distance(sent, shared)
    report = ClientReport(
        num_samples=result.num_samples, metrics=metrics, extras=extras, evaluation=evaluation
    )
    return sent, report, keep


def local_dp_steps(state: SiteState) -> int:
    """DP-SGD steps this site took in the experiment's earlier rounds: its local ε covers
    them all, since every round trained on the same samples."""
    kept = state.load(LOCAL_DP_SGD)
    return int(kept["steps"]) if kept and "steps" in kept else 0


def scaffold_variates(
    task: ClientTask,
    connection: ClientConnection,
    state: SiteState,
    start: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SCAFFOLD's control variates per floating-point weight, as the server keeps them: the
    site's c_i (zeros at first) and the server's c (from the round's strategy payload;
    zeros while the strategy sent none). Only the parameters' entries correct gradients."""
    server = dict(connection.strategy_payload(task)) if task.payload_sha256 else {}
    kept = state.load(SCAFFOLD_CONTROL) or {}
    client: dict[str, torch.Tensor] = {}
    global_variate: dict[str, torch.Tensor] = {}
    for name, weight in start.items():
        if not weight.dtype.is_floating_point:
            continue
        zeros = torch.zeros(weight.shape, dtype=torch.float32)
        client[name] = kept.get(name, zeros).to(torch.float32)
        global_variate[name] = server.get(name, zeros).to(torch.float32)
    return client, global_variate


def scaffold_control_update(
    client: Mapping[str, torch.Tensor],
    server: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    sent: Mapping[str, torch.Tensor],
    *,
    steps: int,
    lr: float,
) -> dict[str, torch.Tensor]:
    """SCAFFOLD's option II: c_i+ = c_i - c + (x - y_i) / (K * lr), with x the round's
    starting weights, y_i the weights sent and K the optimizer steps taken. The server
    computes c_i+ - c_i from the same x, y_i, K and lr, so c_i never has to be sent."""
    scale = 1.0 / (steps * lr)
    return {
        name: client[name]
        - server[name]
        + (start[name].to(torch.float32) - sent[name].to(torch.float32)) * scale
        for name in client
    }


def evaluate_models(
    task: ClientTask,
    options: ClientOptions,
    connection: ClientConnection,
    state: SiteState,
    local_data: Callable[[ClientTask], LocalData],
    network: Callable[[ClientTask], nn.Module],
) -> ClientReport:
    """An evaluate task: each model it names on the site's validation split."""
    dataset, _, validation = split_local_data(task, local_data)
    if not validation:
        raise ValueError(
            f"dataset {task.data.name} keeps no validation share at this site (its "
            "validation_fraction is 0, or the site has a single sample): nothing to evaluate on"
        )
    model = network(task)
    started = time.perf_counter()
    evaluation: dict[str, Any] = {}
    for label in options.models:
        model.load_state_dict(connection.evaluation_weights(task, label))
        if label == GLOBAL_MODEL:
            # With FedBN the global model is personalized by this site's own layers.
            with_local_layers(model, state, options.local_parameters or None)
        evaluation[label] = evaluate_model(
            model,
            dataset,
            validation,
            batch_size=task.train.batch_size,
            patch_size=task.train.patch_size,
        )
    return ClientReport(
        num_samples=len(validation),
        metrics={
            "evaluate_seconds": time.perf_counter() - started,
            "device": str(default_device()),
        },
        evaluation=evaluation,
    )
