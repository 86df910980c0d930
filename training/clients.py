"""The server's side of the client protocol (training/fl/client.py).

A simulated site's client runs inside a server worker through `InProcessConnection`: no
HTTP, weights read from the model store once per process and round, results recorded
straight in the ledger. A real site's agent runs the same protocol over the Site API;
`receive_update` and `record_remote_result` are what the API does with what it sends.
"""

import hashlib
import logging
import math
import tempfile
from collections.abc import Mapping
from typing import IO

import torch
from django.core.files import File
from django.db import transaction

from training import federation, modelstore, services
from training.fl.client import (
    GLOBAL_MODEL,
    SITE_STATE_NAME,
    ClientReport,
    ClientTask,
    LocalData,
    run_client_task,
)
from training.fl.weights import WeightsError, load_weights, load_weights_file
from training.models import (
    ClientUpdate,
    ClientUpdateStatus,
    Experiment,
    RoundKind,
    model_store,
)

logger = logging.getLogger(__name__)

# A simulated site's state: SITE_STATE_FOLDER/<experiment>/<site slug>/<name>.safetensors.
SITE_STATE_FOLDER = "site-state"


class StoredSiteState:
    """A simulated site's state in one experiment, kept in the model store (the server
    plays the site, so the store is the site's own disk)."""

    def __init__(self, experiment_id: int, site_slug: str) -> None:
        self.folder = f"{SITE_STATE_FOLDER}/{experiment_id}/{site_slug}"

    def file_name(self, name: str) -> str:
        if not SITE_STATE_NAME.fullmatch(name):
            raise ValueError(f"a site state entry's name must match {SITE_STATE_NAME.pattern}")
        return f"{self.folder}/{name}.safetensors"

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        file_name = self.file_name(name)
        storage = model_store()
        if not storage.exists(file_name):
            return None
        with storage.open(file_name, "rb") as handle:
            return load_weights(handle.read())

    def save(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        modelstore.save_weights(self.file_name(name), tensors)


def forget_site_state(sender, instance: Experiment, **kwargs) -> None:
    """When an experiment is deleted, its simulated sites' state goes with it (once the
    deletion is committed)."""
    folder = f"{SITE_STATE_FOLDER}/{instance.pk}"

    def delete() -> None:
        storage = model_store()
        if not storage.exists(folder):
            return
        sites, _ = storage.listdir(folder)
        for site in sites:
            for entry in storage.listdir(f"{folder}/{site}")[1]:
                storage.delete(f"{folder}/{site}/{entry}")

    transaction.on_commit(delete)


class EvaluationModelUnavailable(LookupError):
    """An evaluate task asked for a model it does not name, or that does not exist."""


def evaluation_models(update: ClientUpdate) -> list[str]:
    """The labels of the models an evaluate task names (none for a training task)."""
    if update.round.kind != RoundKind.EVALUATE:
        return []
    return list(federation.client_options(update.round, update.site.slug).get("models", []))


def evaluation_model_file(experiment_id: int, round_number: int, label: str) -> tuple[str, str]:
    """File name and SHA-256 of a model of an evaluate task: the experiment's final global
    model (what the evaluate round starts from) for "global", else the last successful
    update of the site whose slug is ``label``."""
    if label == GLOBAL_MODEL:
        return federation.starting_checkpoint(experiment_id, round_number)
    last = last_local_models(experiment_id).get(label)
    if last is None:
        raise EvaluationModelUnavailable(
            f"Site {label!r} has no successful update in experiment {experiment_id}."
        )
    return last


@federation.cached_by_ledger_id(maxsize=8)
def last_local_models(experiment_id: int) -> dict[str, tuple[str, str]]:
    """Each site's last successful local model (file name, SHA-256), read in one query:
    a cross-site task evaluates every site's, and one query per site made its queries grow
    with the sites. Asked for only once training is over, when they no longer change."""
    updates = (
        ClientUpdate.objects.filter(
            round__experiment_id=experiment_id,
            round__kind=RoundKind.TRAIN,
            status=ClientUpdateStatus.SUCCEEDED,
        )
        .exclude(update_file="")
        .order_by("round__number")
        .values_list("site__slug", "update_file", "update_sha256")
    )
    # Later rounds come last and replace earlier ones.
    return {slug: (name, sha256) for slug, name, sha256 in updates}


class InProcessConnection:
    """The client protocol for a simulated site, inside the worker that claimed its task."""

    def __init__(self, claimed: ClientUpdate) -> None:
        self.claimed = claimed

    def starting_weights(self, task: ClientTask) -> Mapping[str, torch.Tensor]:
        return federation.global_weights(
            *federation.starting_checkpoint(task.experiment, task.round_number)
        )

    def strategy_payload(self, task: ClientTask) -> Mapping[str, torch.Tensor]:
        stored = federation.strategy_payload_file(task.experiment, task.round_number)
        if stored is None:
            raise LookupError(f"round {task.round_number}'s strategy payload is not stored")
        # Checked against the task's hash, not the stored one: the task says what to apply.
        return modelstore.load_stored_weights(stored[0], task.payload_sha256)

    def site_state(self, task: ClientTask) -> StoredSiteState:
        return StoredSiteState(task.experiment, task.site)

    def evaluation_weights(self, task: ClientTask, label: str) -> Mapping[str, torch.Tensor]:
        if label not in task.options.get("models", ()):
            raise EvaluationModelUnavailable(f"The task names no model {label!r}.")
        return modelstore.load_stored_weights(
            *evaluation_model_file(task.experiment, task.round_number, label)
        )

    def send_update(
        self, task: ClientTask, weights: Mapping[str, torch.Tensor], report: ClientReport
    ) -> bool:
        stored = modelstore.save_weights(
            modelstore.client_update_name(task.experiment, task.round_number, task.site), weights
        )
        return services.record_client_result(self.claimed, outcome=outcome(stored, report))

    def send_evaluation(self, task: ClientTask, report: ClientReport) -> bool:
        return services.record_client_result(self.claimed, outcome=outcome(None, report))

    def send_failure(self, task: ClientTask, error: str) -> bool:
        logger.warning("client update %s failed: %s", task.client_update, error)
        return services.record_client_result(self.claimed, error=error)


def outcome(
    stored: modelstore.StoredWeights | None, report: ClientReport
) -> federation.LocalTrainingOutcome:
    """What a ledger row keeps of a client's report, beside its stored weights (none for an
    evaluate task)."""
    metrics = dict(report.metrics)
    if report.extras:
        metrics["extras"] = dict(report.extras)
    return federation.LocalTrainingOutcome(
        stored, report.num_samples, metrics, evaluation=dict(report.evaluation)
    )


def simulated_local_data(update: ClientUpdate):
    def local_data(task: ClientTask) -> LocalData:
        data = federation.simulated_client_data(update.round.experiment, update.site_id)
        return data.dataset, data.indices

    return local_data


def train_simulated_client(claimed: ClientUpdate) -> bool:
    """Run a claimed simulated client's task in this process; whether its result counted."""
    if not federation.is_simulation(claimed.round.experiment.dataset):
        return services.record_client_result(
            claimed,
            error=f"Site {claimed.site.slug} trains on its own data: its task belongs on its "
            f"own queue ({claimed.site.queue}), consumed by its site agent, not a server worker.",
        )
    return run_client_task(
        federation.client_task(claimed),
        InProcessConnection(claimed),
        local_data=simulated_local_data(claimed),
        network=lambda task: federation.training_network(task.experiment),
    )


# --- What a real site sends ------------------------------------------------------------------


class UpdateRefused(ValueError):
    """An uploaded update that cannot be used; `status` is the HTTP status to answer."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# Room for the safetensors header: its JSON names each tensor with its dtype, shape and
# offsets, a few hundred bytes each at most for any name a network gives.
HEADER_BYTES_PER_TENSOR = 512
HEADER_BYTES_FIXED = 8 + 4096
CHUNK_BYTES = 1 << 20


@federation.cached_by_ledger_id(maxsize=16)
def expected_weights(experiment_id: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name to shape and dtype of every tensor the experiment's network holds, built on the
    meta device (no memory for the values)."""
    experiment = federation.experiment_configuration(experiment_id)
    with torch.device("meta"):
        network = federation.build_experiment_network(experiment)
    return {name: (tuple(t.shape), t.dtype) for name, t in network.state_dict().items()}


def upload_limit_bytes(experiment: Experiment) -> int:
    """The largest file the experiment's network can produce as a safetensors update."""
    shapes = expected_weights(experiment.pk)
    data = sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes.values())
    return data + HEADER_BYTES_FIXED + HEADER_BYTES_PER_TENSOR * len(shapes)


def receive_update(
    update: ClientUpdate, body: IO[bytes], *, declared_size: int, declared_sha256: str
) -> modelstore.StoredWeights:
    """Check an uploaded update and keep it in the model store.

    The body is streamed to a temporary file and hashed on the way, never held whole in
    memory; it is refused (UpdateRefused) when larger than the network allows, when its
    SHA-256 differs from the one declared, when it is not a safetensors file, or when its
    tensors are not exactly the network's (names, shapes, dtypes, finite values).
    Safetensors only: nothing a site sends is unpickled.
    """
    experiment = update.round.experiment
    limit = upload_limit_bytes(experiment)
    if declared_size > limit:
        raise UpdateRefused(
            f"The update is {declared_size} bytes; this experiment's network "
            f"({experiment.network}) produces at most {limit}.",
            status=413,
        )
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(prefix="fedlens-upload-", suffix=".safetensors") as spool:
        received = 0
        while chunk := body.read(CHUNK_BYTES):
            received += len(chunk)
            if received > limit:
                raise UpdateRefused(
                    f"The update is larger than this experiment's network produces ({limit} "
                    "bytes at most).",
                    status=413,
                )
            digest.update(chunk)
            spool.write(chunk)
        spool.flush()
        if received != declared_size:
            raise UpdateRefused(
                f"The upload ended after {received} of its {declared_size} bytes; send it again."
            )
        sha256 = digest.hexdigest()
        if sha256 != declared_sha256.lower():
            raise UpdateRefused(
                f"The update's SHA-256 is {sha256}, not the {declared_sha256} declared: it was "
                "changed after it was hashed (in transit, or tampered with)."
            )
        try:
            weights = load_weights_file(spool.name, expected_sha256=sha256)
        except WeightsError as error:
            raise UpdateRefused(f"The update is not a valid safetensors file: {error}") from None
        check_against_network(weights, expected_weights(experiment.pk))
        spool.seek(0)
        name = modelstore.client_update_name(experiment.pk, update.round.number, update.site.slug)
        stored_name = model_store().save(name, File(spool, name=name))
    return modelstore.StoredWeights(
        name=stored_name,
        sha256=sha256,
        size_bytes=received,
        num_parameters=sum(tensor.numel() for tensor in weights.values()),
    )


def check_against_network(
    weights: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
) -> None:
    missing, extra = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected)
    if missing or extra:
        raise UpdateRefused(
            f"The update's tensors are not the network's: missing {missing[:5]}, "
            f"unexpected {extra[:5]}."
        )
    for name, tensor in weights.items():
        shape, dtype = expected[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise UpdateRefused(
                f"Tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}; the network's is "
                f"{dtype} {shape}."
            )
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            raise UpdateRefused(f"Tensor {name!r} holds NaN or infinite values.")


def keep_uploaded_update(update: ClientUpdate, stored: modelstore.StoredWeights) -> bool:
    """Attach an accepted upload to the client's running row (replacing an earlier upload
    of the same task); False, and the file deleted, if the client is no longer running."""
    running = ClientUpdate.objects.filter(pk=update.pk, status=ClientUpdateStatus.RUNNING)
    previous = running.values_list("update_file", flat=True).first()
    if not running.update(update_file=stored.name, update_sha256=stored.sha256):
        modelstore.delete_weights(stored.name)
        return False
    if previous and previous != stored.name:
        modelstore.delete_weights(previous)
    return True


def record_remote_result(update: ClientUpdate, report: ClientReport) -> bool:
    """Record a site's report on the update it uploaded for this task before (an evaluate
    task uploads none)."""
    if update.round.kind == RoundKind.EVALUATE:
        return services.record_client_result(update, outcome=outcome(None, report))
    shapes = expected_weights(update.round.experiment_id)
    stored = modelstore.StoredWeights(
        name=update.update_file.name,
        sha256=update.update_sha256,
        size_bytes=model_store().size(update.update_file.name),
        num_parameters=sum(math.prod(shape) for shape, _ in shapes.values()),
    )
    return services.record_client_result(update, outcome=outcome(stored, report))
