"""What a round costs the ledger does not grow with its clients, nor does the snapshot.

The client tasks and the aggregation run here, in the test's process, through the real
Celery task functions (as in test_tracking.py); the tasks that the rounds queue are never
sent, because the test's transaction never commits. benchmarks/scale.py measures the same
with 200 clients and real workers.
"""

import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.conftest import new_experiment
from tests.factories import CheckpointFactory, ExperimentFactory, RoundFactory
from training import services
from training.api.serializers import CheckpointSummarySerializer, ClientUpdateSerializer
from training.models import Checkpoint, ClientUpdate, ClientUpdateStatus, RoundStatus, Site
from visualization import snapshot
from workers import tasks

pytestmark = pytest.mark.django_db


def task_queries(updates) -> list[int]:
    """The queries each client task of `updates` sent, in order."""
    per_task = []
    for update in updates.order_by("pk"):
        with CaptureQueriesContext(connection) as queries:
            assert tasks.train_client(update.pk, update.round_id, update.site_id) == "succeeded"
        per_task.append(len(queries))
    return per_task


def queries_of_an_experiment(dataset, clients: int) -> dict[str, list[int]]:
    """The queries of each task of a one-round experiment and of its cross-site round."""
    experiment = new_experiment(
        dataset, num_rounds=1, clients_per_round=clients, min_clients=clients
    )
    services.start_experiment(experiment.pk)
    training = experiment.rounds.get(number=1)
    sent = {"train": task_queries(training.client_updates)}
    with CaptureQueriesContext(connection) as queries:
        assert tasks.aggregate_round(training.pk) == "completed"
    sent["aggregate"] = [len(queries)]
    # Each site of the cross-site round evaluates the global model and every site's own.
    sent["evaluate"] = task_queries(experiment.rounds.get(number=2).client_updates)
    return sent


def test_a_client_task_sends_as_many_queries_with_twelve_clients_as_with_three(
    lesions_dataset,
):
    # Given two experiments alike but for their number of clients
    # When each runs its training round and its cross-site round
    few = queries_of_an_experiment(lesions_dataset, 3)
    many = queries_of_an_experiment(lesions_dataset, 12)
    # Then in each kind of round, the first task (cold caches), the others, and the last
    # (which closes the round) each send as many queries in both, as does the aggregation
    for kind in ("train", "evaluate"):
        assert many[kind][0] == few[kind][0], kind
        assert set(many[kind][1:-1]) == set(few[kind][1:-1]), kind
        assert len(set(few[kind][1:-1])) == 1, kind
        assert many[kind][-1] == few[kind][-1], kind
    assert many["aggregate"] == few["aggregate"]


def experiment_with_clients(clients_per_round: int, rounds: int):
    """A finished-looking experiment of many clients (rows written in bulk), whose first
    site failed in every round."""
    sites = Site.objects.bulk_create(
        Site(name=f"Scale {clients_per_round}-{index}", slug=f"scale-{clients_per_round}-{index}")
        for index in range(clients_per_round)
    )
    experiment = ExperimentFactory(
        num_rounds=rounds, clients_per_round=clients_per_round, sites=sites
    )
    for number in range(1, rounds + 1):
        fl_round = RoundFactory(
            experiment=experiment, number=number, status=RoundStatus.CLOSED,
            federated_evaluation={
                "sites": {site.slug: {"accuracy": 0.75} for site in sites},
                "weighted": {"accuracy": 0.75},
            },
        )  # fmt: skip
        ClientUpdate.objects.bulk_create(
            ClientUpdate(
                round=fl_round, site=site, num_samples=8,
                status=ClientUpdateStatus.FAILED if index == 0 else ClientUpdateStatus.SUCCEEDED,
                metrics={"loss": 0.5, "accuracy": 0.75, "train_seconds": 0.01},
            )
            for index, site in enumerate(sites)
        )  # fmt: skip
    return experiment


def test_the_snapshot_of_many_clients_sends_the_newest_rounds_and_counts_the_rest():
    # Given experiments of 200 and 400 clients in each of 5 rounds, one failing per round
    sizes = {}
    for clients in (200, 400):
        experiment = experiment_with_clients(clients, rounds=5)
        # When a browser's snapshot is built
        sent = snapshot.experiment_snapshot(experiment)
        sizes[clients] = len(json.dumps(sent))
        # Then it carries whole newest rounds within the limit, plus earlier failures
        newest = [u for u in sent["client_updates"] if u["status"] == "succeeded"]
        assert len(newest) <= snapshot.SNAPSHOT_CLIENT_UPDATES
        assert {u["round_number"] for u in newest} == set(
            range(sent["client_updates_from_round"], 6)
        )
        failures = [u for u in sent["client_updates"] if u["status"] == "failed"]
        assert sorted(u["round_number"] for u in failures) == [1, 2, 3, 4, 5]
        # and each round's clients counted by status
        assert sent["clients_per_round"] == [
            {"round": number, "failed": 1, "succeeded": clients - 1} for number in range(1, 6)
        ]
        assert sent["lost_sites_warning"]  # the failing site never contributed
        # and the sites' own evaluations only of the rounds whose rows it carries
        for fl_round in sent["rounds"]:
            older = fl_round["number"] < sent["client_updates_from_round"]
            assert ("sites" in fl_round["federated_evaluation"]) is not older
            assert fl_round["federated_evaluation"]["weighted"] == {"accuracy": 0.75}
    # and twice the clients do not make it larger than the rows the limit allows
    assert sizes[400] < sizes[200] * 1.1


def test_the_snapshot_of_few_clients_sends_every_row():
    experiment = experiment_with_clients(4, rounds=3)
    sent = snapshot.experiment_snapshot(experiment)
    assert len(sent["client_updates"]) == 12
    assert sent["client_updates_from_round"] is None


def test_the_snapshot_reads_of_each_client_row_only_what_it_sends():
    experiment = experiment_with_clients(4, rounds=3)
    CheckpointFactory(experiment=experiment, round=None, metrics={"accuracy": 0.5})
    for fl_round in experiment.rounds.all():
        CheckpointFactory(experiment=experiment, round=fl_round, metrics={"accuracy": 0.75})
    with CaptureQueriesContext(connection) as queries:
        sent = snapshot.experiment_snapshot(experiment)
    # The rows are those the API serializes from whole objects
    rows = ClientUpdate.objects.filter(round__experiment=experiment)
    assert sent["client_updates"] == ClientUpdateSerializer(rows, many=True).data
    checkpoints = Checkpoint.objects.filter(experiment=experiment)
    assert sent["checkpoints"] == CheckpointSummarySerializer(checkpoints, many=True).data
    assert [c["round_number"] for c in sent["checkpoints"]] == [None, 1, 2, 3]
    # read in one query, without each row's evaluation or its round's JSON columns, which
    # grow with the sites and were decoded once per row
    row_queries = [q["sql"] for q in queries if 'FROM "training_clientupdate"' in q["sql"]]
    assert len(row_queries) == 2  # the counts by status, then the rows
    for column in ('"training_clientupdate"."evaluation"', '"training_round"."metrics"',
                   '"training_round"."federated_evaluation"'):  # fmt: skip
        assert not any(column in sql for sql in row_queries), column
    # and the checkpoints without their metrics, which the snapshot does not send
    checkpoint_queries = [q["sql"] for q in queries if 'FROM "training_checkpoint"' in q["sql"]]
    assert checkpoint_queries
    assert not any('"training_checkpoint"."metrics"' in sql for sql in checkpoint_queries)
