"""What people see of a segmentation experiment: the metric catalogue, and the report, CSV,
JSON summary, comparison, cross-site export and page that read it (Dice per site and per
class, HD95; no confusion matrix)."""

import csv
import io
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from django.urls import reverse

from tests.factories import (
    CheckpointFactory,
    ClientUpdateFactory,
    DatasetFactory,
    ExperimentFactory,
    RoundFactory,
    SiteFactory,
    UserFactory,
)
from training import comparison, federation, metric_catalog, sweeps
from training.fl.metrics import classification_metrics, segmentation_metrics
from training.models import (
    ClientUpdateStatus,
    ExperimentStatus,
    RoundKind,
    RoundStatus,
    Site,
    StorageFormat,
    Task,
)
from training.runner import format_cross_site, format_table, round_row, summarize
from visualization import evaluations, reports
from visualization.snapshot import experiment_snapshot

OPENED = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
CLASS_NAMES = ["background", "organ", "lesion"]


# --- The catalogue ---------------------------------------------------------------------------


def test_each_task_ranks_models_by_its_primary_metric_shown_first():
    assert metric_catalog.primary_metric("classification") == "accuracy"
    assert metric_catalog.primary_metric("segmentation") == "dice"
    assert metric_catalog.scalar_metrics("segmentation") == ["dice", "hd95", "loss"]
    assert metric_catalog.scalar_metrics("classification")[0] == "accuracy"
    assert "dice" not in metric_catalog.scalar_metrics("classification")
    assert metric_catalog.per_class_metrics("segmentation") == ["dice_per_class", "hd95_per_class"]


def test_an_unknown_task_or_metric_is_refused_with_the_known_ones_named():
    with pytest.raises(ValueError, match="classification, segmentation"):
        metric_catalog.primary_metric("detection")
    with pytest.raises(KeyError, match="dice"):
        metric_catalog.get_metric("jaccard")


def test_hd95_and_losses_are_better_lower_and_scores_higher():
    assert metric_catalog.lower_is_better("hd95")
    assert metric_catalog.lower_is_better("loss")
    assert metric_catalog.lower_is_better("proximal_loss")  # outside the catalogue: by its name
    assert not metric_catalog.lower_is_better("dice")
    assert metric_catalog.is_better("hd95", 3.0, 4.5)
    assert metric_catalog.is_better("dice", 0.8, 0.7)
    assert metric_catalog.get_metric("hd95").format(3.14159) == "3.14 mm"
    assert metric_catalog.get_metric("dice").format(float("nan")) == "-"


def test_every_number_the_engine_reports_for_masks_is_defined_for_segmentation():
    # Given a predicted and a true mask with two foreground classes
    target = np.zeros((1, 16, 16), dtype=np.int64)
    target[0, 2:8, 2:8] = 1
    target[0, 10:14, 10:14] = 2
    prediction = target.copy()
    prediction[0, 2:8, 2:5] = 0
    # When the engine computes its segmentation metrics
    reported = segmentation_metrics(prediction, target, num_classes=3)
    # Then each of them (but the sample count) is in the catalogue, for segmentation,
    # per class exactly when it is a list
    for name, value in reported.items():
        if name == "num_samples":
            continue
        metric = metric_catalog.get_metric(name)
        assert "segmentation" in metric.tasks
        assert metric.per_class == isinstance(value, list), name


def test_every_number_the_engine_reports_for_labels_is_defined_for_classification():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    reported = classification_metrics([0, 1, 1, 0], probabilities, num_classes=2)

    structures = {"num_samples", "confusion_matrix", "roc_curve"}  # drawn, not numbers
    for name, value in reported.items():
        if name in structures:
            continue
        metric = metric_catalog.get_metric(name)
        assert "classification" in metric.tasks
        assert metric.per_class == isinstance(value, list), name


def test_the_best_checkpoint_of_a_segmentation_round_is_chosen_by_dice():
    better = {"global": {"dice": 0.8, "loss": 0.9}, "clients": {"loss": 0.3}}
    worse = {"global": {"dice": 0.6, "loss": 0.2}, "clients": {"loss": 0.1}}
    unevaluated = {"global": None, "clients": {"loss": 0.1}}

    assert federation.score(better, "segmentation") > federation.score(worse, "segmentation")
    assert federation.score(unevaluated, "segmentation") == -math.inf
    assert federation.score({"global": {"accuracy": 0.7}}, "classification") == 0.7


# --- A segmentation ledger: two evaluated rounds at two hospitals, then the cross-site round --


def evaluation(dice_per_class, hd95, loss, samples=6):
    return {
        "num_samples": samples,
        "loss": loss,
        "dice": sum(dice_per_class) / len(dice_per_class),
        "dice_per_class": dice_per_class,
        "hd95": hd95,
        "hd95_per_class": [hd95 - 1.0, hd95 + 1.0],
    }


def site_named(slug: str) -> Site:
    """The site with this slug: experiments in one test share their hospitals."""
    return Site.objects.filter(slug=slug).first() or SiteFactory(slug=slug)


def segmentation_experiment(owner=None, name="Abdomen CT", dice=(0.6, 0.4, 0.8, 0.7)):
    """Two closed rounds whose held-out Dice per class is dice[0:2], then dice[2:4]."""
    north, south = (site_named(slug) for slug in ("north", "south"))
    dataset = DatasetFactory(
        name=f"{name.lower().replace(' ', '-')}-msd",
        task=Task.SEGMENTATION,
        storage_format=StorageFormat.MSD,
        num_classes=3,
        class_names=CLASS_NAMES,
        image_shape=[16, 32, 32],
        **({"owner": owner} if owner else {}),
    )
    experiment = ExperimentFactory(
        name=name,
        dataset=dataset,
        owner=dataset.owner,
        sites=[north, south],
        network="unet",
        num_rounds=2,
        status=ExperimentStatus.COMPLETED,
    )
    for number, per_class, hd95 in ((1, dice[0:2], 9.0), (2, dice[2:4], 4.0)):
        opened = OPENED + timedelta(minutes=10 * number)
        fl_round = RoundFactory(
            experiment=experiment,
            number=number,
            status=RoundStatus.CLOSED,
            opened_at=opened,
            closed_at=opened + timedelta(minutes=3),
            metrics={
                "global": evaluation(list(per_class), hd95, loss=1.0 / number),
                "clients": {"loss": 0.9 / number, "dice": 0.5 * number, "num_clients": 2},
                "wall_seconds": 180.0,
            },
            federated_evaluation={
                "sites": {
                    "north": evaluation([0.7, 0.5], hd95 + 1.0, loss=0.8, samples=4),
                    "south": evaluation([0.5, 0.3], hd95 + 3.0, loss=1.2, samples=2),
                },
                "weighted": evaluation([0.63, 0.43], hd95 + 1.7, loss=0.93, samples=6),
            },
        )
        for site, dice_value in ((north, 0.55), (south, 0.45)):
            ClientUpdateFactory(
                round=fl_round,
                site=site,
                status=ClientUpdateStatus.SUCCEEDED,
                num_samples=10,
                metrics={"loss": 0.7, "dice": dice_value, "train_seconds": 12.0},
            )
    cross_site = RoundFactory(
        experiment=experiment,
        number=3,
        kind=RoundKind.EVALUATE,
        status=RoundStatus.CLOSED,
        opened_at=OPENED + timedelta(minutes=40),
        metrics={"models": ["global", "north", "south"]},
    )
    for site, own in ((north, 0.75), (south, 0.65)):
        ClientUpdateFactory(
            round=cross_site,
            site=site,
            status=ClientUpdateStatus.SUCCEEDED,
            evaluation={
                model: evaluation([own, own - 0.2], 5.0, loss=0.5, samples=3)
                for model in ("global", "north", "south")
            },
        )
    return experiment


@pytest.fixture
def segmented(db):
    return segmentation_experiment()


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_the_metrics_csv_of_a_segmentation_experiment_has_dice_per_class_and_hd95(segmented):
    rows = csv_rows(reports.metrics_csv(segmented))

    assert list(rows[0]) == list(reports.metric_columns("segmentation", CLASS_NAMES))
    assert "global_accuracy" not in rows[0]
    second_round = [row for row in rows if row["round"] == "2"]
    assert {row["site"] for row in second_round} == {"north", "south"}
    north = next(row for row in second_round if row["site"] == "north")
    assert north["train_dice"] == "0.55"
    assert float(north["global_dice"]) == pytest.approx(0.75)
    assert north["global_dice_organ"] == "0.8"
    assert north["global_dice_lesion"] == "0.7"
    assert north["global_hd95"] == "4.0"
    assert north["global_loss"] == "0.5"


def test_metrics_json_names_the_task_and_keeps_each_rounds_dice_per_class(segmented):
    document = reports.metrics_json(segmented)

    assert document["experiment"]["task"] == "segmentation"
    assert document["rounds"][1]["global"]["dice_per_class"] == [0.8, 0.7]
    assert document["rounds"][1]["federated_evaluation"]["sites"]["south"]["hd95"] == 7.0


def test_the_report_of_a_segmentation_experiment_draws_dice_and_hd95_not_a_confusion_matrix(
    segmented,
):
    drawn = reports.render_report(segmented, "svg").decode()

    assert "Held-out Dice per round" in drawn
    assert "Dice per class per round" in drawn
    assert "organ" in drawn and "lesion" in drawn
    assert "HD95 per round (mm, lower is better)" in drawn
    assert "Training Dice per site" in drawn
    assert "Federated evaluation: Dice on the sites" in drawn
    assert "Cross-site evaluation: Dice on each site" in drawn
    assert "Confusion matrix" not in drawn
    assert "ROC" not in drawn


def test_the_json_summary_carries_dice_dice_per_class_and_hd95_of_every_round(segmented):
    summary = summarize(segmented, wall_seconds=1.0)

    assert summary["configuration"]["task"] == "segmentation"
    held_out = [fl_round["global"] for fl_round in summary["rounds"]]
    assert [metrics["dice_per_class"] for metrics in held_out] == [[0.6, 0.4], [0.8, 0.7]]
    assert [metrics["hd95"] for metrics in held_out] == [9.0, 4.0]
    assert held_out[1]["dice"] == pytest.approx(0.75)
    per_site = summary["rounds"][1]["federated_evaluation"]["sites"]
    assert per_site["north"]["dice"] == pytest.approx(0.6)


def test_the_command_lines_tables_show_dice_and_hd95(segmented):
    rows = [round_row(r) for r in segmented.rounds.filter(kind=RoundKind.TRAIN).order_by("number")]
    table = format_table(rows).splitlines()
    cross_site = format_cross_site(summarize(segmented, wall_seconds=1.0)["cross_site"])

    assert table[0].split() == [
        "round", "clients", "train_loss", "train_dice", "loss", "dice", "hd95", "wall_seconds",
    ]  # fmt: skip
    assert table[2].split()[5:7] == ["0.7500", "4.0000"]
    assert cross_site.splitlines()[0].startswith("dice: model \\ site data")


def test_the_cross_site_export_offers_dice_and_hd95_and_its_heatmap_shows_dice(segmented):
    document = evaluations.cross_site_document(segmented)
    rows = csv_rows(evaluations.cross_site_csv(segmented))

    assert document["metrics"] == ["dice", "hd95", "loss"]
    assert document["primary_metric"] == "dice"
    assert list(rows[0]) == ["model", "site", "num_samples", "dice", "hd95", "loss"]
    north_global = next(r for r in rows if r["model"] == "global" and r["site"] == "north")
    assert float(north_global["dice"]) == pytest.approx(0.65)
    assert north_global["hd95"] == "5.0"


def test_comparing_segmentation_experiments_targets_dice_and_counts_hd95_lower_better(db):
    first = segmentation_experiment(name="Unet run")
    second = segmentation_experiment(name="SegResNet run", dice=(0.3, 0.3, 0.5, 0.4))

    result = comparison.experiments_comparison([first, second], target_value=0.7)

    assert result["target_metric"] == "dice"
    assert result["metrics"] == ["dice", "hd95", "loss"]
    assert result["labels"] == {"dice": "Dice", "hd95": "HD95", "loss": "loss"}
    first_group, second_group = result["groups"]
    assert first_group["rounds_to_target"]["mean"] == 2
    assert second_group["rounds_to_target"]["reached"] == 0
    assert first_group["experiments"][0]["final_per_class"]["dice_per_class"] == [0.8, 0.7]
    assert comparison.rounds_to_reach([(1, 9.0), (2, 4.0)], 5.0, "hd95") == 2
    table = comparison.format_comparison(result)
    assert table.splitlines()[0].split()[:5] == ["group", "runs", "dice", "hd95", "loss"]


def test_the_experiment_page_of_a_segmentation_experiment_has_dice_charts_and_no_confusion(
    client, segmented
):
    client.force_login(segmented.owner)

    page = client.get(reverse("experiment-page", args=[segmented.pk])).content.decode()

    assert 'id="dice-class-chart"' in page
    assert 'id="hd95-chart"' in page
    assert 'id="confusion"' not in page
    assert "Training Dice per site" in page
    assert '<option value="dice">Dice</option>' in page
    assert "<th>HD95 (mm)</th>" in page


def test_the_snapshot_gives_the_page_the_tasks_metric_catalogue(segmented):
    snapshot = experiment_snapshot(segmented)

    catalogue = snapshot["metric_catalog"]
    assert catalogue["task"] == "segmentation"
    assert catalogue["primary"] == "dice"
    assert catalogue["metrics"]["hd95"]["unit"] == "mm"
    assert catalogue["metrics"]["hd95"]["higher_is_better"] is False


def test_the_experiment_list_gives_a_segmentation_experiments_best_dice_and_trend(
    client, segmented
):
    CheckpointFactory(
        experiment=segmented,
        round=segmented.rounds.get(number=2),
        is_best=True,
        metrics=segmented.rounds.get(number=2).metrics,
    )
    client.force_login(segmented.owner)

    page = client.get(reverse("home")).content.decode()

    assert '0.750 <span class="muted">Dice</span>' in page
    assert 'aria-label="Dice per round"' in page


def test_a_sweep_of_segmentation_experiments_targets_dice_unless_told_otherwise(db, dataset_root):
    # Given a segmentation dataset (the ledger's row; nothing here reads its files)
    owner = UserFactory()
    dataset = DatasetFactory(
        owner=owner,
        path=str(dataset_root),
        task=Task.SEGMENTATION,
        storage_format=StorageFormat.MSD,
        num_classes=3,
        class_names=CLASS_NAMES,
        image_shape=[32, 32],
    )
    base = {
        "dataset": dataset.pk,
        "network": "unet",
        "sites": [site_named("north").slug, site_named("south").slug],
        "num_rounds": 2,
        "clients_per_round": 2,
        "min_clients": 1,
    }
    # When sweeps are made over seeds, one without a target metric
    default = sweeps.create_sweep(owner, name="dice", base_settings=base, grid={"seed": [0, 1]})
    told = sweeps.create_sweep(
        owner, name="hd95", base_settings=base, grid={"seed": [0]}, target_metric="hd95"
    )

    # Then the first targets Dice, the second what it was told
    assert default.target_metric == "dice"
    assert told.target_metric == "hd95"
