"""Evaluation where the data is: each round's federated evaluation, the cross-site round that
follows the last training round, and what the ledger, the API and the summary make of them.

Experiments run in this process, task by task, as a worker would run them.
"""

import csv
import hashlib
import io
import json
from datetime import timedelta

import numpy as np
import pytest
import torch

from tests.conftest import client_for, new_experiment
from tests.factories import (
    ClientUpdateFactory,
    ExperimentFactory,
    RoundFactory,
    SiteFactory,
    UserFactory,
    claim,
)
from training import federation, modelstore, services
from training.clients import StoredSiteState
from training.fl.client import FEDBN_LOCAL
from training.fl.evaluation import evaluate_model
from training.models import (
    Checkpoint,
    ClientUpdate,
    ClientUpdateStatus,
    ExperimentStatus,
    RoundKind,
    RoundStatus,
)
from training.runner import format_cross_site, summarize
from visualization import evaluations
from workers import tasks

pytestmark = pytest.mark.django_db

CPU = torch.device("cpu")
VALIDATION_FRACTION = 0.2
# Rows of the 120-image synthetic set given to each of three sites; rows 90-119 are the
# server's held-out data.
SITE_ROWS = [list(range(0, 30)), list(range(30, 60)), list(range(60, 90))]


def validation_rows(rows: list[int], seed_text: str) -> list[int]:
    """A site's validation rows as the contract defines them, computed here: round(f * n) of
    its sorted rows, picked by a permutation seeded with the first 8 bytes of the SHA-256 of
    "<dataset>/<site>"."""
    seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "big")
    ordered = sorted(rows)
    picked = np.random.default_rng(seed).permutation(len(ordered))[
        : round(VALIDATION_FRACTION * len(ordered))
    ]
    return sorted(ordered[position] for position in picked)


@pytest.fixture
def file_partitioned(lesions_dataset, tmp_path):
    """Three simulated sites holding the rows of SITE_ROWS, by a partition file."""
    partition = tmp_path / "partition.json"
    partition.write_text(json.dumps(SITE_ROWS))
    lesions_dataset.validation_fraction = VALIDATION_FRACTION
    lesions_dataset.save(update_fields=["validation_fraction"])
    return lesions_dataset, f"file:{partition}"


def experiment_on(file_partitioned, **fields):
    dataset, partition = file_partitioned
    experiment = new_experiment(dataset, **fields)
    experiment.partition = partition
    experiment.save(update_fields=["partition"])
    return experiment


def run_round(experiment, fl_round) -> None:
    for update in fl_round.client_updates.all():
        tasks.train_client(update.pk, update.round_id, update.site_id)
    if fl_round.kind == RoundKind.TRAIN:
        assert tasks.aggregate_round(fl_round.pk) == "completed"
    experiment.refresh_from_db()


def run_to_the_end(experiment):
    services.start_experiment(experiment.pk)
    experiment.refresh_from_db()
    while not experiment.is_terminal:
        run_round(experiment, experiment.rounds.get(number=experiment.current_round))
    return experiment


def evaluated_directly(experiment, weights_file: tuple[str, str], rows: list[int]) -> dict:
    """The stored model evaluated here, on these rows of the experiment's dataset."""
    network = federation.network_with_weights(
        experiment, modelstore.load_stored_weights(*weights_file)
    )
    data = federation.open_dataset_at(experiment.dataset, experiment.dataset.path)
    return evaluate_model(network, data, rows, batch_size=experiment.batch_size, device=CPU)


def assert_same_evaluation(recorded: dict, expected: dict) -> None:
    assert recorded["num_samples"] == expected["num_samples"]
    assert recorded["confusion_matrix"] == expected["confusion_matrix"]
    assert recorded["accuracy"] == expected["accuracy"]
    assert recorded["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    # None when the split holds one class only (its samples depend on the dataset's name).
    if expected["roc_auc"] is None:
        assert recorded["roc_auc"] is None
    else:
        assert recorded["roc_auc"] == pytest.approx(expected["roc_auc"], rel=1e-9)


def test_federated_evaluation_equals_evaluating_each_checkpoint_on_each_sites_split(
    file_partitioned,
):
    # Given three sites training two rounds of FedAvg on known rows of one dataset
    dataset, _ = file_partitioned
    experiment = experiment_on(file_partitioned, num_rounds=2, clients_per_round=3, min_clients=3)
    sites = list(experiment.sites.order_by("pk"))
    validation = {
        site.slug: validation_rows(rows, f"{dataset.name}/{site.slug}")
        for site, rows in zip(sites, SITE_ROWS, strict=True)
    }
    # When the experiment runs to its end
    experiment = run_to_the_end(experiment)
    assert experiment.status == ExperimentStatus.COMPLETED, experiment.failure_reason
    # Then each global model's federated evaluation is that checkpoint evaluated here on
    # each site's validation rows: the initial model's, round 1's and the final one's
    initial = Checkpoint.objects.get(experiment=experiment, round__isnull=True)
    checkpoints = [
        (initial.metrics["federated_evaluation"], initial),
        *(
            (fl_round.federated_evaluation, fl_round.checkpoint)
            for fl_round in experiment.rounds.filter(kind=RoundKind.TRAIN).order_by("number")
        ),
    ]
    assert len(checkpoints) == 3
    for filed, checkpoint in checkpoints:
        assert sorted(filed["sites"]) == sorted(validation)
        for slug, rows in validation.items():
            expected = evaluated_directly(
                experiment, (checkpoint.file.name, checkpoint.sha256), rows
            )
            assert_same_evaluation(filed["sites"][slug], expected)
        samples = {slug: filed["sites"][slug]["num_samples"] for slug in validation}
        assert filed["weighted"]["num_samples"] == sum(samples.values()) == 18
        assert filed["weighted"]["accuracy"] == pytest.approx(
            sum(samples[s] * filed["sites"][s]["accuracy"] for s in samples) / 18
        )
    # And each site's last local model is evaluated on every site's rows in the matrix
    matrix = evaluations.cross_site_document(experiment)
    assert matrix["models"] == ["global", *sorted(validation)]
    assert matrix["sites"] == sorted(validation)
    for model in sorted(validation):
        update = ClientUpdate.objects.get(
            round__experiment=experiment, round__number=2, site__slug=model
        )
        for slug, rows in validation.items():
            expected = evaluated_directly(
                experiment, (update.update_file.name, update.update_sha256), rows
            )
            assert_same_evaluation(matrix["cells"][model][slug], expected)


def test_with_fedbn_each_site_evaluates_the_global_model_with_its_own_batch_norm_layers(
    file_partitioned,
):
    # Given a FedBN experiment run to its end (batch-norm layers stay at the sites)
    dataset, _ = file_partitioned
    experiment = experiment_on(file_partitioned, num_rounds=2, clients_per_round=3, min_clients=3)
    experiment.strategy = "fedbn"
    experiment.network, experiment.network_params = "resnet18-small", {"width": 4}
    experiment.save(update_fields=["strategy", "network", "network_params"])
    batch_norm_names = [
        name
        for module_name, module in federation.build_experiment_network(experiment).named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        for name in (f"{module_name}.{entry}" for entry in module.state_dict())
    ]
    assert batch_norm_names
    experiment = run_to_the_end(experiment)
    assert experiment.status == ExperimentStatus.COMPLETED, experiment.failure_reason
    # Then the cross-site tasks named the local layers, and each site's "global" result is
    # the final global model with that site's own layers, evaluated on its own split
    cross_site = experiment.rounds.get(kind=RoundKind.EVALUATE)
    final = experiment.rounds.get(number=2).checkpoint
    global_weights = modelstore.load_stored_weights(final.file.name, final.sha256)
    matrix = evaluations.cross_site_document(experiment)
    assert matrix["personalized"] is True
    data = federation.open_dataset_at(dataset, dataset.path)
    sites = list(experiment.sites.order_by("pk"))
    differs = []
    for site, rows in zip(sites, SITE_ROWS, strict=True):
        update = cross_site.client_updates.get(site=site)
        task = federation.client_task(
            ClientUpdate(pk=update.pk, round=federation.round_for_clients(cross_site.pk),
                         site=site, task_id=update.task_id)
        )  # fmt: skip
        local_names = task.options["local_parameters"]
        assert local_names == batch_norm_names
        kept = StoredSiteState(experiment.pk, site.slug).load(FEDBN_LOCAL)
        personalized = {**global_weights, **{name: kept[name] for name in local_names}}
        network = federation.network_with_weights(experiment, personalized)
        rows_kept = validation_rows(rows, f"{dataset.name}/{site.slug}")
        expected = evaluate_model(
            network, data, rows_kept, batch_size=experiment.batch_size, device=CPU
        )
        assert_same_evaluation(matrix["cells"]["global"][site.slug], expected)
        differs.append(any(not torch.equal(kept[n], global_weights[n]) for n in local_names))
    assert any(differs)  # the sites' own layers are not the global ones


def test_the_cross_site_round_opens_after_the_last_round_and_the_experiment_completes_after_it(
    file_partitioned,
):
    # Given a one-round experiment whose round picks two of its three sites
    experiment = experiment_on(file_partitioned, num_rounds=1, clients_per_round=2, min_clients=2)
    experiment.sites.add(SiteFactory())  # a third site, for the partition's third part
    services.start_experiment(experiment.pk)
    experiment.refresh_from_db()
    first = experiment.rounds.get(number=1)
    trained = sorted(first.client_updates.values_list("site__slug", flat=True))
    assert len(trained) == 2
    # When its only training round is aggregated
    run_round(experiment, first)
    # Then the cross-site round is open, one task per site of the experiment, naming the
    # global model and the local model of each site that trained
    cross_site = experiment.rounds.get(number=2)
    assert (cross_site.kind, cross_site.status) == (RoundKind.EVALUATE, RoundStatus.OPEN)
    assert (experiment.status, experiment.current_round) == (ExperimentStatus.RUNNING, 2)
    assert experiment.round_progress == "1/1, cross-site evaluation"
    asked = sorted(cross_site.client_updates.values_list("site__slug", flat=True))
    assert asked == sorted(experiment.sites.values_list("slug", flat=True))
    assert len(asked) == 3
    update = cross_site.client_updates.first()
    task = federation.client_task(claim(update, worker="w@test"))
    assert task.kind == "evaluate"
    assert task.options == {"models": ["global", *trained]}
    assert task.weights_sha256 == first.checkpoint.sha256
    # When the sites have evaluated
    run_round(experiment, cross_site)
    # Then the round closed without aggregation and the experiment completed after it
    cross_site.refresh_from_db()
    assert cross_site.status == RoundStatus.CLOSED
    assert not Checkpoint.objects.filter(round=cross_site).exists()
    assert experiment.status == ExperimentStatus.COMPLETED
    assert experiment.round_progress == "1/1"
    first.refresh_from_db()
    assert sorted(first.federated_evaluation["sites"]) == asked


def test_failed_and_late_evaluations_do_not_fail_the_experiment(file_partitioned):
    # Given the cross-site round of a finished training round, with three sites asked
    experiment = experiment_on(file_partitioned, num_rounds=1, clients_per_round=3, min_clients=3)
    services.start_experiment(experiment.pk)
    experiment.refresh_from_db()
    run_round(experiment, experiment.rounds.get(number=1))
    cross_site = experiment.rounds.get(kind=RoundKind.EVALUATE)
    failing, evaluating, silent = cross_site.client_updates.order_by("site__pk")
    # When one site fails, one evaluates and one never reports before the deadline
    services.record_client_result(claim(failing, worker="w@test"), error="GPU fell off the bus")
    tasks.train_client(evaluating.pk, evaluating.round_id, evaluating.site_id)
    services.close_overdue_rounds(now=cross_site.deadline + timedelta(seconds=1))
    # Then the round closed, the experiment completed, and the matrix says who has no results
    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.COMPLETED, experiment.failure_reason
    matrix = evaluations.cross_site_document(experiment)
    assert matrix["status"] == RoundStatus.CLOSED
    assert matrix["clients"][failing.site.slug] == {
        "status": ClientUpdateStatus.FAILED,
        "error": "GPU fell off the bus",
    }
    assert matrix["clients"][silent.site.slug]["status"] == ClientUpdateStatus.LATE
    for model in matrix["models"]:
        assert matrix["cells"][model][failing.site.slug] is None
        assert matrix["cells"][model][silent.site.slug] is None
        assert matrix["cells"][model][evaluating.site.slug]["num_samples"] == 6
        assert matrix["weighted"][model]["num_sites"] == 1
    first = experiment.rounds.get(number=1)
    assert list(first.federated_evaluation["sites"]) == [evaluating.site.slug]


def test_without_a_validation_share_the_last_round_completes_the_experiment(file_partitioned):
    dataset, _ = file_partitioned
    dataset.validation_fraction = 0.0
    dataset.save(update_fields=["validation_fraction"])
    experiment = experiment_on(file_partitioned, num_rounds=1, clients_per_round=3, min_clients=3)

    experiment = run_to_the_end(experiment)

    assert experiment.status == ExperimentStatus.COMPLETED
    assert not experiment.rounds.filter(kind=RoundKind.EVALUATE).exists()
    assert evaluations.cross_site_document(experiment)["round"] is None
    assert all(not r.federated_evaluation for r in experiment.rounds.all())


# --- The cross-site matrix through the API, the summary and the report ------------------------


def site_metrics(accuracy: float, samples: int) -> dict:
    return {"num_samples": samples, "loss": 1 - accuracy, "accuracy": accuracy,
            "balanced_accuracy": accuracy, "roc_auc": None,
            "confusion_matrix": [[samples, 0], [0, 0]]}  # fmt: skip


@pytest.fixture
def finished_ledger():
    """A completed two-site experiment: one training round and its closed cross-site round,
    in which site b failed."""
    owner, member = UserFactory(), UserFactory()
    experiment = ExperimentFactory(
        owner=owner, members=[member], num_rounds=1, status=ExperimentStatus.COMPLETED,
        current_round=2,
    )  # fmt: skip
    site_a, site_b = experiment.sites.order_by("slug")
    trained = RoundFactory(
        experiment=experiment, number=1, status=RoundStatus.CLOSED,
        metrics={"global": site_metrics(0.7, 40), "clients": {}},
        federated_evaluation={"sites": {site_a.slug: site_metrics(0.75, 8)},
                              "weighted": site_metrics(0.75, 8)},
    )  # fmt: skip
    for site in (site_a, site_b):
        ClientUpdateFactory(round=trained, site=site, status=ClientUpdateStatus.SUCCEEDED,
                            num_samples=32, metrics={"loss": 0.5, "accuracy": 0.8})  # fmt: skip
    cross_site = RoundFactory(
        experiment=experiment, number=2, kind=RoundKind.EVALUATE, status=RoundStatus.CLOSED,
        metrics={"models": ["global", site_a.slug, site_b.slug], "wall_seconds": 1.0},
    )  # fmt: skip
    ClientUpdateFactory(
        round=cross_site, site=site_a, status=ClientUpdateStatus.SUCCEEDED, num_samples=8,
        evaluation={"global": site_metrics(0.75, 8), site_a.slug: site_metrics(0.875, 8),
                    site_b.slug: site_metrics(0.5, 8)},
    )  # fmt: skip
    ClientUpdateFactory(
        round=cross_site, site=site_b, status=ClientUpdateStatus.FAILED, error="out of memory"
    )
    return experiment, site_a.slug, site_b.slug


@pytest.mark.parametrize(("role", "expected"), [("owner", 200), ("member", 200), ("other", 404)])
def test_the_cross_site_matrix_is_visible_like_the_experiment(finished_ledger, role, expected):
    experiment, *_ = finished_ledger
    user = {
        "owner": experiment.owner,
        "member": experiment.members.get(),
        "other": UserFactory(),
    }[role]
    client = client_for(user)
    for url in (
        f"/api/experiments/{experiment.pk}/cross-site/",
        f"/api/experiments/{experiment.pk}/cross-site/?format=csv",
        f"/api/experiments/{experiment.pk}/cross-site.csv",
    ):
        assert client.get(url).status_code == expected, url
    assert client_for(None).get(f"/api/experiments/{experiment.pk}/cross-site/").status_code in (
        401, 403,
    )  # fmt: skip


def test_the_cross_site_json_is_the_matrix_of_models_by_sites(finished_ledger):
    experiment, a, b = finished_ledger

    response = client_for(experiment.owner).get(f"/api/experiments/{experiment.pk}/cross-site/")

    assert response.status_code == 200
    matrix = response.json()
    assert (matrix["round"], matrix["status"], matrix["personalized"]) == (2, "closed", False)
    assert matrix["models"] == ["global", a, b]
    assert matrix["sites"] == [a, b]
    assert matrix["cells"]["global"][a]["accuracy"] == 0.75
    assert matrix["cells"][a][a]["accuracy"] == 0.875
    assert matrix["cells"][b][a]["accuracy"] == 0.5
    assert matrix["cells"]["global"][b] is None  # b failed
    assert matrix["weighted"][a]["accuracy"] == 0.875
    assert matrix["clients"][b] == {"status": "failed", "error": "out of memory"}


def test_the_cross_site_csv_has_a_row_per_model_and_site(finished_ledger):
    experiment, a, b = finished_ledger

    for url in (f"/api/experiments/{experiment.pk}/cross-site/?format=csv",
                f"/api/experiments/{experiment.pk}/cross-site.csv"):  # fmt: skip
        response = client_for(experiment.owner).get(url)
        assert response.status_code == 200
        assert response["Content-Type"].startswith("text/csv")
        assert f"experiment-{experiment.pk}-cross-site.csv" in response["Content-Disposition"]
        rows = list(csv.DictReader(io.StringIO(response.content.decode())))
        assert list(rows[0]) == list(evaluations.CSV_COLUMNS)
        assert [(row["model"], row["site"]) for row in rows] == [
            (model, site)
            for model in ("global", a, b)
            for site in (a, b, evaluations.WEIGHTED_SITE)
        ]
        assert rows[0]["accuracy"] == "0.75" and rows[0]["num_samples"] == "8"
        assert rows[1]["accuracy"] == ""  # b failed


def test_a_cross_site_format_other_than_json_or_csv_is_a_bad_request(finished_ledger):
    experiment, *_ = finished_ledger
    response = client_for(experiment.owner).get(
        f"/api/experiments/{experiment.pk}/cross-site/?format=xlsx"
    )
    assert response.status_code == 400
    assert "json or csv" in str(response.json())


def test_before_its_round_the_cross_site_matrix_is_empty():
    experiment = ExperimentFactory(status=ExperimentStatus.RUNNING, current_round=1)
    response = client_for(experiment.owner).get(f"/api/experiments/{experiment.pk}/cross-site/")
    assert response.status_code == 200
    assert response.json()["round"] is None
    assert response.json()["models"] == []


def test_the_summary_carries_federated_and_cross_site_evaluation(finished_ledger):
    experiment, a, b = finished_ledger
    summary = json.loads(json.dumps(summarize(experiment, wall_seconds=1.0)))

    assert [r["number"] for r in summary["rounds"]] == [1]  # training rounds only
    federated = summary["rounds"][0]["federated_evaluation"]
    assert set(federated) == {"sites", "weighted"}
    assert federated["sites"][a]["accuracy"] == 0.75
    assert summary["cross_site"]["models"] == ["global", a, b]
    assert summary["cross_site"]["cells"][a][b] is None
    assert summary["cross_site"]["cells"][b][a]["accuracy"] == 0.5
    table = format_cross_site(summary["cross_site"]).splitlines()
    assert table[0].split()[-3:] == [a, b, "weighted"]
    assert table[1].split() == ["global", "0.7500", "-", "0.7500"]


def test_the_report_draws_the_cross_site_heatmap(finished_ledger):
    from matplotlib.figure import Figure

    experiment, a, b = finished_ledger
    axes = Figure().subplots()

    evaluations.draw_heatmap(axes, evaluations.cross_site_document(experiment), "no data")

    drawn = axes.images[0].get_array()
    assert drawn.shape == (3, 2)
    assert drawn[0, 0] == 0.75 and drawn[1, 0] == 0.875 and drawn[2, 0] == 0.5
    assert drawn.mask[:, 1].all()  # b's column: it failed
    assert [label.get_text() for label in axes.get_xticklabels()] == [a, b]
    assert "0.88" in [text.get_text() for text in axes.texts]


def test_the_report_renders_with_the_evaluation_panels(finished_ledger):
    from visualization import reports

    experiment, *_ = finished_ledger
    png = reports.render_report(experiment, "png")
    assert png.startswith(b"\x89PNG")
    assert reports.chosen_round(experiment, reports.ledger_rounds(experiment), None).number == 1
    with pytest.raises(reports.UnknownRound):
        reports.render_report(experiment, "png", round_number=2)  # the cross-site round
