"""What the tasks run for one experiment: the engine (training/fl) applied to ledger rows.

Datasets are decoded once into the decoded cache on disk (FEDLENS_DATASET_CACHE_DIR),
which every worker process and later run memory-maps; a worker process keeps the datasets
it opened within FEDLENS_DATASET_CACHE_MB, so that only the first round of the first
experiment on a dataset pays for reading its images.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

import torch
from django.conf import settings
from django.db import DatabaseError
from torch import nn

from training import metric_catalog, modelstore
from training.differential_privacy import round_epsilon, with_privacy
from training.fl.client import ClientTask, DataSpec, NetworkSpec
from training.fl.data import ClassificationDataset, Preprocessor, load_dataset
from training.fl.data.cache import DecodedCache, OpenedDatasets
from training.fl.data.formats import get_format
from training.fl.data.partition import (
    holdout_split,
    parse_partition_spec,
    partition_indices,
)
from training.fl.local import TrainConfig, client_seed, evaluate
from training.fl.networks import build_network
from training.fl.strategies import (
    Strategy,
    StrategyContext,
    batch_norm_parameters,
    build_strategy,
)
from training.fl.weights import WeightsError, l2_distance, weights_mismatch
from training.models import (
    Checkpoint,
    ClientUpdate,
    ClientUpdateStatus,
    Dataset,
    Experiment,
    Round,
    RoundKind,
    Site,
)

logger = logging.getLogger(__name__)

Cached = TypeVar("Cached", bound=Callable[..., Any])
# Every per-process cache keyed by ledger ids, so that they can all be forgotten at once.
_CACHES_BY_LEDGER_ID: list[Any] = []


def cached_by_ledger_id(maxsize: int) -> Callable[[Cached], Cached]:
    """lru_cache for reads keyed by ledger ids, registered for forget_ledger_reads()."""

    def decorate(function: Cached) -> Cached:
        cached = lru_cache(maxsize=maxsize)(function)
        _CACHES_BY_LEDGER_ID.append(cached)
        return cached  # type: ignore[return-value]

    return decorate


def forget_ledger_reads() -> None:
    """Drop what this process cached by id. Ids are never reused in PostgreSQL, but a test's
    rolled-back rows free theirs for the next test (SQLite hands them out again)."""
    for cached in _CACHES_BY_LEDGER_ID:
        cached.cache_clear()


# Share of a server-side image folder kept back to evaluate the global model.
HOLDOUT_FRACTION = 0.2
EVAL_BATCH_SIZE = 256
# The clients' training metrics that aggregation averages (accuracy or Dice by task).
TRAINING_METRICS = ("loss", "accuracy", "dice")


def evaluation_batch_size(experiment: Experiment) -> int:
    """Images (or sliding windows) per forward pass in the server's evaluation: segmentation
    volumes take the experiment's own training batch, which is known to fit in memory."""
    return experiment.batch_size if experiment.task == "segmentation" else EVAL_BATCH_SIZE


# The datasets this process opened, within FEDLENS_DATASET_CACHE_MB.
OPENED_DATASETS: OpenedDatasets[ClassificationDataset] = OpenedDatasets()


def open_dataset(
    path: str,
    storage_format: str,
    split: str,
    image_shape: tuple[int, ...],
    channels: int,
    normalization: str = "",
    class_names: tuple[str, ...] = (),
) -> ClassificationDataset:
    cache_dir = settings.FEDLENS_DATASET_CACHE_DIR

    def open_it() -> ClassificationDataset:
        preprocessor = Preprocessor(
            # The ledger stores shapes as (depth,) height, width; SimpleITK sizes are x, y(, z).
            size=tuple(reversed(image_shape)) if image_shape else None,
            channels=channels,
            normalization=normalization,
        )
        return load_dataset(
            path,
            storage_format,
            split=split,
            preprocessor=preprocessor,
            # A segmentation dataset's masks are checked against the registered classes.
            class_names=list(class_names) or None,
            max_voxels=settings.FEDLENS_MAX_VOLUME_VOXELS,
            decoded_cache=DecodedCache(cache_dir),
        )

    key = (path, storage_format, split, image_shape, channels, normalization, class_names)
    return OPENED_DATASETS.get(
        (*key, str(cache_dir)), open_it, budget_bytes=settings.FEDLENS_DATASET_CACHE_MB * 2**20
    )


def open_dataset_at(dataset: Dataset, path: str, split: str = "train") -> ClassificationDataset:
    return open_dataset(
        path,
        dataset.storage_format,
        split,
        tuple(dataset.image_shape),
        dataset.channels,
        dataset.normalization,
        tuple(dataset.class_names or ()),
    )


def evaluation_split(dataset: Dataset) -> str | None:
    """The split of the dataset's own that evaluates the global model (an .npz's test
    split), or None when the server holds back a share of the training data instead."""
    return get_format(dataset.storage_format).evaluation_split if dataset.storage_format else None


@dataclass(frozen=True)
class ClientData:
    dataset: ClassificationDataset
    indices: list[int]


@dataclass(frozen=True)
class EvaluationData:
    dataset: ClassificationDataset
    indices: list[int] | None


def is_simulation(dataset: Dataset) -> bool:
    """Simulated sites split a dataset the server holds; the sites of a federated dataset
    train on their own data, at the site."""
    return not dataset.is_federated


@cached_by_ledger_id(maxsize=16)
def simulated_split(
    experiment_id: int, site_ids: tuple[int, ...]
) -> tuple[dict[int, list[int]], list[int] | None]:
    """Partition the server-side dataset among the experiment's sites, reproducibly.

    Returns the dataset indices per site id, and the held-out indices for evaluation (None
    when the dataset has a test split of its own, as MedMNIST files do).

    A ``file:`` partition's indices are rows of the dataset as registered (the .npz train
    split's rows, or labels.csv's data rows, from 0): each site gets exactly its rows, and
    an image folder's rows that the file gives to no site are the held-out data.
    """
    experiment = Experiment.objects.select_related("dataset").get(pk=experiment_id)
    data = open_dataset_at(experiment.dataset, experiment.dataset.path)
    labels, sites = data.labels, data.sites
    kept: list[int] = list(range(len(labels)))
    held_out: list[int] | None = None
    holds_back = evaluation_split(experiment.dataset) is None
    if parse_partition_spec(experiment.partition).kind == "file":
        parts = partition_indices(
            experiment.partition, labels=labels, num_clients=len(site_ids), seed=experiment.seed
        )
        if holds_back:
            assigned = {index for part in parts for index in part}
            held_out = [index for index in kept if index not in assigned]
        return dict(zip(site_ids, parts, strict=True)), held_out
    if holds_back:
        kept, held_out = holdout_split(labels, fraction=HOLDOUT_FRACTION, seed=experiment.seed)
        kept, held_out = [int(i) for i in kept], [int(i) for i in held_out]
    parts = partition_indices(
        experiment.partition,
        labels=labels[kept],
        num_clients=len(site_ids),
        seed=experiment.seed,
        sites=[sites[i] for i in kept] if sites is not None else None,
    )
    by_site = {
        site_id: [kept[i] for i in part] for site_id, part in zip(site_ids, parts, strict=True)
    }
    return by_site, held_out


@cached_by_ledger_id(maxsize=64)
def experiment_configuration(experiment_id: int) -> Experiment:
    """An experiment with its dataset, read once per worker process for its clients' tasks.

    Use it for the configuration only, which is frozen once the experiment has started;
    its status and current round move on without this copy.
    """
    return Experiment.objects.select_related("dataset").get(pk=experiment_id)


def experiment_site_ids(experiment: Experiment) -> tuple[int, ...]:
    return tuple(experiment_sites(experiment.pk))


@cached_by_ledger_id(maxsize=64)
def experiment_sites(experiment_id: int) -> dict[int, Site]:
    """An experiment's sites by id, in id order. Cached per process: the sites are frozen
    once the experiment has started (a site's slug names its queue, so it stays too)."""
    return {site.pk: site for site in Site.objects.filter(experiments=experiment_id).order_by("pk")}


@cached_by_ledger_id(maxsize=16)
def round_for_clients(round_id: int) -> Round:
    """A round as its clients' tasks use it: its experiment's configuration and its number,
    which never change. Read once per worker process, not once per client."""
    fl_round = Round.objects.get(pk=round_id)
    fl_round.experiment = experiment_configuration(fl_round.experiment_id)
    return fl_round


def simulated_client_data(experiment: Experiment, site_id: int) -> ClientData:
    """A simulated site's share of the server's dataset."""
    by_site, _ = simulated_split(experiment.pk, experiment_site_ids(experiment))
    dataset = experiment.dataset
    return ClientData(open_dataset_at(dataset, dataset.path), by_site[site_id])


def evaluation_data(experiment: Experiment) -> EvaluationData | None:
    """The server's held-out data, or None when the server holds no data of this dataset."""
    dataset = experiment.dataset
    if not dataset.path:
        return None
    split = evaluation_split(dataset)
    if split is not None:
        return EvaluationData(open_dataset_at(dataset, dataset.path, split=split), None)
    if is_simulation(dataset):
        _, held_out = simulated_split(experiment.pk, experiment_site_ids(experiment))
        if held_out == []:  # a partition file gave every row to a site
            return None
        return EvaluationData(open_dataset_at(dataset, dataset.path), held_out)
    # A federated dataset's server copy is held-out data in its entirety.
    return EvaluationData(open_dataset_at(dataset, dataset.path), None)


def build_experiment_network(experiment: Experiment, *, seed: int | None = None) -> nn.Module:
    """The experiment's network, randomly initialised from `seed`."""
    dataset = experiment.dataset
    return build_network(
        experiment.network,
        in_channels=dataset.channels,
        num_classes=dataset.num_classes,
        spatial_dims=len(dataset.image_shape) if dataset.image_shape else 2,
        seed=seed,
        **experiment.network_params,
    )


def store_initial_weights(experiment: Experiment) -> modelstore.StoredWeights:
    """The round-0 global model: the network initialised from the experiment's seed."""
    network = build_experiment_network(experiment, seed=experiment.seed)
    return modelstore.save_weights(
        modelstore.initial_weights_name(experiment.pk), network.state_dict()
    )


def network_with_weights(experiment: Experiment, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The network holding `weights`, built without spending time on a random init."""
    with torch.device("meta"):
        network = build_experiment_network(experiment)
    network.load_state_dict(weights, assign=True)
    return network


def training_network(experiment_id: int) -> nn.Module:
    """The network that this thread trains an experiment's clients in, built once.

    Each task loads its round's starting weights into it, which resets every parameter and
    buffer: building the modules again for every client cost more than a tiny model's
    training step. One per thread: the embedded worker trains several clients at once.
    """
    return thread_training_network(experiment_id, threading.get_ident())


# Two experiments per thread of the embedded worker (a thread id is reused only once its
# thread is gone, and only one thread trains in a worker process of the distributed mode).
@cached_by_ledger_id(maxsize=2 * settings.FEDLENS_EMBEDDED_CONCURRENCY)
def thread_training_network(experiment_id: int, thread_id: int) -> nn.Module:
    experiment = experiment_configuration(experiment_id)
    # Seeded so as to leave the global random state alone; the weights are replaced anyway.
    return build_experiment_network(experiment, seed=experiment.seed)


@lru_cache(maxsize=2)
def global_weights(name: str, sha256: str) -> dict[str, torch.Tensor]:
    """A round's starting weights, read once per worker process rather than once per client.

    Callers must not modify the tensors: they are shared by the round's clients.
    """
    return modelstore.load_stored_weights(name, sha256)


@cached_by_ledger_id(maxsize=64)
def starting_checkpoint(experiment_id: int, round_number: int) -> tuple[str, str]:
    """File name and SHA-256 of the global model a round starts from (checkpoints never
    change once written, so each worker process asks once per round)."""
    checkpoints = Checkpoint.objects.filter(experiment_id=experiment_id)
    if round_number == 1:
        checkpoint = checkpoints.get(round__isnull=True)
    else:
        checkpoint = checkpoints.get(round__number=round_number - 1)
    return checkpoint.file.name, checkpoint.sha256


@dataclass(frozen=True)
class LocalTrainingOutcome:
    """A client's result as the ledger records it: the stored weights (None for an evaluate
    task, which sends none) and the report, with the site's evaluation on its validation
    split."""

    stored: modelstore.StoredWeights | None
    num_samples: int
    metrics: dict[str, Any]
    evaluation: dict[str, Any] = field(default_factory=dict)


def strategy_context(experiment: Experiment) -> StrategyContext:
    """What the experiment's strategy needs beside its parameters: the size of the site
    pool (SCAFFOLD) and the network's batch-norm entries (FedBN), read off a network built
    on the meta device (names only, no memory)."""
    with torch.device("meta"):
        network = build_experiment_network(experiment)
    return StrategyContext(
        num_sites=len(experiment_site_ids(experiment)),
        batch_norm_parameters=batch_norm_parameters(network),
    )


def experiment_strategy(experiment: Experiment) -> Strategy:
    """A new instance of the experiment's strategy, with its weighting, before any state."""
    return build_strategy(
        experiment.strategy,
        weighting=experiment.aggregation_weighting,
        context=strategy_context(experiment),
        **experiment.strategy_params,
    )


@cached_by_ledger_id(maxsize=64)
def configured_strategy(experiment_id: int) -> Strategy:
    """The experiment's strategy as it configures clients (aggregation builds its own: this
    per-process copy never holds the state carried between rounds)."""
    experiment = experiment_configuration(experiment_id)
    return with_privacy(experiment_strategy(experiment), experiment)


def strategy_payload_file(experiment_id: int, round_number: int) -> tuple[str, str] | None:
    """(name, SHA-256) of the tensors the strategy sends every client of the round (stored
    by the previous round's aggregation), or None when it sends none."""
    return stored_strategy_payload(starting_checkpoint(experiment_id, round_number)[0])


@cached_by_ledger_id(maxsize=64)
def stored_strategy_payload(checkpoint_name: str) -> tuple[str, str] | None:
    """The payload beside a checkpoint, hashed once per process (neither ever changes once
    the checkpoint is recorded)."""
    return modelstore.stored_strategy_payload(checkpoint_name)


def network_spec(experiment: Experiment) -> NetworkSpec:
    dataset = experiment.dataset
    return NetworkSpec(
        name=experiment.network,
        in_channels=dataset.channels,
        num_classes=dataset.num_classes,
        spatial_dims=len(dataset.image_shape) if dataset.image_shape else 2,
        params=experiment.network_params,
    )


# Of a strategy's client options, those that also apply when a client only evaluates: the
# layers it keeps at the site (FedBN), loaded over the global model it evaluates.
EVALUATION_OPTIONS = ("local_parameters",)


def client_options(fl_round: Round, site_slug: str) -> dict[str, Any]:
    """A client's options: its strategy's in a training round; in the cross-site round the
    models to evaluate (set when the round opened) and the options that apply to them."""
    options = configured_strategy(fl_round.experiment_id).configure_client(
        round_number=fl_round.number, site=site_slug
    )
    if fl_round.kind == RoundKind.TRAIN:
        return options
    kept = {name: options[name] for name in EVALUATION_OPTIONS if name in options}
    return {"models": list(fl_round.metrics["models"]), **kept}


def client_task(update: ClientUpdate) -> ClientTask:
    """What the client of a claimed update is asked to do, for a simulated site in a server
    worker and for a real site's agent alike (`update` as claim_client_update returns it)."""
    fl_round = update.round
    experiment = fl_round.experiment
    dataset = experiment.dataset
    client_index = experiment_site_ids(experiment).index(update.site_id)
    _, weights_sha256 = starting_checkpoint(experiment.pk, fl_round.number)
    payload = (
        strategy_payload_file(experiment.pk, fl_round.number)
        if fl_round.kind == RoundKind.TRAIN
        else None
    )
    return ClientTask(
        client_update=update.pk,
        round_id=fl_round.pk,
        round_number=fl_round.number,
        experiment=experiment.pk,
        site=update.site.slug,
        kind=str(fl_round.kind),
        network=network_spec(experiment),
        data=DataSpec(
            name=dataset.name,
            num_classes=dataset.num_classes,
            class_names=dataset.class_names,
            channels=dataset.channels,
            image_shape=dataset.image_shape,
            normalization=dataset.normalization,
            validation_fraction=dataset.validation_fraction,
            task=dataset.task,
        ),
        train=TrainConfig(
            epochs=experiment.local_epochs,
            batch_size=experiment.batch_size,
            lr=experiment.learning_rate,
            optimizer=experiment.optimizer,
            seed=client_seed(experiment.seed, client_index),
            patch_size=tuple(experiment.patch_size),
            mixed_precision=settings.FEDLENS_MIXED_PRECISION,
        ),
        # Epochs are counted across rounds, so a client's data order never repeats a round's.
        start_epoch=(fl_round.number - 1) * experiment.local_epochs,
        options=client_options(fl_round, update.site.slug),
        weights_sha256=weights_sha256,
        payload_sha256=payload[1] if payload else "",
    )


@dataclass(frozen=True)
class AggregationOutcome:
    stored: modelstore.StoredWeights
    metrics: dict[str, Any]
    # Client update id to that update's metrics, now with the distance of its weights from
    # the new global weights ("distance_to_aggregate").
    client_metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    # Privacy spent up to this round (ε for the experiment's δ); None without client-level DP.
    epsilon: float | None = None
    # Client update id to why its update was left out (its file tampered with, unreadable,
    # not the network's tensors, or not finite): the ledger records those clients failed.
    rejected: dict[int, str] = field(default_factory=dict)


class AggregationFailed(Exception):
    """A round could not be aggregated; `rejected` are the updates left out before that."""

    def __init__(self, message: str, rejected: dict[int, str]) -> None:
        super().__init__(message)
        self.rejected = rejected


def rejection_reason(problem: str) -> str:
    return f"Its update was left out of aggregation: {problem}"


def run_aggregation(fl_round: Round) -> AggregationOutcome:
    """Stream the round's successful updates through the strategy, then evaluate.

    An update whose file does not verify (SHA-256, safetensors structure, the network's
    tensor names, shapes and dtypes, finite values) is a fault of its client, not of the
    round: it is left out and named in the outcome's `rejected`. Too few usable updates
    left (fewer than `min_clients`), or any other failure, raise AggregationFailed.
    """
    rejected: dict[int, str] = {}
    try:
        return aggregate_usable_updates(fl_round, rejected)
    except (AggregationFailed, DatabaseError):
        raise  # the database's errors as they are: the task retries a lost connection
    except Exception as error:
        raise AggregationFailed(str(error), rejected) from error


def aggregate_usable_updates(fl_round: Round, rejected: dict[int, str]) -> AggregationOutcome:
    """run_aggregation's work; each update it leaves out is added to `rejected`."""
    experiment = fl_round.experiment
    started = time.perf_counter()
    strategy = with_privacy(
        experiment_strategy(experiment), experiment, round_number=fl_round.number
    )
    start_name, start_sha256 = starting_checkpoint(experiment.pk, fl_round.number)
    # What the previous round's aggregation left, from the store: any worker may aggregate.
    strategy.load_state_dict(modelstore.load_strategy_state(start_name))
    start_weights = modelstore.load_stored_weights(start_name, start_sha256)
    # An update holds exactly the global model's tensors: the network's names and shapes.
    expected = {name: (tuple(t.shape), t.dtype) for name, t in start_weights.items()}
    strategy.begin_round(start_weights)
    # The strategy kept what it needs of them (plain FedAvg: nothing); holding them through
    # the round would cost a model's memory more than the running sum and one update.
    del start_weights
    updates = list(
        fl_round.client_updates.filter(status=ClientUpdateStatus.SUCCEEDED)
        .select_related("site")
        .order_by("pk")
    )
    usable = []
    received: dict[str, torch.Tensor] | None = None
    # One update in memory at a time, read into the tensors of the one before: the strategy
    # keeps only its running sum. Each is checked before the strategy sees it.
    for update in updates:
        try:
            received = modelstore.load_stored_weights(
                update.update_file.name, update.update_sha256, into=received
            )
        except (WeightsError, OSError) as error:
            rejected[update.pk] = rejection_reason(str(error))
            continue
        problem = weights_mismatch(received, expected)
        if problem is not None:
            rejected[update.pk] = rejection_reason(problem)
            continue
        strategy.accumulate(
            received,
            num_samples=update.num_samples,
            metrics={key: update.metrics[key] for key in TRAINING_METRICS if key in update.metrics},
            extras=update.metrics.get("extras"),
        )
        usable.append(update)
    left_out = [f"{u.site.slug}: {rejected[u.pk]}" for u in updates if u.pk in rejected]
    for line in left_out:
        logger.warning("round %s: the update of site %s", fl_round.number, line)
    if len(usable) < experiment.min_clients:
        raise AggregationFailed(
            f"{len(usable)} of its {len(updates)} client updates could be used, fewer than "
            f"the minimum of {experiment.min_clients}. " + "; ".join(left_out),
            rejected,
        )
    new_weights = strategy.finish_round()
    stored = modelstore.save_weights(
        modelstore.global_weights_name(experiment.pk, fl_round.number), new_weights
    )
    modelstore.save_strategy_files(
        stored.name, state=strategy.state_dict(), payload=strategy.client_payload()
    )
    # A second pass, one update at a time again into the same tensors, for each site's
    # distance from the result.
    files = [(update.update_file.name, update.update_sha256) for update in usable]
    reread = modelstore.stream_stored_weights(files, into=received)
    client_metrics = {
        update.pk: {**update.metrics, "distance_to_aggregate": l2_distance(weights, new_weights)}
        for update, weights in zip(usable, reread, strict=True)
    }
    del received, reread
    aggregated = time.perf_counter()

    evaluation: dict[str, Any] | None = None
    holdout = evaluation_data(experiment)
    if holdout is not None:
        network = network_with_weights(experiment, new_weights)
        evaluation = evaluate(
            network,
            holdout.dataset,
            holdout.indices,
            batch_size=evaluation_batch_size(experiment),
            patch_size=tuple(experiment.patch_size),
        )
    evaluated = time.perf_counter()
    return AggregationOutcome(
        stored=stored,
        client_metrics=client_metrics,
        epsilon=round_epsilon(experiment, fl_round.number),
        rejected=rejected,
        metrics={
            "global": evaluation,
            "clients": dict(strategy.round_metrics),
            "aggregation_seconds": aggregated - started,
            "evaluation_seconds": evaluated - aggregated,
        },
    )


def score(metrics: dict[str, Any], task: str = metric_catalog.CLASSIFICATION) -> float:
    """The number that decides the best checkpoint, higher better: the task's primary metric
    (accuracy, Dice) of the held-out evaluation, else of the clients' means; -inf when
    neither reports it, so that any round that does wins over such a round."""
    primary = metric_catalog.primary_metric(task)
    for source in (metrics.get("global"), metrics.get("clients")):
        value = (source or {}).get(primary)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return float("-inf")
