"""State transitions of the ledger: start and stop an experiment, open and close rounds.

Every change of an experiment's rounds runs in one transaction that first locks the
experiment's row: requests, workers and the watchdog take their turns on it, so that a
round is opened, closed and completed exactly once, and they never deadlock, as nothing
else is locked before it. The rounds read under that lock need no lock of their own. A
client's claim and its report are single conditional UPDATEs of its own row, without
other locks: the hot path of a round. Tasks are enqueued only after the transaction
commits, and carry ids, never weights.

What happened is announced with the signals of training/signals.py, inside the transaction;
the browser's events, the metrics and the MLflow export are their receivers.
"""

import logging
import random
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q
from django.utils import timezone

from flproject.celery import app as celery_app
from training import signals, site_evaluation
from training.log_events import log_event
from training.models import (
    ApprovalStatus,
    Checkpoint,
    ClientUpdate,
    ClientUpdateStatus,
    Dataset,
    Experiment,
    ExperimentApproval,
    ExperimentStatus,
    InvalidTransition,
    Round,
    RoundKind,
    RoundStatus,
    Site,
    SiteDataset,
)
from training.queues import (
    AGGREGATE_ROUND_TASK,
    AGGREGATION_QUEUE,
    TRAIN_CLIENT_TASK,
    TRAINING_QUEUE,
)
from training.reconnect import retry_on_lost_connection
from training.sampling import clients_in_round

if TYPE_CHECKING:
    from training import federation

# training.federation and training.modelstore (PyTorch, the engine) are imported by the
# functions that use them, so that a web process handling requests starts without them.

logger = logging.getLogger(__name__)

UNFINISHED_CLIENT_STATUSES = (ClientUpdateStatus.PENDING, ClientUpdateStatus.RUNNING)


def pick_clients(experiment: Experiment, number: int) -> list[Site]:
    """Choose the round's clients among the experiment's active sites, reproducibly."""
    # A site whose operator refused the experiment is never picked (one subquery, no trip).
    refused = ExperimentApproval.objects.filter(
        experiment=experiment, status=ApprovalStatus.REFUSED
    ).values("site_id")
    candidates = list(
        experiment.sites.filter(is_active=True).exclude(pk__in=refused).order_by("pk")
    )
    if len(candidates) < experiment.min_clients:
        raise InvalidTransition(
            f"Experiment {experiment.pk} needs at least {experiment.min_clients} active sites "
            f"and has {len(candidates)}; activate or add sites first."
        )
    wanted = clients_in_round(
        len(candidates),
        clients_per_round=experiment.clients_per_round,
        client_fraction=experiment.client_fraction,
        min_clients=experiment.min_clients,
    )
    # Seeded by experiment and round, so that a rerun picks the same clients.
    chooser = random.Random(experiment.seed * 100_003 + number)  # noqa: S311 - not security
    return sorted(chooser.sample(candidates, wanted), key=lambda site: site.pk)


def training_queue(dataset: Dataset, site: Site) -> str:
    """Simulated clients share the training queue; a real site trains on its own node."""
    return TRAINING_QUEUE if not dataset.is_federated else site.queue


def send_task(name: str, *, args: list, queue: str, **options) -> None:
    """Queue one of the ledger's tasks. Their outcome is in the ledger, not in a Celery
    result: a sender that expected one would subscribe to it in Redis for nothing."""
    celery_app.send_task(name, args=args, queue=queue, ignore_result=True, **options)


def enqueue_training(updates: list[ClientUpdate], queues: list[str]) -> None:
    """Send the round's training tasks through one producer (one broker connection)."""
    with celery_app.producer_or_acquire() as producer:
        for update, queue in zip(updates, queues, strict=True):
            send_task(
                TRAIN_CLIENT_TASK,
                args=[update.pk, update.round_id, update.site_id],
                queue=queue,
                task_id=update.task_id,
                producer=producer,
            )


def open_round(experiment: Experiment, number: int, dataset: Dataset) -> Round:
    """Create round `number` with one pending ClientUpdate per picked client, and queue
    their training once the transaction commits. The caller holds the experiment's lock;
    `dataset` is the experiment's, which decides the clients' queues."""
    clients = pick_clients(experiment, number)
    now = timezone.now()
    new_round = Round.objects.create(
        experiment=experiment,
        number=number,
        opened_at=now,
        deadline=now + timedelta(seconds=experiment.round_timeout_seconds),
    )
    updates = ClientUpdate.objects.bulk_create(
        ClientUpdate(round=new_round, site=site, task_id=str(uuid.uuid4()), attempts=1)
        for site in clients
    )
    experiment.current_round = number
    experiment.save(update_fields=["current_round", "updated_at"])
    # A new round has no checkpoint: said here, its event need not ask the database.
    Round.checkpoint.related.set_cached_value(new_round, None)
    signals.round_opened.send(Round, fl_round=new_round, client_updates=updates)
    log_event(logger, "round.opened", experiment=experiment.pk, round=number, clients=len(updates))
    queues = [training_queue(dataset, site) for site in clients]
    # Robust: a broker that is down must not fail the committed round's caller; the
    # watchdog finds the tasks missing and sends them again (training/recovery.py).
    transaction.on_commit(lambda: enqueue_training(updates, queues), robust=True)
    return new_round


def locked_experiment(experiment_id: int) -> Experiment:
    # The experiment's row only; its dataset is read when a round opens, if at all.
    return Experiment.objects.select_for_update().get(pk=experiment_id)


def start_experiment(experiment_id: int) -> Experiment:
    """draft -> running: store the initial global model and open round 1. An experiment on
    a federated dataset whose sites' operators require approval waits (queued) for them."""
    with transaction.atomic():
        experiment = locked_experiment(experiment_id)
        if experiment.status != ExperimentStatus.DRAFT:
            raise InvalidTransition(
                f"Experiment {experiment.pk} is {experiment.status}; only a draft can be started."
            )
        pick_clients(experiment, 1)  # refuse before any work if too few sites are active
        if experiment.dataset.is_federated:
            check_sites_hold_dataset(experiment)
            waiting = request_approvals(experiment)
            if waiting:
                experiment.transition_to(ExperimentStatus.QUEUED)
                log_event(
                    logger, "experiment.awaiting_approval", experiment=experiment.pk, sites=waiting
                )
                return experiment
        begin_running(experiment)
    return experiment


def begin_running(experiment: Experiment) -> None:
    """Store the initial global model, open round 1 and move to running; the caller holds
    the experiment's lock."""
    from training import federation

    stored = federation.store_initial_weights(experiment)
    Checkpoint.objects.create(
        experiment=experiment,
        file=stored.name,
        sha256=stored.sha256,
        size_bytes=stored.size_bytes,
        num_parameters=stored.num_parameters,
    )
    open_round(experiment, 1, experiment.dataset)
    experiment.transition_to(ExperimentStatus.RUNNING)
    log_event(logger, "experiment.started", experiment=experiment.pk)


def check_sites_hold_dataset(experiment: Experiment) -> None:
    """Every site of an experiment on a federated dataset must have declared that dataset."""
    declared = set(
        SiteDataset.objects.filter(dataset=experiment.dataset_id).values_list("site_id", flat=True)
    )
    missing = sorted(site.slug for site in experiment.sites.all() if site.pk not in declared)
    if missing:
        raise InvalidTransition(
            f"Sites {', '.join(missing)} hold no data of dataset {experiment.dataset.name!r}: "
            "their operators declare it with `python -m workers.site datasets add`, or remove "
            "those sites from the experiment."
        )


def request_approvals(experiment: Experiment) -> list[str]:
    """Ask the operators of the experiment's sites that require it; the slugs still waiting."""
    waiting = []
    for site in experiment.sites.filter(is_active=True, requires_approval=True):
        approval, _ = ExperimentApproval.objects.get_or_create(experiment=experiment, site=site)
        if approval.status == ApprovalStatus.PENDING:
            waiting.append(site.slug)
    return waiting


def decide_approval(
    experiment_id: int, site: Site, *, approved: bool, reason: str = ""
) -> ExperimentApproval:
    """Record a site operator's decision; a queued experiment starts once no approval is
    pending, or fails if too few of its sites may then take part."""
    with transaction.atomic():
        experiment = locked_experiment(experiment_id)
        approval = ExperimentApproval.objects.get(experiment=experiment, site=site)
        if experiment.is_terminal:
            raise InvalidTransition(
                f"Experiment {experiment.pk} is {experiment.status}; its approvals are closed."
            )
        approval.status = ApprovalStatus.APPROVED if approved else ApprovalStatus.REFUSED
        approval.reason = reason
        approval.decided_at = timezone.now()
        approval.save(update_fields=["status", "reason", "decided_at"])
        log_event(
            logger,
            "experiment.approval",
            experiment=experiment.pk,
            site=site.slug,
            decision=approval.status,
        )
        pending = experiment.approvals.filter(status=ApprovalStatus.PENDING).exists()
        if experiment.status == ExperimentStatus.QUEUED and not pending:
            try:
                pick_clients(experiment, 1)
            except InvalidTransition as too_few:
                fail_experiment(experiment, f"Too few sites approved the experiment. {too_few}")
            else:
                begin_running(experiment)
    return approval


def stop_experiment(experiment_id: int, *, reason: str = "Stopped by a user.") -> Experiment:
    """queued/running -> stopped; the open round fails and its unfinished clients with it."""
    with transaction.atomic():
        experiment = locked_experiment(experiment_id)
        if not experiment.can_transition_to(ExperimentStatus.STOPPED):
            raise InvalidTransition(
                f"Experiment {experiment.pk} is {experiment.status}; "
                "only a queued or running experiment can be stopped."
            )
        fail_unfinished_rounds(experiment, reason)
        experiment.transition_to(ExperimentStatus.STOPPED, reason=reason)
        signals.experiment_ended.send(Experiment, experiment=experiment)
        log_event(logger, "experiment.stopped", experiment=experiment.pk, reason=reason)
    revoke_unfinished_tasks(experiment)
    return experiment


def fail_unfinished_rounds(experiment: Experiment, reason: str) -> None:
    now = timezone.now()
    unfinished_rounds = experiment.rounds.filter(
        status__in=[RoundStatus.OPEN, RoundStatus.AGGREGATING]
    )
    ClientUpdate.objects.filter(
        round__in=unfinished_rounds, status__in=UNFINISHED_CLIENT_STATUSES
    ).update(status=ClientUpdateStatus.FAILED, error=reason, finished_at=now)
    unfinished_rounds.update(status=RoundStatus.FAILED, closed_at=now)


def revoke_unfinished_tasks(experiment: Experiment) -> None:
    """Tell workers to drop queued training of a stopped experiment (a task that runs
    anyway finds its round closed and stores nothing)."""
    task_ids = list(
        ClientUpdate.objects.filter(round__experiment=experiment, finished_at__isnull=True)
        .exclude(task_id="")
        .values_list("task_id", flat=True)
    )
    if task_ids:
        celery_app.control.revoke(task_ids)


def fail_experiment(experiment: Experiment, reason: str) -> None:
    """The caller holds the experiment's lock."""
    fail_unfinished_rounds(experiment, reason)
    experiment.transition_to(ExperimentStatus.FAILED, reason=reason)
    signals.experiment_ended.send(Experiment, experiment=experiment)
    log_event(
        logger, "experiment.failed", level=logging.WARNING, experiment=experiment.pk, reason=reason
    )


# --- Client updates ------------------------------------------------------------------------


def claim_client_update(
    client_update_id: int, round_id: int, site_id: int, *, worker: str, task_id: str
) -> ClientUpdate | None:
    """Mark a client's training as running, or return None if it must not run: it already
    finished (a duplicate delivery of the task), or its round closed without it. The ids
    and the task id are those of the task's message (see enqueue_training).

    The returned update carries its round, its site and the experiment's configuration.
    """
    now = timezone.now()
    # One conditional UPDATE: PostgreSQL re-checks the status on the row it locks, so a
    # watchdog or a stop that finished this client first always wins. The client's own
    # status is enough: a round leaves "open" only in a transaction that finishes all its
    # unfinished clients. RUNNING may be claimed again: the worker that had it died and the
    # broker delivered it anew.
    claimed = ClientUpdate.objects.filter(
        pk=client_update_id,
        round_id=round_id,
        site_id=site_id,
        status__in=UNFINISHED_CLIENT_STATUSES,
    ).update(status=ClientUpdateStatus.RUNNING, worker=worker, started_at=now)
    if not claimed:
        return None
    # Not read back (a query with two joins cost as much as the UPDATE): the UPDATE matched
    # this site's row of this round, and an unfinished row holds nothing but what the claim
    # just wrote and the id of the task it was sent with.
    from training import federation

    fl_round = federation.round_for_clients(round_id)
    update = ClientUpdate(
        pk=client_update_id,
        round=fl_round,
        site=federation.experiment_sites(fl_round.experiment_id)[site_id],
        status=ClientUpdateStatus.RUNNING,
        worker=worker,
        started_at=now,
        task_id=task_id,
    )
    if not federation.is_simulation(fl_round.experiment.dataset):
        Site.objects.filter(pk=site_id).update(last_seen=now)
    signals.client_started.send(ClientUpdate, client_update=update)
    log_event(logger, "client.started", **client_fields(update), worker=worker)
    return update


def client_fields(update: ClientUpdate) -> dict:
    """The ids that a client's log lines carry."""
    return {
        "experiment": update.round.experiment_id,
        "round": update.round.number,
        "site": update.site.slug,
    }


def record_client_result(
    claimed: ClientUpdate,
    *,
    outcome: "federation.LocalTrainingOutcome | None" = None,
    error: str = "",
) -> bool:
    """Store a client's update (or its failure), and close the round if it was the last.

    `claimed` is what claim_client_update returned. Returns False when the client was no
    longer running: the round's deadline or a stop finished it first (it stays late or
    failed), or another delivery of the task recorded it. Such a report is not counted.
    """
    now = timezone.now()
    if claimed.started_at is not None:
        signals.client_task_ended.send(
            ClientUpdate,
            site_slug=claimed.site.slug,
            duration_seconds=(now - claimed.started_at).total_seconds(),
        )
    if outcome is None:
        result = {"status": ClientUpdateStatus.FAILED, "error": error}
    else:
        result = {
            "status": ClientUpdateStatus.SUCCEEDED,
            "num_samples": outcome.num_samples,
            "metrics": outcome.metrics,
            "evaluation": outcome.evaluation,
        }
        if outcome.stored is not None:  # an evaluate task sends no weights
            result["update_file"] = outcome.stored.name
            result["update_sha256"] = outcome.stored.sha256
    result["finished_at"] = now

    def record() -> bool:
        # Without locks: the row's own status decides (see claim_client_update), and
        # whichever report comes last sees every other one committed and closes the round.
        running = ClientUpdate.objects.filter(pk=claimed.pk, status=ClientUpdateStatus.RUNNING)
        if running.update(**result):
            return True
        # Or a try before this one committed it and lost its connection before the answer:
        # its finish time, to the microsecond, is this report's own.
        return ClientUpdate.objects.filter(
            pk=claimed.pk, status=result["status"], finished_at=now
        ).exists()

    report = f"the report of client update {claimed.pk}"
    recorded = retry_on_lost_connection(record, what=report)
    if not recorded:
        if outcome is not None and outcome.stored is not None:  # nobody will read them
            from training import modelstore

            modelstore.delete_weights(outcome.stored.name)
        log_event(logger, "client.not_counted", level=logging.WARNING, **client_fields(claimed))
        return False
    for name, value in result.items():
        setattr(claimed, name, value)
    signals.client_reported.send(ClientUpdate, client_update=claimed)
    if outcome is None:
        log_event(
            logger, "client.failed", level=logging.WARNING, **client_fields(claimed), error=error
        )
    else:
        log_event(logger, "client.finished", **client_fields(claimed))
    unfinished = ClientUpdate.objects.filter(
        round_id=claimed.round_id, status__in=UNFINISHED_CLIENT_STATUSES
    )

    def close_if_last() -> None:
        if not unfinished.exists():
            close_complete_round(claimed.round.experiment_id, claimed.round_id)

    retry_on_lost_connection(close_if_last, what=report)
    return True


def close_complete_round(experiment_id: int, round_id: int) -> bool:
    """Close an open round whose clients have all reported. Two last reports may both get
    here, or the watchdog with them: the experiment's lock and the check under it let one
    of them close it."""
    with transaction.atomic():
        experiment = locked_experiment(experiment_id)
        fl_round = counted_round_if_open(round_id)
        if fl_round is None or fl_round.unfinished:
            return False
        close_round(experiment, fl_round)
    return True


def counted_round_if_open(round_id: int) -> Round | None:
    """The round if it is still open, with the number of its clients (`total`), of those
    that succeeded and of those unfinished, in one query; None once it has closed."""
    clients = "client_updates"
    return (
        Round.objects.filter(pk=round_id, status=RoundStatus.OPEN)
        .annotate(
            total=Count(clients),
            succeeded=Count(clients, filter=Q(client_updates__status=ClientUpdateStatus.SUCCEEDED)),
            unfinished=Count(
                clients, filter=Q(client_updates__status__in=UNFINISHED_CLIENT_STATUSES)
            ),
        )
        .first()
    )


def close_round(experiment: Experiment, fl_round: Round) -> None:
    """Move an open round whose clients have all finished (`fl_round` as counted by
    counted_round_if_open) to aggregation, or fail it (and its experiment) if too few
    clients succeeded; a cross-site round closes without aggregation. The caller holds the
    experiment's lock; this happens exactly once per round."""
    if fl_round.kind == RoundKind.EVALUATE:
        close_cross_site_round(experiment, fl_round)
        return
    # Its clients evaluated its starting model, the round before's, before training.
    evaluated = site_evaluation.file_starting_model_evaluations(fl_round)
    if evaluated is not None:
        signals.round_evaluated.send(Round, fl_round=evaluated)
    succeeded, total = fl_round.succeeded, fl_round.total
    if succeeded < experiment.min_clients:
        reason = (
            f"Round {fl_round.number}: {succeeded} of {total} clients succeeded, "
            f"fewer than the minimum of {experiment.min_clients}. {clients_errors(fl_round)}"
        )
        fail_experiment(experiment, reason.strip())
        return
    fl_round.status = RoundStatus.AGGREGATING
    fl_round.aggregation_deadline = aggregation_deadline(timezone.now())
    fl_round.aggregation_task_id = str(uuid.uuid4())
    fl_round.save(update_fields=["status", "aggregation_deadline", "aggregation_task_id"])
    log_event(
        logger,
        "round.aggregating",
        experiment=experiment.pk,
        round=fl_round.number,
        succeeded=succeeded,
    )
    send_aggregation_after_commit(fl_round)


def aggregation_deadline(now: datetime) -> datetime:
    """When the watchdog sends a round's aggregation again if the round still waits for it.
    By then a delivered task has ended or met its time limit, and the broker has handed
    back a message that a dead worker held (its visibility timeout is the same wait)."""
    return now + timedelta(seconds=settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"])


def send_aggregation_after_commit(fl_round: Round) -> None:
    """Send the round's aggregation, as `aggregation_task_id`, once the round's closing
    commits. Robust: with the broker down the round stays closed and recorded, and the
    watchdog, finding its aggregation neither queued nor running, sends it again."""
    round_id, task_id = fl_round.pk, fl_round.aggregation_task_id
    transaction.on_commit(
        lambda: send_task(
            AGGREGATE_ROUND_TASK, args=[round_id], queue=AGGREGATION_QUEUE, task_id=task_id
        ),
        robust=True,
    )


def close_overdue_rounds(now=None, *, leave_alone: frozenset[int] = frozenset()) -> list[int]:
    """The watchdog: close each open round past its deadline (unfinished clients are late),
    and each open round whose clients have all reported but that nobody closed (the last
    report's worker died between recording its result and closing the round). The rounds
    of the experiments in `leave_alone` are not closed at their deadline: their clients are
    not late, the process that had their tasks died (they resume instead)."""
    now = now or timezone.now()
    closed = []
    complete = Round.objects.filter(status=RoundStatus.OPEN).exclude(
        client_updates__status__in=UNFINISHED_CLIENT_STATUSES
    )
    for round_id, experiment_id in complete.values_list("pk", "experiment_id"):
        if close_complete_round(experiment_id, round_id):
            closed.append(round_id)
    overdue = Round.objects.filter(status=RoundStatus.OPEN, deadline__lt=now).exclude(
        experiment_id__in=leave_alone
    )
    for round_id, experiment_id in overdue.values_list("pk", "experiment_id"):
        with transaction.atomic():
            experiment = locked_experiment(experiment_id)
            fl_round = Round.objects.get(pk=round_id)
            if fl_round.status != RoundStatus.OPEN:
                continue
            missing = list(
                fl_round.client_updates.filter(status__in=UNFINISHED_CLIENT_STATUSES)
                .select_related("site")
                .select_for_update(of=("self",))
            )
            error = "The round's deadline passed before this client reported."
            for update in missing:
                update.status, update.finished_at, update.error = (
                    ClientUpdateStatus.LATE,
                    now,
                    error,
                )
                update.round = fl_round
                signals.client_late.send(ClientUpdate, client_update=update)
                log_event(logger, "client.late", level=logging.WARNING, **client_fields(update))
            ClientUpdate.objects.bulk_update(missing, ["status", "finished_at", "error"])
            log_event(
                logger,
                "round.deadline_passed",
                experiment=experiment_id,
                round=fl_round.number,
                late=len(missing),
            )
            close_round(experiment, counted_round_if_open(round_id))
            closed.append(round_id)
    return closed


def resend_stalled_aggregations(now=None) -> list[int]:
    """The watchdog: send the aggregation of each round still aggregating past its
    aggregation deadline again. Its task was lost (the process that closed the round died
    before sending it, or the broker lost it) or ended without completing the round (a
    database error after aggregating). A second aggregation of the same round is harmless:
    it writes a file of its own, and only one completes the round."""
    now = now or timezone.now()
    resent = []
    # A round that closed before rounds had an aggregation deadline (an upgrade) is due.
    due = Q(aggregation_deadline__lt=now) | Q(aggregation_deadline__isnull=True)
    stalled = Round.objects.filter(due, status=RoundStatus.AGGREGATING)
    for round_id, experiment_id in stalled.values_list("pk", "experiment_id"):
        with transaction.atomic():
            locked_experiment(experiment_id)
            fl_round = stalled.filter(pk=round_id).first()
            if fl_round is None:
                continue  # completed, or sent again by another watchdog run meanwhile
            resend_aggregation(fl_round, now)
        resent.append(round_id)
    return resent


def resend_aggregation(fl_round: Round, now: datetime) -> None:
    """Send an aggregating round's aggregation again, under a new task id, and count the
    recovery. The caller holds the experiment's lock and has seen the round aggregating."""
    fl_round.aggregation_deadline = aggregation_deadline(now)
    fl_round.aggregation_task_id = str(uuid.uuid4())
    fl_round.recoveries += 1
    fl_round.save(update_fields=["aggregation_deadline", "aggregation_task_id", "recoveries"])
    log_event(
        logger,
        "round.aggregation_resent",
        level=logging.WARNING,
        experiment=fl_round.experiment_id,
        round=fl_round.number,
        recoveries=fl_round.recoveries,
    )
    send_aggregation_after_commit(fl_round)


# --- Aggregation ---------------------------------------------------------------------------


def complete_round(fl_round: Round, outcome: "federation.AggregationOutcome") -> bool:
    """Record the new global model, then open the next round or finish the experiment.

    `fl_round` is the round as the aggregation task read it: its number and opening time
    never change. Returns False when the round was already completed (a duplicate
    aggregation task). Tried again on a new connection when the database connection breaks.
    """
    # Once for all tries: the closing time tells a try its own earlier commit.
    now = timezone.now()
    return retry_on_lost_connection(
        lambda: record_completed_round(fl_round, outcome, now),
        what=f"the completion of round {fl_round.pk}",
    )


def record_completed_round(
    fl_round: Round, outcome: "federation.AggregationOutcome", now: datetime
) -> bool:
    from training import federation, modelstore

    with transaction.atomic():
        experiment = locked_experiment(fl_round.experiment_id)
        closing = {
            "status": RoundStatus.CLOSED,
            "closed_at": now,
            "metrics": {
                **outcome.metrics,
                "wall_seconds": (now - fl_round.opened_at).total_seconds(),
            },
            "epsilon": outcome.epsilon,
        }
        # Conditional: a duplicate aggregation task finds the round closed and writes nothing.
        if not Round.objects.filter(pk=fl_round.pk, status=RoundStatus.AGGREGATING).update(
            **closing
        ):
            # A try before this one committed this very outcome, then lost its connection.
            if Round.objects.filter(pk=fl_round.pk, closed_at=now).exists():
                return True
            modelstore.delete_checkpoint_files(outcome.stored.name)  # nobody will read these
            return False
        for name, value in closing.items():
            setattr(fl_round, name, value)
        record_updates_left_out(fl_round.pk, outcome.rejected)
        score = federation.score(outcome.metrics, experiment.task)
        best = Checkpoint.objects.filter(experiment=experiment, is_best=True).first()
        is_best = best is None or score > federation.score(best.metrics, experiment.task)
        if is_best and best is not None:
            Checkpoint.objects.filter(pk=best.pk).update(is_best=False)
        Checkpoint.objects.create(
            experiment=experiment,
            round=fl_round,
            file=outcome.stored.name,
            sha256=outcome.stored.sha256,
            size_bytes=outcome.stored.size_bytes,
            num_parameters=outcome.stored.num_parameters,
            metrics=outcome.metrics,
            is_best=is_best,
        )
        # The updates are final once their round closed: their metrics as aggregation read
        # them, with the distances added, can be written back without reading them again.
        ClientUpdate.objects.bulk_update(
            [ClientUpdate(pk=pk, metrics=values) for pk, values in outcome.client_metrics.items()],
            ["metrics"],
        )
        signals.round_closed.send(Round, fl_round=fl_round)
        held_out = outcome.metrics.get("global") or {}
        log_event(
            logger,
            "round.closed",
            experiment=experiment.pk,
            round=fl_round.number,
            accuracy=held_out.get("accuracy"),
            auc=held_out.get("roc_auc"),
            loss=held_out.get("loss"),
        )
        if experiment.status != ExperimentStatus.RUNNING:
            return True
        # The aggregation task's copy of the configuration spares reading the dataset.
        if fl_round.number < experiment.num_rounds:
            open_round(experiment, fl_round.number + 1, fl_round.experiment.dataset)
        else:
            finish_training(experiment, fl_round.experiment.dataset, fl_round.number)
    return True


def complete_experiment(experiment: Experiment) -> None:
    """running -> completed; the caller holds the experiment's lock."""
    experiment.transition_to(ExperimentStatus.COMPLETED)
    signals.experiment_ended.send(Experiment, experiment=experiment)
    log_event(logger, "experiment.finished", experiment=experiment.pk)


def fail_round(round_id: int, reason: str, *, rejected: dict[int, str] | None = None) -> None:
    """A round's aggregation failed: so does its experiment, unless another aggregation of
    the round (see resend_stalled_aggregations) completed it meanwhile. `rejected`: the
    updates the aggregation left out before it failed, with why."""
    with transaction.atomic():
        experiment_id = Round.objects.values_list("experiment_id", flat=True).get(pk=round_id)
        experiment = locked_experiment(experiment_id)
        still_aggregating = Round.objects.filter(pk=round_id, status=RoundStatus.AGGREGATING)
        if experiment.status == ExperimentStatus.RUNNING and still_aggregating.exists():
            record_updates_left_out(round_id, rejected or {})
            fail_experiment(experiment, reason)


def record_updates_left_out(round_id: int, rejected: dict[int, str]) -> None:
    """Record as failed, with the reason, each update that aggregation left out (its file
    did not verify): the fault of that client, which the round no longer counts. The
    caller holds the experiment's lock."""
    left_out = list(
        ClientUpdate.objects.filter(
            pk__in=rejected, round_id=round_id, status=ClientUpdateStatus.SUCCEEDED
        ).select_related("site", "round")
    )
    for update in left_out:
        update.status, update.error = ClientUpdateStatus.FAILED, rejected[update.pk]
    ClientUpdate.objects.bulk_update(left_out, ["status", "error"])
    for update in left_out:
        signals.client_reported.send(ClientUpdate, client_update=update)
        log_event(
            logger,
            "client.left_out",
            level=logging.WARNING,
            **client_fields(update),
            error=update.error,
        )


def clients_errors(fl_round: Round) -> str:
    """What went wrong with a round's clients that did not succeed, one line per distinct
    error with the sites that had it: what a failed round's reason quotes."""
    by_error: dict[str, list[str]] = {}
    unsuccessful = (
        fl_round.client_updates.exclude(status=ClientUpdateStatus.SUCCEEDED)
        .order_by("site__slug")
        .values_list("site__slug", "error")
    )
    for slug, error in unsuccessful:
        by_error.setdefault(error or "no error recorded", []).append(slug)
    return " ".join(f"{', '.join(slugs)}: {error}" for error, slugs in by_error.items())


# --- Evaluation where the data is ------------------------------------------------------------


def evaluating_sites(experiment: Experiment) -> list[Site]:
    """The sites asked to evaluate in the cross-site round: every active site of the
    experiment whose operator did not refuse it."""
    refused = ExperimentApproval.objects.filter(
        experiment=experiment, status=ApprovalStatus.REFUSED
    ).values("site_id")
    return list(experiment.sites.filter(is_active=True).exclude(pk__in=refused).order_by("pk"))


def finish_training(experiment: Experiment, dataset: Dataset, last_round_number: int) -> None:
    """After the last training round closed: open the cross-site round, or complete the
    experiment when the sites keep no validation data (or none may take part)."""
    sites = evaluating_sites(experiment) if dataset.validation_fraction > 0 else []
    if sites:
        open_cross_site_round(experiment, dataset, sites, last_round_number + 1)
    else:
        complete_experiment(experiment)


def open_cross_site_round(
    experiment: Experiment, dataset: Dataset, sites: list[Site], number: int
) -> Round:
    """Create the cross-site round with one pending task per site, each to evaluate the
    final global model and every site's last local model on its own validation split, and
    queue them once the transaction commits. The caller holds the experiment's lock."""
    now = timezone.now()
    new_round = Round.objects.create(
        experiment=experiment,
        number=number,
        kind=RoundKind.EVALUATE,
        opened_at=now,
        deadline=now + timedelta(seconds=experiment.round_timeout_seconds),
        metrics={"models": site_evaluation.evaluation_models(experiment.pk)},
    )
    updates = ClientUpdate.objects.bulk_create(
        ClientUpdate(round=new_round, site=site, task_id=str(uuid.uuid4()), attempts=1)
        for site in sites
    )
    Round.checkpoint.related.set_cached_value(new_round, None)
    # The round in progress, as for training rounds; it is num_rounds + 1 only here.
    experiment.current_round = number
    experiment.save(update_fields=["current_round", "updated_at"])
    signals.round_opened.send(Round, fl_round=new_round, client_updates=updates)
    log_event(
        logger,
        "round.opened",
        experiment=experiment.pk,
        round=number,
        kind=RoundKind.EVALUATE.value,
        clients=len(updates),
    )
    queues = [training_queue(dataset, site) for site in sites]
    # Robust: a broker that is down must not fail the committed round's caller; the
    # watchdog finds the tasks missing and sends them again (training/recovery.py).
    transaction.on_commit(lambda: enqueue_training(updates, queues), robust=True)
    return new_round


def close_cross_site_round(experiment: Experiment, fl_round: Round) -> None:
    """Close the cross-site round (`fl_round` as counted by counted_round_if_open): its
    sites' evaluations of the final global model become the last training round's
    federated evaluation, and the experiment completes. Failed or late sites are recorded
    and leave their cells empty; they never fail the experiment. The caller holds the
    experiment's lock."""
    evaluated = site_evaluation.file_final_model_evaluations(fl_round)
    if evaluated is not None:
        signals.round_evaluated.send(Round, fl_round=evaluated)
    now = timezone.now()
    fl_round.status = RoundStatus.CLOSED
    fl_round.closed_at = now
    fl_round.metrics = {
        **fl_round.metrics,
        "succeeded": fl_round.succeeded,
        "wall_seconds": (now - fl_round.opened_at).total_seconds(),
    }
    fl_round.save(update_fields=["status", "closed_at", "metrics"])
    Round.checkpoint.related.set_cached_value(fl_round, None)  # it aggregates nothing
    signals.round_closed.send(Round, fl_round=fl_round)
    log_event(
        logger,
        "round.closed",
        experiment=experiment.pk,
        round=fl_round.number,
        kind=RoundKind.EVALUATE.value,
        succeeded=fl_round.succeeded,
    )
    if experiment.status == ExperimentStatus.RUNNING:
        complete_experiment(experiment)
