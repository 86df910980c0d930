"""State transitions of the ledger: start and stop an experiment, open a round.

Each function runs in one transaction and locks the experiment row, so that two requests
(or a request and a worker) never move the same experiment at once.
"""

import random
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from training.models import (
    ClientUpdate,
    ClientUpdateStatus,
    Experiment,
    ExperimentStatus,
    InvalidTransition,
    Round,
    RoundStatus,
    Site,
)


def pick_clients(experiment: Experiment, number: int) -> list[Site]:
    """Choose the round's clients among the experiment's active sites, reproducibly."""
    candidates = list(experiment.sites.filter(is_active=True).order_by("pk"))
    if len(candidates) < experiment.min_clients:
        raise InvalidTransition(
            f"Experiment {experiment.pk} needs at least {experiment.min_clients} active sites "
            f"and has {len(candidates)}; activate or add sites first."
        )
    wanted = min(experiment.clients_per_round, len(candidates))
    # Seeded by experiment and round, so that a rerun picks the same clients.
    chooser = random.Random(experiment.seed * 100_003 + number)  # noqa: S311 - not security
    return sorted(chooser.sample(candidates, wanted), key=lambda site: site.pk)


def open_round(experiment: Experiment, number: int) -> Round:
    """Create round `number` with one pending ClientUpdate per picked client.

    The caller holds the experiment's row lock inside a transaction.
    """
    clients = pick_clients(experiment, number)
    now = timezone.now()
    new_round = Round.objects.create(
        experiment=experiment,
        number=number,
        opened_at=now,
        deadline=now + timedelta(seconds=experiment.round_timeout_seconds),
    )
    ClientUpdate.objects.bulk_create(ClientUpdate(round=new_round, site=site) for site in clients)
    experiment.current_round = number
    experiment.save(update_fields=["current_round", "updated_at"])
    return new_round


def locked_experiment(experiment_id: int) -> Experiment:
    return Experiment.objects.select_for_update().get(pk=experiment_id)


def start_experiment(experiment_id: int) -> Experiment:
    """draft -> running, with round 1 open."""
    with transaction.atomic():
        experiment = locked_experiment(experiment_id)
        if experiment.status != ExperimentStatus.DRAFT:
            raise InvalidTransition(
                f"Experiment {experiment.pk} is {experiment.status}; only a draft can be started."
            )
        open_round(experiment, 1)
        experiment.transition_to(ExperimentStatus.RUNNING)
    return experiment


def stop_experiment(experiment_id: int, *, reason: str = "Stopped by a user.") -> Experiment:
    """queued/running -> stopped; the open round fails and its unfinished clients with it."""
    with transaction.atomic():
        experiment = locked_experiment(experiment_id)
        if not experiment.can_transition_to(ExperimentStatus.STOPPED):
            raise InvalidTransition(
                f"Experiment {experiment.pk} is {experiment.status}; "
                "only a queued or running experiment can be stopped."
            )
        now = timezone.now()
        unfinished_rounds = experiment.rounds.filter(
            status__in=[RoundStatus.OPEN, RoundStatus.AGGREGATING]
        )
        ClientUpdate.objects.filter(
            round__in=unfinished_rounds,
            status__in=[ClientUpdateStatus.PENDING, ClientUpdateStatus.RUNNING],
        ).update(status=ClientUpdateStatus.FAILED, error=reason, finished_at=now)
        unfinished_rounds.update(status=RoundStatus.FAILED, closed_at=now)
        experiment.transition_to(ExperimentStatus.STOPPED, reason=reason)
    return experiment
