"""Sweeps: one request makes a validated grid of queued experiments, of which max_running run
at once; whenever one ends (completed, failed or stopped) the oldest queued one starts, also
when several end at the same moment; and the comparison's statistics."""

import itertools
import threading
import uuid

import numpy as np
import pytest
from django.core.management import call_command
from django.db import connection

from tests.conftest import WorkerProcess, client_for, needs_redis, wait_until_finished
from tests.factories import (
    DatasetFactory,
    ExperimentFactory,
    RoundFactory,
    SiteFactory,
    UserFactory,
    claim,
)
from training import services, sweeps
from training.models import (
    ClientUpdate,
    ClientUpdateStatus,
    Experiment,
    ExperimentStatus,
    RoundStatus,
    Sweep,
)

pytestmark = pytest.mark.django_db

RUNNING, QUEUED = ExperimentStatus.RUNNING, ExperimentStatus.QUEUED


@pytest.fixture
def owner():
    return UserFactory(username="researcher")


@pytest.fixture
def base_settings(owner, dataset_root):
    dataset = DatasetFactory(owner=owner, path=str(dataset_root))
    return {
        "dataset": dataset.pk,
        "sites": [site.slug for site in SiteFactory.create_batch(3)],
        "num_rounds": 2,
        "clients_per_round": 2,
        "min_clients": 1,
    }


def statuses(sweep_id: int) -> list[str]:
    return list(
        Experiment.objects.filter(sweep_id=sweep_id).order_by("pk").values_list("status", flat=True)
    )


def create(owner, base_settings, grid, max_running=2):
    return sweeps.create_sweep(
        owner, name="grid", base_settings=base_settings, grid=grid, max_running=max_running
    )


def test_a_sweep_creates_one_experiment_per_combination_and_starts_max_running(
    owner, base_settings
):
    grid = {"partition": ["iid", "dirichlet:0.5"], "seed": [0, 1, 2]}

    response = client_for(owner).post(
        "/api/sweeps/",
        {"name": "partitions", "base_settings": base_settings, "grid": grid, "max_running": 2},
        format="json",
    )

    assert response.status_code == 201, response.json()
    sweep = Sweep.objects.get(pk=response.json()["id"])
    made = Experiment.objects.filter(sweep=sweep)
    assert sorted(made.values_list("partition", "seed")) == sorted(
        itertools.product(grid["partition"], grid["seed"])
    )
    assert statuses(sweep.pk) == [RUNNING, RUNNING, QUEUED, QUEUED, QUEUED, QUEUED]
    assert {e["id"] for e in response.json()["experiments"]} == set(
        made.values_list("pk", flat=True)
    )
    assert all(e.owner == owner and e.num_rounds == 2 for e in made)


def test_a_refused_combination_is_named_and_nothing_is_stored(owner, base_settings):
    response = client_for(owner).post(
        "/api/sweeps/",
        {"name": "bad", "base_settings": base_settings,
         "grid": {"seed": [0, 1], "partition": ["iid", "zipf"]}},
        format="json",
    )  # fmt: skip

    assert response.status_code == 400
    message = response.json()["grid"][0]
    assert "seed=0, partition=zipf" in message and "partition:" in message
    assert not Sweep.objects.exists() and not Experiment.objects.exists()


def test_a_bad_strategy_parameter_in_the_grid_is_named(owner, base_settings):
    response = client_for(owner).post(
        "/api/sweeps/",
        {"name": "bad", "base_settings": base_settings,
         "grid": {"strategy_params": [{}, {"not_a_parameter": 1}]}},
        format="json",
    )  # fmt: skip

    assert response.status_code == 400
    assert "not_a_parameter" in response.json()["grid"][0]
    assert not Experiment.objects.exists()


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"status": ["completed"]}, "Not an experiment setting a sweep can vary"),
        ({"seed": []}, "non-empty list"),
        ({"seed": list(range(15)), "learning_rate": [0.1] * 15}, "at most 200"),
    ],
)
def test_a_grid_of_the_wrong_shape_is_refused(owner, base_settings, grid, message):
    response = client_for(owner).post(
        "/api/sweeps/", {"name": "x", "base_settings": base_settings, "grid": grid}, format="json"
    )

    assert response.status_code == 400
    assert message in str(response.json()["grid"])


def test_when_a_running_experiment_is_stopped_the_oldest_queued_one_starts(owner, base_settings):
    sweep = create(owner, base_settings, {"seed": [0, 1, 2, 3]})
    first = Experiment.objects.filter(sweep=sweep).order_by("pk").first()

    services.stop_experiment(first.pk)

    assert statuses(sweep.pk) == ["stopped", RUNNING, RUNNING, QUEUED]


def test_when_a_running_experiment_fails_the_next_one_starts(owner, base_settings):
    sweep = create(owner, base_settings, {"seed": [0, 1, 2]}, max_running=1)
    first = Experiment.objects.filter(sweep=sweep).order_by("pk").first()

    for update in ClientUpdate.objects.filter(round__experiment=first):
        services.record_client_result(claim(update, worker="w"), error="out of memory")

    assert statuses(sweep.pk) == ["failed", RUNNING, QUEUED]


def test_stopping_a_queued_experiment_starts_no_other(owner, base_settings):
    sweep = create(owner, base_settings, {"seed": [0, 1, 2, 3]})
    last = Experiment.objects.filter(sweep=sweep).order_by("pk").last()

    services.stop_experiment(last.pk)

    assert statuses(sweep.pk) == [RUNNING, RUNNING, QUEUED, "stopped"]


def test_a_queued_experiment_that_cannot_start_fails_and_the_next_one_starts(owner, base_settings):
    sweep = create(owner, base_settings, {"seed": [0, 1, 2]}, max_running=1)
    first, second, _ = Experiment.objects.filter(sweep=sweep).order_by("pk")
    second.sites.update(is_active=False)  # all its sites gone before its turn
    SiteFactory.create_batch(2)  # (the third has the same sites: it fails too)

    services.stop_experiment(first.pk)

    assert statuses(sweep.pk)[:2] == ["stopped", "failed"]
    second.refresh_from_db()
    assert "could not start" in second.failure_reason and "active sites" in second.failure_reason


@pytest.mark.django_db(transaction=True)
def test_experiments_ending_at_the_same_moment_start_as_many_others_and_no_more(
    owner, base_settings
):
    sweep = create(owner, base_settings, {"seed": [0, 1, 2, 3, 4]}, max_running=2)
    running = list(Experiment.objects.filter(sweep=sweep, status=RUNNING))
    barrier = threading.Barrier(len(running))
    errors = []

    def stop(experiment_id):
        try:
            barrier.wait()
            services.stop_experiment(experiment_id)
        except Exception as exc:  # reported below, with the test's failure
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=stop, args=(e.pk,)) for e in running]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors
    assert statuses(sweep.pk) == ["stopped", "stopped", RUNNING, RUNNING, QUEUED]
    # Each started exactly once: one round 1 each, no more.
    for experiment in Experiment.objects.filter(sweep=sweep, status=RUNNING):
        assert list(experiment.rounds.values_list("number", flat=True)) == [1]


def test_sweeps_are_seen_by_their_owner_and_staff_only(owner, base_settings):
    sweep = create(owner, base_settings, {"seed": [0]})
    stranger, staff = UserFactory(username="stranger"), UserFactory(is_staff=True)

    assert client_for(stranger).get(f"/api/sweeps/{sweep.pk}/").status_code == 404
    assert client_for(stranger).get("/api/sweeps/").json()["count"] == 0
    assert client_for(staff).get(f"/api/sweeps/{sweep.pk}/").status_code == 200
    assert [s["id"] for s in client_for(owner).get("/api/sweeps/").json()["results"]] == [sweep.pk]
    assert client_for(stranger).get(f"/api/sweeps/{sweep.pk}/comparison/").status_code == 404


# --- The comparison ------------------------------------------------------------------------


def finished_run(sweep, strategy_params, seed, accuracies, site_accuracies):
    """A completed experiment of the sweep whose closed rounds had these held-out
    accuracies, and whose last round these per-site federated accuracies."""
    experiment = ExperimentFactory(
        owner=sweep.owner, sweep=sweep, seed=seed, strategy_params=strategy_params,
        status=ExperimentStatus.COMPLETED, num_rounds=len(accuracies),
    )  # fmt: skip
    for number, accuracy in enumerate(accuracies, start=1):
        last = number == len(accuracies)
        RoundFactory(
            experiment=experiment,
            number=number,
            status=RoundStatus.CLOSED,
            metrics={"global": {"accuracy": accuracy, "loss": 1 - accuracy}},
            federated_evaluation={
                "sites": {slug: {"accuracy": value} for slug, value in site_accuracies.items()}
            }
            if last
            else {},
        )
    return experiment


def test_the_comparison_pools_seeds_per_group_as_computed_here(owner):
    sweep = Sweep.objects.create(
        owner=owner, name="mu", grid={"strategy_params": [{"a": 1}, {"a": 2}], "seed": [0, 1, 2]},
        target_metric="accuracy", target_value=0.7,
    )  # fmt: skip
    curves = {
        ("a1", 0): [0.5, 0.72, 0.8], ("a1", 1): [0.6, 0.65, 0.75], ("a1", 2): [0.55, 0.71, 0.9],
        ("a2", 0): [0.4, 0.5, 0.6], ("a2", 1): [0.45, 0.5, 0.65], ("a2", 2): [0.3, 0.69, 0.71],
    }  # fmt: skip
    sites = {("a1", 0): {"x": 0.7, "y": 0.9}, ("a1", 1): {"x": 0.8, "y": 0.7},
             ("a1", 2): {"x": 0.9, "y": 0.9}, ("a2", 0): {"x": 0.5}, ("a2", 1): {"x": 0.6},
             ("a2", 2): {"x": 0.7}}  # fmt: skip
    for (group, seed), accuracies in curves.items():
        finished_run(sweep, {"a": int(group[1])}, seed, accuracies, sites[(group, seed)])

    response = client_for(owner).get(f"/api/sweeps/{sweep.pk}/comparison/")

    assert response.status_code == 200
    result = response.json()
    assert result["varied"] == ["strategy_params"]
    groups = {g["label"]: g for g in result["groups"]}
    assert sorted(groups) == ['strategy_params={"a": 1}', 'strategy_params={"a": 2}']
    for label, key in (('strategy_params={"a": 1}', "a1"), ('strategy_params={"a": 2}', "a2")):
        group = groups[label]
        finals = np.array([curves[(key, seed)][-1] for seed in range(3)])
        assert group["final"]["accuracy"]["mean"] == pytest.approx(finals.mean())
        assert group["final"]["accuracy"]["std"] == pytest.approx(finals.std(ddof=1))
        assert group["final"]["loss"]["mean"] == pytest.approx((1 - finals).mean())
        reached = [
            next((i + 1 for i, a in enumerate(curves[(key, s)]) if a >= 0.7), None)
            for s in range(3)
        ]
        hit = np.array([r for r in reached if r is not None], dtype=float)
        assert group["rounds_to_target"]["reached"] == len(hit)
        assert group["rounds_to_target"]["mean"] == pytest.approx(hit.mean())
        if len(hit) > 1:
            assert group["rounds_to_target"]["std"] == pytest.approx(hit.std(ddof=1))
        else:  # one run reached it: no spread to show
            assert group["rounds_to_target"]["std"] is None
        x = np.array([sites[(key, s)]["x"] for s in range(3)])
        assert group["sites"]["x"]["accuracy"]["mean"] == pytest.approx(x.mean())
        assert group["sites"]["x"]["accuracy"]["std"] == pytest.approx(x.std(ddof=1))
        per_round = np.array([curves[(key, s)] for s in range(3)])
        assert [p["mean"] for p in group["curve"]] == pytest.approx(per_round.mean(axis=0))
    assert "y" not in groups['strategy_params={"a": 2}']["sites"]
    assert groups['strategy_params={"a": 1}']["sites"]["y"]["accuracy"]["n"] == 3


def test_a_target_never_reached_is_said_so(owner):
    sweep = Sweep.objects.create(owner=owner, name="low", grid={"seed": [0, 1]}, target_value=0.99)
    for seed in (0, 1):
        finished_run(sweep, {}, seed, [0.5, 0.6], {"x": 0.5})

    result = client_for(owner).get(f"/api/sweeps/{sweep.pk}/comparison/").json()

    (group,) = result["groups"]
    assert group["rounds_to_target"] == {"mean": None, "std": None, "n": 0, "reached": 0,
                                         "runs": 2}  # fmt: skip


def test_without_federated_evaluation_the_sites_are_their_clients_last_metrics(owner):
    sweep = Sweep.objects.create(owner=owner, name="clients", grid={"seed": [0]})
    experiment = finished_run(sweep, {}, 0, [0.5], {})
    last_round = experiment.rounds.get()
    site = SiteFactory(slug="ward-7")
    ClientUpdate.objects.create(
        round=last_round, site=site, status=ClientUpdateStatus.SUCCEEDED,
        num_samples=10, metrics={"accuracy": 0.42, "loss": 0.9},
    )  # fmt: skip

    result = client_for(owner).get(f"/api/sweeps/{sweep.pk}/comparison/").json()

    (group,) = result["groups"]
    assert group["sites"]["ward-7"]["accuracy"]["mean"] == pytest.approx(0.42)
    assert group["site_sources"] == ["clients"]


@pytest.mark.redis
@pytest.mark.worker
@needs_redis
@pytest.mark.django_db(transaction=True)
def test_a_sweep_runs_to_its_end_on_a_real_worker_one_experiment_at_a_time(
    lesions_dataset, worker_env
):
    sites = SiteFactory.create_batch(3)
    sweep = sweeps.create_sweep(
        lesions_dataset.owner,
        name="on a worker",
        base_settings={
            "dataset": lesions_dataset.pk,
            "sites": [s.slug for s in sites],
            "num_rounds": 1,
            "clients_per_round": 3,
            "min_clients": 3,
            "batch_size": 16,
            "learning_rate": 0.05,
        },
        grid={"seed": [0, 1, 2]},
        max_running=1,
    )
    assert statuses(sweep.pk) == [RUNNING, QUEUED, QUEUED]
    worker = WorkerProcess(f"sweep-{uuid.uuid4().hex[:6]}@test", worker_env)
    try:
        last = Experiment.objects.filter(sweep=sweep).order_by("pk").last()
        wait_until_finished(last)
    finally:
        worker.stop()

    ran = list(Experiment.objects.filter(sweep=sweep).order_by("pk"))
    assert [e.status for e in ran] == ["completed"] * 3, [e.failure_reason for e in ran]
    for before, after in itertools.pairwise(ran):
        assert after.started_at >= before.finished_at  # never two at once


@pytest.mark.redis
@pytest.mark.worker
@needs_redis
@pytest.mark.django_db(transaction=True)
def test_the_sweep_command_can_queue_a_grid_and_return(lesions_dataset, worker_env):
    UserFactory(username="admin", is_superuser=True, is_staff=True)
    worker = WorkerProcess(f"sweep-{uuid.uuid4().hex[:6]}@test", worker_env)
    try:
        call_command("sweep", "--dataset", lesions_dataset.name, "--clients", "3",
                     "--rounds", "1", "--vary", "seed=0,1", "--max-running", "1",
                     "--name", "queued only", "--no-wait")  # fmt: skip

        sweep = Sweep.objects.get(name="queued only")
        # It returned with the grid stored and not yet run (the second one waits its turn).
        assert len(statuses(sweep.pk)) == 2 and statuses(sweep.pk)[1] in (QUEUED, RUNNING)
        for experiment in Experiment.objects.filter(sweep=sweep).order_by("-pk"):
            if not experiment.is_terminal:
                services.stop_experiment(experiment.pk)
    finally:
        worker.stop()


def test_a_sweep_must_run_at_least_one_experiment_at_a_time(owner, base_settings):
    with pytest.raises(sweeps.SettingsError, match="from 1 to 100"):
        create(owner, base_settings, {"seed": [0, 1]}, max_running=0)
    assert not Sweep.objects.exists()
