"""Rounds close exactly once; late, failed and duplicate reports are recorded, never counted."""

from datetime import timedelta

import pytest
import torch
from django.utils import timezone

from tests.broker import tasks_waiting_in_the_broker
from tests.factories import ClientUpdateFactory, ExperimentFactory, RoundFactory, SiteFactory, claim
from training import modelstore, services
from training.federation import AggregationOutcome, LocalTrainingOutcome
from training.models import (
    Checkpoint,
    ClientUpdate,
    ClientUpdateStatus,
    Dataset,
    ExperimentStatus,
    Round,
    RoundStatus,
    model_store,
)
from training.modelstore import StoredWeights

pytestmark = pytest.mark.django_db


def stored(name="weights.safetensors"):
    return StoredWeights(name=name, sha256="a" * 64, size_bytes=10, num_parameters=3)


def trained(samples=10):
    return LocalTrainingOutcome(stored=stored(), num_samples=samples,
                                metrics={"loss": 0.5, "accuracy": 0.8})  # fmt: skip


def aggregated(accuracy):
    return AggregationOutcome(
        stored=stored(), metrics={"global": {"accuracy": accuracy}, "clients": {}}
    )


@pytest.fixture
def open_round():
    """A running experiment whose round 1 waits for three clients, two of them needed."""
    sites = SiteFactory.create_batch(3)
    experiment = ExperimentFactory(
        sites=sites, clients_per_round=3, min_clients=2, num_rounds=2,
        status=ExperimentStatus.RUNNING, current_round=1,
    )  # fmt: skip
    fl_round = RoundFactory(experiment=experiment, number=1)
    updates = [ClientUpdateFactory(round=fl_round, site=site) for site in sites]
    return experiment, fl_round, updates


def report(update, outcome=None, error=""):
    claimed = claim(update, worker="w@test")
    assert claimed is not None
    return services.record_client_result(claimed, outcome=outcome, error=error)


def two_reported_and_one_running(updates):
    """The first two clients report; the third is claimed and still training."""
    report(updates[0], trained())
    report(updates[1], trained())
    return claim(updates[2], worker="slow@test")


def test_the_round_waits_until_every_client_has_reported(open_round):
    _, fl_round, updates = open_round

    report(updates[0], trained())
    report(updates[1], trained())

    fl_round.refresh_from_db()
    assert fl_round.status == RoundStatus.OPEN


def test_the_last_report_closes_the_round_for_aggregation(open_round):
    _, fl_round, updates = open_round

    report(updates[0], trained())
    report(updates[1], error="CUDA out of memory")
    report(updates[2], trained())

    fl_round.refresh_from_db()
    assert fl_round.status == RoundStatus.AGGREGATING
    statuses = [u.status for u in fl_round.client_updates.order_by("pk")]
    assert statuses == ["succeeded", "failed", "succeeded"]
    assert fl_round.client_updates.get(status="failed").error == "CUDA out of memory"


def test_too_few_successes_fail_the_round_and_the_experiment_with_the_reason(open_round):
    experiment, fl_round, updates = open_round

    report(updates[0], trained())
    report(updates[1], error="disk full")
    report(updates[2], error="disk full")

    experiment.refresh_from_db()
    fl_round.refresh_from_db()
    assert experiment.status == ExperimentStatus.FAILED
    assert "1 of 3 clients succeeded, fewer than the minimum of 2" in experiment.failure_reason
    assert fl_round.status == RoundStatus.FAILED


def test_a_duplicate_delivery_is_not_claimed_and_not_counted_twice(open_round):
    _, _, updates = open_round
    report(updates[0], trained(samples=10))

    assert claim(updates[0], worker="other@test") is None
    services.record_client_result(updates[0], outcome=trained(samples=99))

    updates[0].refresh_from_db()
    assert (updates[0].status, updates[0].num_samples, updates[0].worker) == (
        "succeeded", 10, "w@test",
    )  # fmt: skip


def test_a_message_whose_ids_do_not_match_the_ledger_claims_nothing(open_round):
    _, fl_round, updates = open_round
    other_site = updates[1].site_id
    other_round = RoundFactory(experiment=fl_round.experiment, number=2).pk

    for round_id, site_id in ((fl_round.pk, other_site), (other_round, updates[0].site_id)):
        assert (
            services.claim_client_update(
                updates[0].pk, round_id, site_id, worker="w@test", task_id=updates[0].task_id
            )
            is None
        )

    updates[0].refresh_from_db()
    assert (updates[0].status, updates[0].worker) == ("pending", "")


def test_a_redelivered_task_of_a_dead_worker_may_run_again(open_round):
    _, _, updates = open_round
    claim(updates[0], worker="dead@test")

    claimed = claim(updates[0], worker="alive@test")

    assert claimed is not None and claimed.worker == "alive@test"


def test_the_watchdog_leaves_rounds_before_their_deadline_alone(open_round):
    _, fl_round, _ = open_round

    assert services.close_overdue_rounds() == []

    fl_round.refresh_from_db()
    assert fl_round.status == RoundStatus.OPEN


def test_the_watchdog_closes_an_overdue_round_marking_missing_clients_late(open_round):
    _, fl_round, updates = open_round
    two_reported_and_one_running(updates)

    closed = services.close_overdue_rounds(now=fl_round.deadline + timedelta(seconds=1))

    assert closed == [fl_round.pk]
    fl_round.refresh_from_db()
    assert fl_round.status == RoundStatus.AGGREGATING
    updates[2].refresh_from_db()
    assert updates[2].status == ClientUpdateStatus.LATE
    assert "deadline" in updates[2].error


def test_a_report_after_the_deadline_is_recorded_as_late_and_not_counted(open_round):
    _, fl_round, updates = open_round
    slow = two_reported_and_one_running(updates)
    services.close_overdue_rounds(now=fl_round.deadline + timedelta(seconds=1))

    services.record_client_result(slow, outcome=trained())

    updates[2].refresh_from_db()
    assert updates[2].status == ClientUpdateStatus.LATE
    assert updates[2].num_samples is None


def test_the_watchdog_fails_an_overdue_round_without_enough_clients(open_round):
    experiment, _, updates = open_round
    report(updates[0], trained())

    services.close_overdue_rounds(now=timezone.now() + timedelta(days=1))

    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.FAILED
    assert "Round 1: 1 of 3 clients succeeded" in experiment.failure_reason


def test_completing_a_round_stores_the_checkpoint_and_opens_the_next(open_round):
    experiment, fl_round, updates = open_round
    for update in updates:
        report(update, trained())

    assert services.complete_round(fl_round, aggregated(accuracy=0.7)) is True

    fl_round.refresh_from_db()
    experiment.refresh_from_db()
    assert fl_round.status == RoundStatus.CLOSED and fl_round.closed_at is not None
    assert fl_round.checkpoint.is_best
    assert experiment.current_round == 2
    next_round = Round.objects.get(experiment=experiment, number=2)
    assert next_round.client_updates.count() == 3


def test_a_duplicate_aggregation_changes_nothing(open_round):
    _, fl_round, updates = open_round
    for update in updates:
        report(update, trained())
    services.complete_round(fl_round, aggregated(accuracy=0.7))

    assert services.complete_round(fl_round, aggregated(accuracy=0.9)) is False

    assert Checkpoint.objects.filter(round=fl_round).count() == 1
    assert Round.objects.filter(experiment=fl_round.experiment).count() == 2


def test_the_last_round_completes_the_experiment_and_best_follows_accuracy(open_round):
    experiment, fl_round, updates = open_round
    # Sites that keep no validation data have no cross-site round to wait for.
    Dataset.objects.filter(pk=experiment.dataset_id).update(validation_fraction=0.0)
    for update in updates:
        report(update, trained())
    services.complete_round(fl_round, aggregated(accuracy=0.9))
    second = Round.objects.get(experiment=experiment, number=2)
    for update in second.client_updates.all():
        report(update, trained())

    services.complete_round(second, aggregated(accuracy=0.6))

    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.COMPLETED
    assert list(
        Checkpoint.objects.filter(experiment=experiment, is_best=True).values_list(
            "round__number", flat=True
        )
    ) == [1]


def test_the_watchdog_closes_a_round_whose_clients_all_reported_but_nobody_closed(open_round):
    # The last client's worker died between recording its result and closing the round.
    _, fl_round, _ = open_round
    ClientUpdate.objects.filter(round=fl_round).update(status=ClientUpdateStatus.SUCCEEDED)

    closed = services.close_overdue_rounds()

    assert closed == [fl_round.pk]
    fl_round.refresh_from_db()
    assert fl_round.status == RoundStatus.AGGREGATING


def test_of_two_last_reports_trying_to_close_the_round_only_one_does(open_round):
    experiment, fl_round, _ = open_round
    ClientUpdate.objects.filter(round=fl_round).update(status=ClientUpdateStatus.SUCCEEDED)

    first = services.close_complete_round(experiment.pk, fl_round.pk)
    second = services.close_complete_round(experiment.pk, fl_round.pk)

    assert (first, second) == (True, False)
    fl_round.refresh_from_db()
    assert fl_round.status == RoundStatus.AGGREGATING


def test_a_round_with_a_client_still_running_is_not_closed_as_complete(open_round):
    experiment, fl_round, updates = open_round
    two_reported_and_one_running(updates)

    assert services.close_complete_round(experiment.pk, fl_round.pk) is False
    fl_round.refresh_from_db()
    assert fl_round.status == RoundStatus.OPEN


def stored_update(experiment, fl_round, site) -> StoredWeights:
    """What one delivery of a client's task writes to the model store."""
    weights = {"weight": torch.full((3,), float(len(site.slug)))}
    name = modelstore.client_update_name(experiment.pk, fl_round.number, site.slug)
    return modelstore.save_weights(name, weights)


def test_two_deliveries_of_a_task_keep_the_file_the_ledger_recorded(open_round):
    experiment, fl_round, updates = open_round
    first = claim(updates[0], worker="slow@test")
    second = claim(updates[0], worker="redelivered@test")
    first_weights = stored_update(experiment, fl_round, updates[0].site)
    second_weights = stored_update(experiment, fl_round, updates[0].site)

    recorded = services.record_client_result(
        second, outcome=LocalTrainingOutcome(stored=second_weights, num_samples=5, metrics={})
    )
    not_counted = services.record_client_result(
        first, outcome=LocalTrainingOutcome(stored=first_weights, num_samples=7, metrics={})
    )

    assert (recorded, not_counted) == (True, False)
    assert first_weights.name != second_weights.name
    updates[0].refresh_from_db()
    assert (updates[0].update_file.name, updates[0].num_samples) == (second_weights.name, 5)
    store = model_store()
    assert store.exists(second_weights.name) and not store.exists(first_weights.name)
    loaded = modelstore.load_stored_weights(updates[0].update_file.name, updates[0].update_sha256)
    assert set(loaded) == {"weight"}


# --- Aggregations that never came ----------------------------------------------------------


def closed_for_aggregation(fl_round, updates):
    for update in updates:
        report(update, trained())
    fl_round.refresh_from_db()
    assert fl_round.status == RoundStatus.AGGREGATING
    return fl_round


def aggregations_waiting_in_the_broker() -> list[int]:
    waiting = tasks_waiting_in_the_broker("aggregation", "workers.tasks.aggregate_round")
    return [arguments[0] for arguments in waiting]


def test_a_round_closed_for_aggregation_is_due_back_after_the_brokers_redelivery_wait(
    open_round, settings
):
    _, fl_round, updates = open_round
    before = timezone.now()

    closed_for_aggregation(fl_round, updates)

    wait = timedelta(seconds=settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"])
    assert before + wait <= fl_round.aggregation_deadline <= timezone.now() + wait


def test_the_watchdog_sends_again_the_aggregation_of_a_round_stalled_past_its_deadline(
    open_round, django_capture_on_commit_callbacks
):
    _, fl_round, updates = open_round
    closed_for_aggregation(fl_round, updates)
    aggregations_waiting_in_the_broker()  # start from an empty queue (drops the first send)
    later = fl_round.aggregation_deadline + timedelta(seconds=1)

    with django_capture_on_commit_callbacks(execute=True):
        resent = services.resend_stalled_aggregations(now=later)

    assert resent == [fl_round.pk]
    assert aggregations_waiting_in_the_broker() == [fl_round.pk]
    fl_round.refresh_from_db()
    assert fl_round.status == RoundStatus.AGGREGATING
    assert fl_round.aggregation_deadline > later  # the next try waits as long again


def test_the_watchdog_leaves_a_round_within_its_aggregation_deadline_alone(
    open_round, django_capture_on_commit_callbacks
):
    _, fl_round, updates = open_round
    closed_for_aggregation(fl_round, updates)
    aggregations_waiting_in_the_broker()

    with django_capture_on_commit_callbacks(execute=True):
        resent = services.resend_stalled_aggregations(
            now=fl_round.aggregation_deadline - timedelta(seconds=1)
        )

    assert resent == []
    assert aggregations_waiting_in_the_broker() == []


def test_two_watchdog_runs_past_the_deadline_send_the_aggregation_once(open_round):
    _, fl_round, updates = open_round
    closed_for_aggregation(fl_round, updates)
    later = fl_round.aggregation_deadline + timedelta(seconds=1)

    first = services.resend_stalled_aggregations(now=later)
    second = services.resend_stalled_aggregations(now=later)

    assert (first, second) == ([fl_round.pk], [])


def global_weights(experiment, fl_round, value) -> StoredWeights:
    """What one aggregation of the round writes to the model store."""
    name = modelstore.global_weights_name(experiment.pk, fl_round.number)
    return modelstore.save_weights(name, {"weight": torch.full((3,), value)})


def test_of_two_aggregations_of_a_round_one_completes_it_and_its_file_is_kept(open_round):
    experiment, fl_round, updates = open_round
    closed_for_aggregation(fl_round, updates)
    first_weights = global_weights(experiment, fl_round, 1.0)
    second_weights = global_weights(experiment, fl_round, 1.0)
    outcome = {"global": {"accuracy": 0.7}, "clients": {}}

    # Each aggregation of a stateful strategy writes its state and payload beside its file.
    for stored in (first_weights, second_weights):
        modelstore.save_strategy_files(
            stored.name, state={"m": torch.ones(3)}, payload={"c": torch.ones(3)}
        )

    completed = services.complete_round(fl_round, AggregationOutcome(first_weights, outcome))
    duplicate = services.complete_round(fl_round, AggregationOutcome(second_weights, outcome))

    assert (completed, duplicate) == (True, False)
    assert first_weights.name != second_weights.name
    checkpoint = Checkpoint.objects.get(round=fl_round)
    assert (checkpoint.file.name, checkpoint.sha256) == (first_weights.name, first_weights.sha256)
    store = model_store()
    for name in (
        modelstore.strategy_state_name,
        modelstore.strategy_payload_name,
        lambda checkpoint_name: checkpoint_name,
    ):
        assert store.exists(name(first_weights.name))
        assert not store.exists(name(second_weights.name))


def test_a_failed_second_aggregation_leaves_the_experiment_whose_round_completed_running(
    open_round,
):
    experiment, fl_round, updates = open_round
    closed_for_aggregation(fl_round, updates)
    services.complete_round(fl_round, aggregated(accuracy=0.7))

    services.fail_round(fl_round.pk, "Aggregation of round 1 failed: out of memory")

    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.RUNNING and experiment.failure_reason == ""


def test_a_round_aggregating_since_before_aggregation_deadlines_existed_is_due(open_round):
    # Rounds closed by a version without the field have none: after the upgrade they are due.
    _, fl_round, updates = open_round
    closed_for_aggregation(fl_round, updates)
    Round.objects.filter(pk=fl_round.pk).update(aggregation_deadline=None)

    assert services.resend_stalled_aggregations() == [fl_round.pk]
    fl_round.refresh_from_db()
    assert fl_round.aggregation_deadline > timezone.now()
