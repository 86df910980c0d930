"""Differential privacy in the ledger: the experiment's settings reach the strategy and the
clients, ε is recorded per round, and the summary, report and live page show it."""

import asyncio
import csv
import io
import json
import math
import sqlite3

import pytest
from asgiref.sync import async_to_sync
from django.db import connection, transaction

from tests.factories import (
    CheckpointFactory,
    ClientUpdateFactory,
    ExperimentFactory,
    RoundFactory,
    SiteFactory,
    UserFactory,
    api_token,
)
from tests.test_federation_e2e import embedded_project, manage  # noqa: F401 - a fixture
from tests.test_stream import connect
from training import federation, signals
from training.differential_privacy import round_epsilon
from training.fl.privacy import DifferentiallyPrivate, epsilon_spent
from training.models import ClientUpdateStatus, ExperimentStatus, Round, RoundStatus
from visualization import reports
from visualization.snapshot import experiment_snapshot

DELTA = 1e-5


def dp_experiment(**fields):
    settings = {"dp_clip": 1.0, "dp_noise": 1.1, "dp_delta": DELTA, "clients_per_round": 2}
    settings.update(fields)
    return ExperimentFactory(sites=SiteFactory.create_batch(5), **settings)


# --- Settings to strategy, options and ε ----------------------------------------------------


@pytest.mark.django_db
def test_epsilon_is_accounted_for_the_experiments_clients_over_its_pool() -> None:
    experiment = dp_experiment()

    epsilons = [round_epsilon(experiment, number) for number in (1, 2, 3)]

    assert epsilons == [
        epsilon_spent(noise_multiplier=1.1, sample_rate=2 / 5, steps=number, delta=DELTA)
        for number in (1, 2, 3)
    ]
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == 3


@pytest.mark.django_db
@pytest.mark.parametrize(
    "fields", [{"dp_clip": None, "dp_noise": 0.0}, {"dp_clip": 1.0, "dp_noise": 0.0}]
)
def test_no_epsilon_is_recorded_without_noise(fields) -> None:
    assert round_epsilon(dp_experiment(**fields), 3) is None


@pytest.mark.django_db
def test_an_experiment_without_dp_settings_configures_its_plain_strategy() -> None:
    experiment = ExperimentFactory()

    strategy = federation.configured_strategy(experiment.pk)

    assert not isinstance(strategy, DifferentiallyPrivate)
    assert strategy.configure_client(round_number=1, site="a") == {}


@pytest.mark.django_db
def test_noise_at_the_clients_and_local_dp_sgd_reach_the_clients_options() -> None:
    experiment = dp_experiment(
        dp_at="client", clients_per_round=4, local_dp_noise=0.9, local_dp_clip=2.0
    )

    options = federation.configured_strategy(experiment.pk).configure_client(
        round_number=1, site="a"
    )

    # Four clients' noises of std z*C/2 add up to the server's noise on the sum, z*C.
    assert options == {
        "dp_clip": 1.0,
        "dp_noise_std": pytest.approx(1.1 / math.sqrt(4)),
        "dp_sgd": {"noise_multiplier": 0.9, "max_grad_norm": 2.0, "delta": DELTA},
    }


@pytest.mark.django_db
def test_noise_at_the_server_sends_the_clients_nothing() -> None:
    experiment = dp_experiment(dp_at="server")

    strategy = federation.configured_strategy(experiment.pk)

    assert isinstance(strategy, DifferentiallyPrivate)
    assert strategy.configure_client(round_number=1, site="a") == {}


# --- A whole experiment --------------------------------------------------------------------


@pytest.mark.e2e
def test_an_embedded_dp_experiment_records_rising_epsilon_in_ledger_summary_and_table(
    embedded_project,  # noqa: F811 - the fixture imported above
    tmp_path,
):
    # Given three sites, two per round, clipping at 1 and noise multiplier 1.1
    result = manage(
        "run_experiment", "--dataset", "lesions", "--clients", "3", "--clients-per-round", "2",
        "--rounds", "3", "--batch-size", "16", "--lr", "0.05", "--seed", "0",
        "--dp-clip", "1.0", "--dp-noise", "1.1", "--dp-delta", str(DELTA),
        "--json", str(tmp_path / "summary.json"), env=embedded_project,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    # Then each round's ε is Opacus's for q = 2/3 after that many rounds, rising
    expected = [
        epsilon_spent(noise_multiplier=1.1, sample_rate=2 / 3, steps=number, delta=DELTA)
        for number in (1, 2, 3)
    ]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [r["epsilon"] for r in summary["rounds"]] == pytest.approx(expected, rel=1e-12)
    assert expected == sorted(expected) and len(set(expected)) == 3
    assert summary["configuration"]["differential_privacy"]["noise_multiplier"] == 1.1
    # ... the ledger holds them
    ledger = sqlite3.connect(tmp_path / "fedlens.sqlite3")
    stored = ledger.execute(
        "SELECT epsilon FROM training_round WHERE kind = 'train' ORDER BY number"
    ).fetchall()
    assert [value for (value,) in stored] == pytest.approx(expected, rel=1e-12)
    # ... the server clipped and noised every round
    for fl_round in summary["rounds"]:
        aggregate = fl_round["clients_aggregate"]
        assert aggregate["dp_noise_std"] == pytest.approx(1.1 * 1.0 / 2)
        assert 0.0 <= aggregate["dp_clipped_fraction"] <= 1.0
    # ... and the table has an ε column with the last round's value
    header = next(line for line in result.stdout.splitlines() if line.lstrip().startswith("round"))
    assert "epsilon" in header.split()
    assert f"{expected[-1]:.4f}" in result.stdout


# --- The report and the live page -----------------------------------------------------------


def closed_dp_rounds(experiment, epsilons):
    rounds = []
    for number, epsilon in enumerate(epsilons, start=1):
        fl_round = RoundFactory(
            experiment=experiment,
            number=number,
            status=RoundStatus.CLOSED,
            epsilon=epsilon,
            metrics={
                "global": {"loss": 0.6, "accuracy": 0.6 + 0.05 * number},
                "clients": {"loss": 0.5, "accuracy": 0.7, "num_clients": 2},
            },
        )
        ClientUpdateFactory(round=fl_round, status=ClientUpdateStatus.SUCCEEDED)
        rounds.append(fl_round)
    return rounds


@pytest.mark.django_db
def test_report_draws_the_epsilon_curve_and_exports_each_rounds_epsilon() -> None:
    experiment = dp_experiment(status=ExperimentStatus.COMPLETED, num_rounds=3)
    closed_dp_rounds(experiment, [0.8, 1.3, 1.7])

    drawn = reports.render_report(experiment, "svg").decode()
    document = reports.metrics_json(experiment)
    csv_text = reports.metrics_csv(experiment)

    assert "ε spent (δ = 1e-05), right axis" in drawn
    assert "client-level DP: clip 1, noise multiplier 1.1 at the server, ε = 1.7" in drawn
    assert [r["epsilon"] for r in document["rounds"]] == [0.8, 1.3, 1.7]
    assert document["experiment"]["differential_privacy"]["delta"] == DELTA
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert [row["epsilon"] for row in rows] == ["0.8", "1.3", "1.7"]


@pytest.mark.django_db
def test_report_of_an_experiment_without_dp_shows_no_epsilon() -> None:
    experiment = ExperimentFactory(status=ExperimentStatus.COMPLETED)
    closed_dp_rounds(experiment, [None, None])

    drawn = reports.render_report(experiment, "svg").decode()

    assert "ε" not in drawn
    assert reports.metrics_json(experiment)["experiment"]["differential_privacy"] is None


@pytest.mark.django_db
def test_snapshot_carries_the_epsilon_curve_only_for_a_dp_experiment() -> None:
    private = dp_experiment()
    closed_dp_rounds(private, [0.8, 1.3])
    plain = ExperimentFactory()
    closed_dp_rounds(plain, [None])

    assert experiment_snapshot(private)["privacy"] == {
        "clip": 1.0,
        "noise_multiplier": 1.1,
        "delta": DELTA,
        "noise_at": "server",
        "epsilon": [{"round": 1, "epsilon": 0.8}, {"round": 2, "epsilon": 1.3}],
    }
    assert experiment_snapshot(plain)["privacy"] is None


@pytest.mark.django_db(transaction=True)
def test_a_closed_round_reaches_the_page_with_its_epsilon() -> None:
    owner = UserFactory()
    experiment = dp_experiment(owner=owner, status=ExperimentStatus.RUNNING)
    fl_round = RoundFactory(
        experiment=experiment,
        number=1,
        status=RoundStatus.CLOSED,
        epsilon=0.75,
        # As aggregation records them (the metrics' receiver reads the wall time).
        metrics={
            "global": None,
            "clients": {"loss": 0.5, "accuracy": 0.7, "num_clients": 2, "num_samples": 80},
            "aggregation_seconds": 0.1,
            "evaluation_seconds": 0.0,
            "wall_seconds": 2.0,
        },
    )
    CheckpointFactory(experiment=experiment, round=fl_round)
    token = api_token(owner)

    def close_round() -> None:
        try:
            with transaction.atomic():
                signals.round_closed.send(Round, fl_round=Round.objects.get(pk=fl_round.pk))
        finally:
            connection.close()  # this thread's, or the test database cannot be dropped

    async def listen():
        listener = connect(f"/ws/experiments/{experiment.pk}/", token=token)
        await listener.connect()
        assert (await listener.receive_json_from(timeout=5))["type"] == "snapshot"
        await asyncio.get_running_loop().run_in_executor(None, close_round)
        event = await listener.receive_json_from(timeout=5)
        await listener.disconnect()
        return event

    event = async_to_sync(listen)()

    assert event["type"] == "round.closed"
    assert event["epsilon"] == 0.75


@pytest.mark.django_db
def test_the_experiment_page_has_a_hidden_privacy_card_for_the_script(client) -> None:
    owner = UserFactory()
    experiment = dp_experiment(owner=owner)
    client.force_login(owner)

    page = client.get(f"/experiments/{experiment.pk}/").content.decode()

    # Hidden until the snapshot says the rounds are noised (experiment.js's drawPrivacy).
    assert '<div class="card" id="privacy-card" hidden>' in page
    assert 'id="epsilon-chart"' in page
