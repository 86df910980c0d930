"""A segmentation experiment through the ledger and the real client path: a tiny Decathlon
set (NIfTI volumes with organ and lesion masks) split over two simulated sites, trained on
patches, aggregated, and evaluated by sliding window on the server and at the sites.

Experiments run in this process, task by task, as a worker would run them.
"""

import pytest
import torch

from tests.conftest import new_experiment
from tests.factories import UserFactory
from training import federation, modelstore, services
from training.fl.data.synthetic import generate_segmentation_dataset
from training.fl.local import evaluate
from training.models import (
    ClientUpdate,
    ClientUpdateStatus,
    Dataset,
    ExperimentStatus,
    RoundKind,
    StorageFormat,
    Task,
)
from workers import tasks

pytestmark = pytest.mark.django_db

CPU = torch.device("cpu")
CLASSES = ["background", "organ", "lesion"]
FOREGROUND_METRICS = {"loss", "dice", "dice_per_class", "hd95", "num_samples"}


@pytest.fixture
def organs(dataset_root):
    """Two sites x 5 volumes of 16 x 32 x 32 voxels (z, y, x), a quarter of each site's
    kept for its validation."""
    path = generate_segmentation_dataset(
        dataset_root / "organs", dims=3, sites=2, per_site=5, size=32, depth=16, seed=0
    )
    return Dataset.objects.create(
        name="organs", owner=UserFactory(), task=Task.SEGMENTATION,
        storage_format=StorageFormat.MSD, num_classes=3, class_names=CLASSES, channels=1,
        image_shape=[16, 32, 32], validation_fraction=0.25, path=str(path),
    )  # fmt: skip


def run_to_the_end(experiment):
    services.start_experiment(experiment.pk)
    experiment.refresh_from_db()
    while not experiment.is_terminal:
        fl_round = experiment.rounds.get(number=experiment.current_round)
        for update in fl_round.client_updates.all():
            tasks.train_client(update.pk, update.round_id, update.site_id)
        if fl_round.kind == RoundKind.TRAIN:
            assert tasks.aggregate_round(fl_round.pk) == "completed"
        experiment.refresh_from_db()
    return experiment


def test_a_segmentation_experiment_trains_and_evaluates_rounds_through_the_client_path(
    organs,
):
    # Given a U-Net experiment on 16-voxel patches over the two sites
    experiment = new_experiment(
        organs, num_rounds=2, clients_per_round=2, min_clients=2, network="unet",
        network_params={"channels": [8, 16, 32], "strides": [2, 2]},
        patch_size=[16, 16, 16], local_epochs=1,
    )  # fmt: skip
    experiment.batch_size, experiment.learning_rate, experiment.optimizer = 2, 0.01, "adam"
    experiment.save(update_fields=["batch_size", "learning_rate", "optimizer"])

    # When it runs to its end, task by task
    experiment = run_to_the_end(experiment)

    # Then it completed, each training round with the clients' training Dice and the
    # global model's Dice per class and HD95 on the server's held-out volumes
    assert experiment.status == ExperimentStatus.COMPLETED, experiment.failure_reason
    rounds = list(experiment.rounds.filter(kind=RoundKind.TRAIN).order_by("number"))
    assert len(rounds) == 2
    for fl_round in rounds:
        assert "dice" in fl_round.metrics["clients"]
        assert "accuracy" not in fl_round.metrics["clients"]
        held_out = fl_round.metrics["global"]
        assert set(held_out) >= FOREGROUND_METRICS
        assert len(held_out["dice_per_class"]) == 2
        # And each site evaluated the round's starting model on its validation volumes
        weighted = fl_round.federated_evaluation["weighted"]
        assert weighted["num_samples"] >= 2
        assert weighted["dice"] is not None and len(weighted["dice_per_class"]) == 2
    updates = ClientUpdate.objects.filter(round__in=rounds)
    assert {update.status for update in updates} == {ClientUpdateStatus.SUCCEEDED}
    assert all("dice" in update.metrics for update in updates)
    # And the recorded held-out evaluation is the final checkpoint's, by sliding window
    last = rounds[-1]
    network = federation.network_with_weights(
        experiment,
        modelstore.load_stored_weights(last.checkpoint.file.name, last.checkpoint.sha256),
    )
    holdout = federation.evaluation_data(experiment)
    expected = evaluate(
        network, holdout.dataset, holdout.indices, batch_size=2, patch_size=(16, 16, 16),
        device=CPU,
    )  # fmt: skip
    assert last.metrics["global"]["dice_per_class"] == pytest.approx(expected["dice_per_class"])
    assert last.metrics["global"]["hd95"] == pytest.approx(expected["hd95"])
    # And the cross-site round evaluated every site's model with Dice
    cross_site = experiment.rounds.get(kind=RoundKind.EVALUATE)
    for update in cross_site.client_updates.all():
        assert update.status == ClientUpdateStatus.SUCCEEDED, update.error
        assert all("dice" in metrics for metrics in update.evaluation.values())
