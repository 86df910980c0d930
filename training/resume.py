"""Resume: continue an experiment left `running` by a process that died, from its last
closed round.

Which experiments may resume: only `running` ones. A process that died leaves its
experiment running, and that is the case resume is for. A `failed`, `stopped` or
`completed` experiment has ended: its end was recorded, announced (a sweep started its
next experiment, MLflow closed the run) and its failed round keeps its rows; reopening it
would rewrite that history, so it is run anew instead (clone). An experiment that failed
because its process died is not left to fail: the embedded server resumes the experiments
of dead processes as it starts, before its watchdog runs (workers/embedded.py), and an
embedded watchdog does not fail their rounds at the deadline meanwhile (workers/tasks.py).
A queued experiment waits for its sites' approvals and a draft was never started: neither
has anything to resume.

In embedded mode an experiment is resumed only when no live embedded process drives it
(flproject/embedded_processes.py); in distributed mode the workers drive every experiment
and resume sends the open round's unfinished work again at once, as the watchdog would
(harmless when nothing was lost: the ledger counts each client and each round once).

What resume does, under the experiment's row lock: an open round's unfinished clients go
back to pending with a new task id and are sent again, with a new deadline; an open round
whose clients all reported is closed (to aggregation); an aggregating round's aggregation
is sent again. Recorded results (succeeded, failed or late clients, closed rounds, their
checkpoints) are never touched, and a report of the dead process's task that still
arrives is counted only if the client was not reported since (see record_client_result).
"""

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from flproject import embedded_processes
from training import services
from training.log_events import log_event
from training.models import (
    ClientUpdate,
    ClientUpdateStatus,
    Experiment,
    ExperimentStatus,
    InvalidTransition,
    RoundKind,
    RoundStatus,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resumed:
    experiment: Experiment
    what: str  # what was sent again, for people: "2 client tasks of round 3"


def resume_refusal(experiment: Experiment) -> str | None:
    """Why the experiment cannot be resumed now, or None if it can."""
    name = f"Experiment {experiment.pk}"
    if experiment.status == ExperimentStatus.DRAFT:
        return f"{name} is a draft: start it instead."
    if experiment.status == ExperimentStatus.QUEUED:
        return (
            f"{name} is queued: it waits for its sites' approvals and starts by itself "
            "once they decide; there is nothing to resume."
        )
    if experiment.status != ExperimentStatus.RUNNING:
        return (
            f"{name} is {experiment.status}: an experiment that ended cannot be resumed. "
            "Run it again instead (Run again with changes, or POST "
            f"/api/experiments/{experiment.pk}/clone/)."
        )
    if settings.FEDLENS_EMBEDDED:
        holder = embedded_processes.holder_of(experiment.pk)
        if holder is not None:
            return (
                f"{name} is being run by {holder.describe()}, which is alive: there is "
                "nothing to resume. Stop it if that process no longer makes progress."
            )
    return None


def resume_experiment(experiment_id: int) -> Resumed:
    """Continue a running experiment from its last closed round; InvalidTransition (with
    the reason) when it cannot be resumed."""
    with transaction.atomic():
        experiment = services.locked_experiment(experiment_id)
        refusal = resume_refusal(experiment)
        if refusal is not None:
            raise InvalidTransition(refusal)
        unfinished = (
            experiment.rounds.filter(status__in=[RoundStatus.OPEN, RoundStatus.AGGREGATING])
            .order_by("-number")
            .first()
        )
        if unfinished is None:
            what = continue_after_last_closed_round(experiment)
        elif unfinished.status == RoundStatus.AGGREGATING:
            services.resend_aggregation(unfinished, timezone.now())
            what = f"the aggregation of round {unfinished.number}"
        else:
            what = resume_open_round(experiment, unfinished.pk)
        log_event(logger, "experiment.resumed", experiment=experiment.pk, sent=what)
    return Resumed(experiment=experiment, what=what)


def resume_open_round(experiment: Experiment, round_id: int) -> str:
    """Send the open round's unfinished clients again, or close it if none is left. The
    caller holds the experiment's lock."""
    counted = services.counted_round_if_open(round_id)
    if not counted.unfinished:
        # Every client reported, but the process died before the last report closed it.
        services.close_round(experiment, counted)
        return f"the closing of round {counted.number}"
    unfinished = list(
        counted.client_updates.filter(status__in=services.UNFINISHED_CLIENT_STATUSES)
        .select_related("site")
        .select_for_update(of=("self",))
    )
    for update in unfinished:
        # A new task id: the dead process's id may have been revoked (stop) or be reused
        # by nobody; the row's own status still decides which report counts.
        update.status = ClientUpdateStatus.PENDING
        update.worker = ""
        update.started_at = None
        update.task_id = str(uuid.uuid4())
        update.attempts += 1
    ClientUpdate.objects.bulk_update(
        unfinished, ["status", "worker", "started_at", "task_id", "attempts"]
    )
    # A full round's time from now: the dead process's wait must not count against it.
    counted.deadline = timezone.now() + timedelta(seconds=experiment.round_timeout_seconds)
    counted.recoveries += 1
    counted.save(update_fields=["deadline", "recoveries"])
    dataset = experiment.dataset
    queues = [services.training_queue(dataset, update.site) for update in unfinished]
    transaction.on_commit(lambda: services.enqueue_training(unfinished, queues))
    kind = "evaluation" if counted.kind == RoundKind.EVALUATE else "client"
    return f"{len(unfinished)} {kind} task(s) of round {counted.number}"


def continue_after_last_closed_round(experiment: Experiment) -> str:
    """A running experiment with no round in progress: open the next one, or finish.
    Rounds open in the transaction that closes the previous one, so this is only a
    safeguard against a ledger edited by hand."""
    last = experiment.rounds.filter(status=RoundStatus.CLOSED).order_by("-number").first()
    if last is None:
        services.open_round(experiment, 1, experiment.dataset)
        return "round 1"
    if last.kind == RoundKind.EVALUATE:
        services.complete_experiment(experiment)
        return "nothing: the experiment completed"
    if last.number < experiment.num_rounds:
        services.open_round(experiment, last.number + 1, experiment.dataset)
        return f"round {last.number + 1}"
    services.finish_training(experiment, experiment.dataset, last.number)
    return "the cross-site evaluation"
