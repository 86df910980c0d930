"""The experiment life cycle: every status move, allowed or refused, and what start/stop do."""

import itertools

import pytest

from tests.factories import ExperimentFactory, SiteFactory
from training import services
from training.models import (
    EXPERIMENT_TRANSITIONS,
    ClientUpdate,
    ClientUpdateStatus,
    ExperimentStatus,
    InvalidTransition,
    Round,
    RoundStatus,
)

pytestmark = pytest.mark.django_db

ALLOWED = {
    ("draft", "queued"),
    ("draft", "running"),
    ("queued", "running"),
    ("queued", "stopped"),
    ("queued", "failed"),
    ("running", "completed"),
    ("running", "stopped"),
    ("running", "failed"),
}
ALL_PAIRS = list(itertools.product(ExperimentStatus.values, repeat=2))


def test_transition_table_matches_the_documented_life_cycle():
    table = {
        (source, target) for source, targets in EXPERIMENT_TRANSITIONS.items() for target in targets
    }
    assert table == ALLOWED


@pytest.mark.parametrize(("source", "target"), sorted(ALLOWED))
def test_allowed_transition_changes_status_and_stamps_times(source, target):
    experiment = ExperimentFactory(status=source)

    experiment.transition_to(target)

    experiment.refresh_from_db()
    assert experiment.status == target
    if target == "running":
        assert experiment.started_at is not None
    if target in ("completed", "failed", "stopped"):
        assert experiment.finished_at is not None


@pytest.mark.parametrize(("source", "target"), sorted(set(ALL_PAIRS) - ALLOWED))
def test_refused_transition_raises_and_leaves_the_row_unchanged(source, target):
    experiment = ExperimentFactory(status=source)

    with pytest.raises(InvalidTransition, match=f"is {source} and cannot become {target}"):
        experiment.transition_to(target)

    experiment.refresh_from_db()
    assert experiment.status == source
    assert experiment.finished_at is None


def test_start_opens_round_one_with_a_pending_update_per_picked_client():
    sites = SiteFactory.create_batch(3)
    experiment = ExperimentFactory(sites=sites, clients_per_round=2, round_timeout_seconds=600)

    services.start_experiment(experiment.pk)

    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.RUNNING
    assert experiment.current_round == 1
    round_one = Round.objects.get(experiment=experiment)
    assert (round_one.number, round_one.status) == (1, RoundStatus.OPEN)
    assert round(round_one.deadline.timestamp() - round_one.opened_at.timestamp()) == 600
    updates = ClientUpdate.objects.filter(round=round_one)
    assert updates.count() == 2
    assert set(updates.values_list("status", flat=True)) == {ClientUpdateStatus.PENDING}
    assert set(updates.values_list("site", flat=True)) <= {site.pk for site in sites}


def test_client_choice_is_reproducible_for_the_same_seed_and_round():
    sites = SiteFactory.create_batch(8)
    first = ExperimentFactory(sites=sites, clients_per_round=3, seed=7)
    second = ExperimentFactory(sites=sites, clients_per_round=3, seed=7)

    assert services.pick_clients(first, 2) == services.pick_clients(second, 2)


def test_inactive_sites_are_never_picked():
    active = SiteFactory()
    inactive = SiteFactory(is_active=False)
    experiment = ExperimentFactory(sites=[active, inactive], clients_per_round=2)

    assert services.pick_clients(experiment, 1) == [active]


def test_start_without_enough_active_sites_is_refused_and_stores_nothing():
    experiment = ExperimentFactory(
        sites=[SiteFactory(is_active=False), SiteFactory()], clients_per_round=2, min_clients=2
    )

    with pytest.raises(InvalidTransition, match="needs at least 2 active sites"):
        services.start_experiment(experiment.pk)

    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.DRAFT
    assert not Round.objects.filter(experiment=experiment).exists()


@pytest.mark.parametrize("status", ["queued", "running", "completed", "failed", "stopped"])
def test_only_a_draft_can_be_started(status):
    experiment = ExperimentFactory(status=status)

    with pytest.raises(InvalidTransition, match="only a draft can be started"):
        services.start_experiment(experiment.pk)


def test_stop_fails_the_open_round_and_its_unfinished_clients():
    experiment = ExperimentFactory()
    services.start_experiment(experiment.pk)
    first_update = ClientUpdate.objects.filter(round__experiment=experiment).first()
    first_update.status = ClientUpdateStatus.SUCCEEDED
    first_update.save()

    services.stop_experiment(experiment.pk, reason="Operator asked.")

    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.STOPPED
    assert experiment.failure_reason == "Operator asked."
    assert Round.objects.get(experiment=experiment).status == RoundStatus.FAILED
    statuses = dict(
        ClientUpdate.objects.filter(round__experiment=experiment).values_list("pk", "status")
    )
    assert statuses.pop(first_update.pk) == ClientUpdateStatus.SUCCEEDED
    assert set(statuses.values()) == {ClientUpdateStatus.FAILED}


@pytest.mark.parametrize("status", ["draft", "completed", "failed", "stopped"])
def test_stop_is_refused_unless_queued_or_running(status):
    experiment = ExperimentFactory(status=status)

    with pytest.raises(InvalidTransition, match="only a queued or running experiment"):
        services.stop_experiment(experiment.pk)
