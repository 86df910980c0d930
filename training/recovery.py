"""The ledger's side of recovering lost work: which tasks should be under way, and sending
again those that the watchdog found neither in the broker nor at a live worker.

The watchdog (workers/tasks.py) looks for them (workers/recovery.py) every
FEDLENS_WATCHDOG_INTERVAL_SECONDS: a worker killed with its task, or a broker restarted
empty, loses the work within a minute instead of the broker's visibility timeout (an hour).
Each send is decided under the experiment's lock, against the task id that was found
missing, so a task that finished meanwhile, or that another watchdog run sent again, is
left alone. Whatever is sent twice is still counted once: a client's claim and report and
a round's completion are conditional on the row's status (training/services.py).
"""

import logging
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from training import services, signals
from training.log_events import log_event
from training.models import (
    ClientUpdate,
    ClientUpdateStatus,
    ExperimentStatus,
    Round,
    RoundStatus,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpectedTask:
    """A task that should be waiting in `queue` or running somewhere."""

    task_id: str
    queue: str
    # A real site's task: its agent answers no broadcast (its broker user may only consume
    # its queue), so one that it took is known by the site's heartbeats instead.
    site_slug: str = ""
    site_connected: bool = False


def client_tasks_under_way() -> dict[int, ExpectedTask]:
    """The task of each unfinished client of an open round, by client update id."""
    unfinished = ClientUpdate.objects.filter(
        status__in=services.UNFINISHED_CLIENT_STATUSES,
        round__status=RoundStatus.OPEN,
        round__experiment__status=ExperimentStatus.RUNNING,
    ).select_related("site", "round__experiment__dataset")
    expected = {}
    for update in unfinished:
        queue = services.training_queue(update.round.experiment.dataset, update.site)
        real_site = queue == update.site.queue
        expected[update.pk] = ExpectedTask(
            task_id=update.task_id,
            queue=queue,
            site_slug=update.site.slug if real_site else "",
            site_connected=real_site and update.site.is_connected,
        )
    return expected


def aggregations_under_way() -> dict[int, ExpectedTask]:
    """The aggregation task of each round waiting for it, by round id."""
    aggregating = Round.objects.filter(status=RoundStatus.AGGREGATING).exclude(
        aggregation_task_id=""
    )
    return {
        round_id: ExpectedTask(task_id=task_id, queue=services.AGGREGATION_QUEUE)
        for round_id, task_id in aggregating.values_list("pk", "aggregation_task_id")
    }


def resend_client_task(client_update_id: int, lost_task_id: str) -> str:
    """Send a lost client task again ("resent"), or, once it was sent
    FEDLENS_CLIENT_TASK_MAX_SENDS times, record the client failed ("failed"); "skipped"
    when the client finished or its task was sent again meanwhile."""
    experiment_id = (
        ClientUpdate.objects.filter(pk=client_update_id)
        .values_list("round__experiment_id", flat=True)
        .first()
    )
    if experiment_id is None:
        return "skipped"
    with transaction.atomic():
        experiment = services.locked_experiment(experiment_id)
        update = (
            ClientUpdate.objects.filter(
                pk=client_update_id,
                task_id=lost_task_id,
                status__in=services.UNFINISHED_CLIENT_STATUSES,
                round__status=RoundStatus.OPEN,
            )
            .select_related("site", "round")
            .first()
        )
        if update is None or experiment.status != ExperimentStatus.RUNNING:
            return "skipped"
        if update.attempts >= settings.FEDLENS_CLIENT_TASK_MAX_SENDS:
            give_up_on_client(experiment, update)
            return "failed"
        ClientUpdate.objects.filter(pk=update.pk).update(attempts=F("attempts") + 1)
        Round.objects.filter(pk=update.round_id).update(recoveries=F("recoveries") + 1)
        log_event(
            logger,
            "client.task_resent",
            level=logging.WARNING,
            **services.client_fields(update),
            attempt=update.attempts + 1,
        )
        queue = services.training_queue(experiment.dataset, update.site)
        # The same task id: a copy the broker hands back later finds the client claimed or
        # finished, as any duplicate delivery does.
        transaction.on_commit(lambda: services.enqueue_training([update], [queue]), robust=True)
    return "resent"


def give_up_on_client(experiment, update: ClientUpdate) -> None:
    """Record a client whose task was lost too often as failed, and close its round if it
    was the last one unfinished. The caller holds the experiment's lock."""
    update.status = ClientUpdateStatus.FAILED
    update.finished_at = timezone.now()
    update.error = (
        f"Its task was lost {update.attempts} times (its worker died or the broker lost it), "
        "and is not sent again: look at the workers' logs and the broker."
    )
    update.save(update_fields=["status", "finished_at", "error"])
    signals.client_reported.send(ClientUpdate, client_update=update)
    log_event(
        logger,
        "client.failed",
        level=logging.WARNING,
        **services.client_fields(update),
        error=update.error,
    )
    fl_round = services.counted_round_if_open(update.round_id)
    if fl_round is not None and not fl_round.unfinished:
        services.close_round(experiment, fl_round)


def resend_lost_aggregation(round_id: int, lost_task_id: str) -> bool:
    """Send a round's lost aggregation again; False when the round completed, or its
    aggregation was sent again, meanwhile."""
    experiment_id = (
        Round.objects.filter(pk=round_id).values_list("experiment_id", flat=True).first()
    )
    if experiment_id is None:
        return False
    with transaction.atomic():
        services.locked_experiment(experiment_id)
        fl_round = Round.objects.filter(
            pk=round_id, status=RoundStatus.AGGREGATING, aggregation_task_id=lost_task_id
        ).first()
        if fl_round is None:
            return False
        services.resend_aggregation(fl_round, timezone.now())
    return True


def stuck_rounds(now=None) -> int:
    """Rounds still aggregating past their aggregation deadline: by then the watchdog has
    had many chances to send their aggregation again, so it is not running, or not
    succeeding (an alert, and /health, say so)."""
    now = now or timezone.now()
    return Round.objects.filter(
        status=RoundStatus.AGGREGATING, aggregation_deadline__lt=now
    ).count()
