"""Celery tasks. They take ids, re-read the database, and never carry weights.

Training and aggregation are idempotent: the ledger decides whether a delivery still has
work to do, so a task redelivered after a worker died never counts twice. Their outcome is
in the ledger, so they store no Celery result.
"""

import gc
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from celery import shared_task
from celery.signals import task_prerun, worker_process_init, worker_ready
from django.conf import settings
from django.db import close_old_connections

from flproject.observability import metrics
from training import clients, federation, recovery, services, sites, tracking
from training.models import Round, RoundStatus
from training.queues import (
    AGGREGATE_ROUND_TASK,
    CLOSE_OVERDUE_ROUNDS_TASK,
    EXPORT_TO_TRACKING_TASK,
    PING_TASK,
    SYNC_SITE_BROKER_USERS_TASK,
    TRAIN_CLIENT_TASK,
)
from training.reconnect import LOST_CONNECTION_ERRORS, retry_on_lost_connection
from workers import embedded
from workers import recovery as lost_work

logger = logging.getLogger(__name__)


@task_prerun.connect
def limit_torch_threads(**kwargs) -> None:
    """Each task computes with FEDLENS_TORCH_THREADS PyTorch threads (settings give each
    concurrent client of the embedded worker its share). OpenMP keeps the count per thread,
    and PyTorch gives a thread that never set one the count last set by any thread, which
    an aggregation raises for a while (`torch_threads`): so every task sets its own."""
    if torch.get_num_threads() != settings.FEDLENS_TORCH_THREADS:
        torch.set_num_threads(settings.FEDLENS_TORCH_THREADS)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """PyTorch's intra-op threads for this thread's work inside the block. OpenMP keeps the
    count per calling thread, so the embedded worker's other consumers keep theirs."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@worker_process_init.connect
def exempt_startup_objects_from_garbage_collection(**kwargs) -> None:
    """The objects of Django, Celery and PyTorch's start-up live as long as the process;
    a full collection walked all of them (0.3 s here) in the middle of some client's task.
    Frozen, they are never walked again."""
    gc.freeze()


@worker_ready.connect
def serve_worker_metrics(**kwargs) -> None:
    """In the main process of a `celery worker`, once it consumes: its metrics port."""
    metrics.serve_worker_metrics()


@task_prerun.connect
def refresh_database_connections(**kwargs) -> None:
    """Replace a connection that broke (database restart) or outlived CONN_MAX_AGE."""
    close_old_connections()


@shared_task(name=PING_TASK, bind=True, ignore_result=False)
def ping(self) -> dict[str, str | int]:
    """Say which worker and process answered: proves who consumes the queue pinged."""
    return {"reply": "pong", "worker": self.request.hostname or "", "pid": os.getpid()}


@shared_task(name=TRAIN_CLIENT_TASK, bind=True, ignore_result=True)
def train_client(self, client_update_id: int, round_id: int, site_id: int) -> str:
    """One client's local training for one round."""
    update = services.claim_client_update(
        client_update_id,
        round_id,
        site_id,
        worker=self.request.hostname or "",
        task_id=self.request.id or "",
    )
    if update is None:
        return "skipped: already finished or its round is closed"
    # The client protocol, in-process: a failure of the client is recorded, not raised.
    if not clients.train_simulated_client(update):
        return "not counted: the round closed without it"
    return update.status  # as recorded: succeeded or failed


@shared_task(name=AGGREGATE_ROUND_TASK, ignore_result=True)
def aggregate_round(round_id: int) -> str:
    """Aggregate a closed round's updates, evaluate, and move the experiment on."""
    fl_round = Round.objects.get(pk=round_id)
    if fl_round.status != RoundStatus.AGGREGATING:
        return "skipped: not waiting for aggregation"
    fl_round.experiment = federation.experiment_configuration(fl_round.experiment_id)
    try:
        with torch_threads(settings.FEDLENS_AGGREGATION_TORCH_THREADS):
            outcome = retry_on_lost_connection(
                lambda: federation.run_aggregation(fl_round),
                what=f"aggregating round {round_id}",
            )
    except LOST_CONNECTION_ERRORS:
        raise  # the database's fault, not the round's: the watchdog sends it again
    except Exception as exc:
        logger.exception("aggregation of round %s failed", round_id)
        # The updates it left out before failing are recorded against their clients.
        rejected = exc.rejected if isinstance(exc, federation.AggregationFailed) else {}
        reason = f"Aggregation of round {fl_round.number} failed: {exc}"
        services.fail_round(round_id, reason, rejected=rejected)
        return "failed"
    completed = services.complete_round(fl_round, outcome)
    # After the commit, outside the ledger's locks (MLflow may be slow or down): the round's
    # metrics, and the best checkpoint once the experiment has ended. Each export logs all
    # that the MLflow run lacks, so one that was missed is caught up by the next.
    tracking.export_experiment(fl_round.experiment_id)
    return "completed" if completed else "skipped: duplicate"


@shared_task(name=EXPORT_TO_TRACKING_TASK, ignore_result=True)
def export_to_tracking(experiment_id: int) -> None:
    """Log a stopped or failed experiment's end to MLflow (see training/tracking.py)."""
    tracking.export_experiment(experiment_id)


@shared_task(name=CLOSE_OVERDUE_ROUNDS_TASK, ignore_result=True)
def close_overdue_rounds() -> dict[str, list[int]]:
    """The round watchdog (Celery beat): close rounds whose deadline has passed, send again
    the client tasks and aggregations that a dead worker or a broker restart lost, and the
    aggregation of rounds that waited for it past their aggregation deadline."""
    # In embedded mode, the experiments of a dead process wait to be resumed, not failed.
    orphans = embedded.orphaned_experiments() if settings.FEDLENS_EMBEDDED else set()
    closed = services.close_overdue_rounds(leave_alone=frozenset(orphans))
    overdue_aggregations = services.resend_stalled_aggregations()
    outcome = recover_lost_work()
    outcome["aggregation_resent"] += overdue_aggregations
    metrics.ROUND_RECOVERIES.labels(lost="aggregation").inc(len(outcome["aggregation_resent"]))
    metrics.ROUND_RECOVERIES.labels(lost="client_task").inc(len(outcome["client_resent"]))
    return {"closed": closed, **outcome}


def recover_lost_work() -> dict[str, list[int]]:
    """Send again what is expected to be under way and is neither in the broker nor at a
    live worker (see workers/recovery.py); the ids of what was sent, or failed."""
    outcome: dict[str, list[int]] = {"aggregation_resent": [], "client_resent": [],
                                     "client_failed": []}  # fmt: skip
    if not lost_work.is_watched():
        return outcome
    expected = {
        **{("client", pk): task for pk, task in recovery.client_tasks_under_way().items()},
        **{("round", pk): task for pk, task in recovery.aggregations_under_way().items()},
    }
    try:
        lost = lost_work.lost(expected)
    except Exception as exc:  # redis-py and kombu raise errors of their own transports
        logger.warning("watchdog: could not look for lost tasks: %s", exc)
        return outcome
    for kind, pk in sorted(lost):
        task_id = expected[kind, pk].task_id
        if kind == "round":
            if recovery.resend_lost_aggregation(pk, task_id):
                outcome["aggregation_resent"].append(pk)
            continue
        done = recovery.resend_client_task(pk, task_id)
        if done != "skipped":
            outcome[f"client_{done}"].append(pk)
    return outcome


@shared_task(name=SYNC_SITE_BROKER_USERS_TASK, ignore_result=True)
def sync_site_broker_users() -> int:
    """Celery beat: give the broker back the sites' ACL users it lost (a restart without its
    ACL file) and take away those of revoked sites; see training/sites.py."""
    return sites.sync_broker_users()
