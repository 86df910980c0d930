"""Segmentation in the engine: FedLens's Dice and HD95 are MONAI's, local training on
patches learns and repeats for a seed, sliding-window evaluation and predict_mask give
full-size label maps, and the client protocol trains and evaluates segmentation models."""

import json

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot
from torch.utils.data import Dataset

from tests.fl.connections import RecordingConnection
from training.fl.client import (
    ClientTask,
    DataSpec,
    NetworkSpec,
    TaskFormatError,
    run_client_task,
)
from training.fl.evaluation import weighted_metrics
from training.fl.local import DpSgd, TrainConfig, evaluate, train_local
from training.fl.metrics import segmentation_metrics
from training.fl.networks import build_network
from training.fl.segmentation import predict_mask
from training.fl.simulation import run_simulation

CPU = torch.device("cpu")


class BlobSegmentation(Dataset):
    """What the contract's SegmentationDataset gives: ``(image [1, *spatial] float32, mask
    [1, *spatial] int64)`` with a box of class 1 and a smaller box of class 2 per image,
    brighter than the noisy background."""

    task = "segmentation"
    num_classes = 3
    class_names = ["background", "organ", "lesion"]

    def __init__(self, count: int, shape: tuple[int, ...], *, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.samples = []
        for _ in range(count):
            mask = np.zeros(shape, dtype=np.int64)
            organ = tuple(
                slice(start := int(rng.integers(1, size // 2)), start + size // 3) for size in shape
            )
            mask[organ] = 1
            lesion = tuple(
                slice(start := int(rng.integers(1, size - size // 5)), start + size // 6)
                for size in shape
            )
            mask[lesion] = 2
            image = mask * 1.0 + rng.normal(0.0, 0.3, shape)
            self.samples.append(
                (torch.tensor(image, dtype=torch.float32)[None], torch.tensor(mask)[None])
            )
        self.labels = np.array([1] * count, dtype=np.int64)
        self.sites = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.samples[index]

    def spacing(self, index: int) -> tuple[float, ...]:
        return (2.0,) + (1.0,) * (self.samples[index][0].ndim - 2)


def a_unet(spatial_dims: int, seed: int = 0) -> torch.nn.Module:
    return build_network(
        "unet", in_channels=1, num_classes=3, spatial_dims=spatial_dims, seed=seed,
        channels=[8, 16, 32], strides=[2, 2],
    )  # fmt: skip


def random_masks(shape, seed: int) -> torch.Tensor:
    """Label maps with boxes of classes 1 and 2 at random places."""
    generator = np.random.default_rng(seed)
    masks = np.zeros(shape, dtype=np.int64)
    for sample in masks:
        for label, size in ((1, 8), (2, 4)):
            corner = [int(generator.integers(0, extent - size)) for extent in sample.shape]
            sample[tuple(slice(c, c + size) for c in corner)] = label
    return torch.from_numpy(masks)


@pytest.mark.parametrize(
    ("shape", "spacing"), [((3, 24, 24), [0.5, 2.0]), ((2, 12, 16, 16), [3.0, 1.0, 1.0])]
)
def test_dice_and_hd95_equal_monais_computed_directly_on_the_same_masks(shape, spacing) -> None:
    # Given predicted and true label maps in which every class occurs in both
    predicted, truth = random_masks(shape, seed=1), random_masks(shape, seed=2)

    # When FedLens scores them, and MONAI's metrics do on their one-hot forms
    ours = segmentation_metrics(predicted, truth, num_classes=3, spacing=spacing)
    as_one_hot = [one_hot(masks[:, None], 3) for masks in (predicted, truth)]
    dice_metric = DiceMetric(include_background=False, reduction="mean_batch")
    dice_metric(*as_one_hot)
    dice = dice_metric.aggregate()
    hd95_metric = HausdorffDistanceMetric(
        include_background=False, percentile=95, reduction="mean_batch"
    )
    hd95_metric(*as_one_hot, spacing=spacing)
    hd95 = hd95_metric.aggregate()

    # Then they agree class by class and on the mean over the foreground classes
    assert ours["dice_per_class"] == pytest.approx(dice.tolist(), abs=1e-6)
    assert ours["hd95_per_class"] == pytest.approx(hd95.tolist(), abs=1e-5)
    assert ours["dice"] == pytest.approx(float(dice.mean()), abs=1e-6)
    assert ours["hd95"] == pytest.approx(float(hd95.mean()), abs=1e-5)
    assert ours["num_samples"] == shape[0]


def test_a_class_in_neither_mask_is_skipped_and_in_one_mask_scores_zero_and_the_diagonal() -> None:
    # Given a sample without class 2 anywhere, and one where only the truth has class 2
    truth = torch.zeros(2, 10, 20, dtype=torch.long)
    truth[:, 2:6, 2:6] = 1
    truth[1, 8:10, 15:20] = 2
    predicted = truth.clone()
    predicted[1, 8:10, 15:20] = 0

    metrics = segmentation_metrics(predicted, truth, num_classes=4, spacing=[2.0, 1.0])

    # Then class 1 is perfect; class 2 counts only where it occurs (Dice 0, HD95 the image's
    # diagonal in mm); class 3, absent everywhere, is None and left out of the means
    diagonal = float(np.hypot(10 * 2.0, 20 * 1.0))
    assert metrics["dice_per_class"] == [1.0, 0.0, None]
    assert metrics["hd95_per_class"] == pytest.approx([0.0, diagonal, None])
    assert metrics["dice"] == pytest.approx(0.5)
    assert json.dumps(metrics)  # plain JSON, no NaN


@pytest.mark.parametrize(
    ("shape", "patch_size"),
    # Whole images of sizes off the network's multiple of 4 are padded.
    [((48, 48), (32, 32)), ((16, 32, 32), (16, 16, 16)), ((30, 42), ())],
)
def test_a_few_epochs_of_training_reduce_the_loss(shape, patch_size) -> None:
    # Given a U-Net and a few images with organs and lesions
    data = BlobSegmentation(6, shape)
    model = a_unet(len(shape))
    before = evaluate(model, data, batch_size=3, patch_size=patch_size, device=CPU)

    # When it trains for a few epochs on random patches (or whole images)
    config = TrainConfig(epochs=4, batch_size=3, lr=0.01, optimizer="adam", seed=3,
                         patch_size=patch_size)  # fmt: skip
    result = train_local(model, data, range(6), config, device=CPU)

    # Then the DiceCE loss over the whole images fell and Dice rose
    after = evaluate(model, data, batch_size=3, patch_size=patch_size, device=CPU)
    assert after["loss"] < before["loss"]
    assert after["dice"] > before["dice"]
    assert result.steps == 8 and result.accuracy is None
    assert 0.0 <= result.dice <= 1.0


def test_patch_training_feeds_the_network_label_balanced_patches_of_the_patch_size() -> None:
    # Given images whose foreground is one small box (about 1% of the image)
    data = BlobSegmentation(10, (64, 64))
    for image, mask in data.samples:
        mask.zero_()
        mask[0, 40:46, 50:56] = 1
        image.copy_(mask)  # noise-free: a patch holds foreground where it is bright
    model = a_unet(2)
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))

    # When it trains two epochs on 16x16 patches, one image at a time
    config = TrainConfig(epochs=2, batch_size=1, lr=0.01, seed=0, patch_size=(16, 16))
    train_local(model, data, range(10), config, device=CPU)

    # Then every input is one 16x16 patch, and over half of them hold foreground (half are
    # centred on it; a uniform crop would hold it in about 1 of 5)
    assert {tuple(batch.shape) for batch in seen} == {(1, 1, 16, 16)}
    with_foreground = sum(bool((batch > 0.5).any()) for batch in seen)
    assert with_foreground >= 9


def test_training_repeats_bit_for_bit_for_a_seed_on_the_cpu() -> None:
    data = BlobSegmentation(4, (32, 32))
    config = TrainConfig(epochs=2, batch_size=2, lr=0.01, seed=5, patch_size=(16, 16))

    def trained(seed: int) -> dict[str, torch.Tensor]:
        model = a_unet(2)
        train_local(model, data, range(4), TrainConfig(**{**config.__dict__, "seed": seed}),
                    device=CPU)  # fmt: skip
        return model.state_dict()

    first, again, other = trained(5), trained(5), trained(6)

    assert all(torch.equal(first[name], again[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)


@pytest.mark.parametrize("patch_size", [(16, 16, 16), ()])
def test_evaluation_and_predict_mask_cover_images_of_any_size(patch_size) -> None:
    # Given volumes whose sizes are no multiple of the network's 4
    data = BlobSegmentation(2, (18, 22, 30))
    model = a_unet(3)

    # When evaluated (by sliding window with a patch size, else whole) and asked for masks
    metrics = evaluate(model, data, batch_size=2, patch_size=patch_size, device=CPU)
    mask = predict_mask(model, data[0][0], patch_size=patch_size, device=CPU)

    # Then the metrics cover both volumes and the mask has the volume's shape and classes
    assert metrics["num_samples"] == 2
    assert {"loss", "dice", "dice_per_class", "hd95", "hd95_per_class"} <= set(metrics)
    assert len(metrics["dice_per_class"]) == 2
    assert mask.shape == (18, 22, 30) and mask.dtype == torch.int64
    assert int(mask.min()) >= 0 and int(mask.max()) <= 2


def test_evaluation_measures_hd95_in_the_datasets_millimetres() -> None:
    data = BlobSegmentation(2, (16, 16, 16))
    model = a_unet(3)
    predictions = torch.stack([predict_mask(model, image, device=CPU) for image, _ in data])
    masks = torch.stack([mask[0] for _, mask in data])

    metrics = evaluate(model, data, batch_size=2, device=CPU)

    expected = segmentation_metrics(predictions, masks, num_classes=3, spacing=[2.0, 1.0, 1.0])
    assert metrics["hd95"] == pytest.approx(expected["hd95"])
    assert metrics["dice_per_class"] == pytest.approx(expected["dice_per_class"])


def test_local_dp_sgd_is_refused_for_segmentation() -> None:
    data = BlobSegmentation(2, (16, 16))
    with pytest.raises(ValueError, match="use client-level DP"):
        train_local(a_unet(2), data, range(2), TrainConfig(), device=CPU,
                    dp_sgd=DpSgd(noise_multiplier=1.0, max_grad_norm=1.0))  # fmt: skip


def test_fedprox_keeps_segmentation_weights_nearer_the_start() -> None:
    data = BlobSegmentation(4, (32, 32))
    config = TrainConfig(epochs=2, batch_size=2, lr=0.05, seed=1, patch_size=(16, 16))
    start = a_unet(2).state_dict()

    def moved(mu: float) -> float:
        model = a_unet(2)
        train_local(model, data, range(4), config, device=CPU, proximal_mu=mu)
        trained = model.state_dict()
        return sum(float((trained[n] - start[n]).float().norm() ** 2) for n in start) ** 0.5

    assert moved(50.0) < moved(0.0)


def a_segmentation_task(**change) -> ClientTask:
    fields = {
        "client_update": 1, "round_id": 1, "round_number": 1, "experiment": 1,
        "site": "st-mary", "kind": "train",
        "network": NetworkSpec(name="unet", in_channels=1, num_classes=3, spatial_dims=3,
                               params={"channels": [8, 16, 32], "strides": [2, 2]}),
        "data": DataSpec(name="organs", num_classes=3, class_names=BlobSegmentation.class_names,
                         channels=1, image_shape=[16, 32, 32], validation_fraction=0.25,
                         task="segmentation"),
        "train": TrainConfig(epochs=1, batch_size=2, lr=0.01, seed=2, patch_size=(16, 16, 16)),
        "start_epoch": 0, "options": {}, "weights_sha256": "ab" * 32,
        **change,
    }  # fmt: skip
    # Through its wire form, as a site agent receives it.
    return ClientTask.from_json(json.loads(json.dumps(ClientTask(**fields).to_json())))


def a_network(task: ClientTask) -> torch.nn.Module:
    spec = task.network
    return build_network(spec.name, in_channels=spec.in_channels, num_classes=spec.num_classes,
                         spatial_dims=spec.spatial_dims, **spec.params)  # fmt: skip


def test_a_client_trains_a_segmentation_round_and_reports_dice_on_its_validation_share() -> None:
    # Given a site with 8 volumes, a quarter kept for validation
    data = BlobSegmentation(8, (16, 32, 32))
    task = a_segmentation_task()
    assert task.train.patch_size == (16, 16, 16)
    shared = a_network(task).state_dict()
    connection = RecordingConnection(shared)

    # When it runs the round's training task
    counted = run_client_task(
        task, connection, local_data=lambda task: (data, range(8)), network=a_network
    )

    # Then it sends trained weights, training Dice (not accuracy), and the starting model's
    # Dice and HD95 on its 2 validation volumes
    assert counted and not connection.failures
    ((trained, report),) = connection.updates
    assert report.num_samples == 6
    assert {"loss", "dice", "update_norm"} <= set(report.metrics)
    assert "accuracy" not in report.metrics
    assert report.evaluation["num_samples"] == 2
    assert {"loss", "dice", "dice_per_class", "hd95"} <= set(report.evaluation)
    assert any(not torch.equal(trained[name], shared[name]) for name in shared)


def test_a_client_evaluates_segmentation_models_in_the_cross_site_round() -> None:
    data = BlobSegmentation(8, (16, 32, 32))
    task = a_segmentation_task(kind="evaluate", options={"models": ["global", "st-anne"]})
    weights = a_network(task).state_dict()
    connection = RecordingConnection({}, models={"global": weights, "st-anne": weights})

    run_client_task(task, connection, local_data=lambda task: (data, range(8)), network=a_network)

    assert not connection.failures
    (report,) = connection.evaluations
    assert report.evaluation["global"]["dice"] == report.evaluation["st-anne"]["dice"]
    assert len(report.evaluation["global"]["dice_per_class"]) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"options": {"dp_sgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}},
         "local DP-SGD is not available for segmentation"),
        ({"network": NetworkSpec(name="cnn3d-small", in_channels=1, num_classes=3,
                                 spatial_dims=3)},
         "network 'cnn3d-small' does classification"),
    ],
)  # fmt: skip
def test_what_a_segmentation_client_cannot_do_fails_before_any_work(change, message) -> None:
    connection = RecordingConnection({})
    task = a_segmentation_task(**change)

    with pytest.raises(TaskFormatError, match=message):
        task.check_supported()
    run_client_task(
        task, connection, local_data=lambda task: pytest.fail("no data may be read"),
        network=a_network,
    )  # fmt: skip
    assert connection.fetched == 0 and message in connection.failures[0]


def test_a_site_whose_data_is_for_classification_refuses_a_segmentation_task() -> None:
    class Labelled(BlobSegmentation):
        task = "classification"

    connection = RecordingConnection(a_network(a_segmentation_task()).state_dict())

    run_client_task(
        a_segmentation_task(), connection,
        local_data=lambda task: (Labelled(4, (16, 32, 32)), range(4)), network=a_network,
    )  # fmt: skip

    assert (
        "is a classification dataset, but the experiment is for segmentation"
        in (connection.failures[0])
    )


def test_federated_evaluation_weights_dice_per_class_by_each_sites_samples() -> None:
    combined = weighted_metrics({
        "a": {"num_samples": 1, "dice": 0.2, "hd95": 4.0, "dice_per_class": [0.2, None]},
        "b": {"num_samples": 3, "dice": 0.6, "hd95": 8.0, "dice_per_class": [0.6, 0.5]},
    })  # fmt: skip

    assert combined["dice"] == pytest.approx(0.5)
    assert combined["hd95"] == pytest.approx(7.0)
    assert combined["dice_per_class"] == pytest.approx([0.5, 0.5])


def test_a_simulated_segmentation_federation_reports_dice_each_round() -> None:
    data = BlobSegmentation(6, (16, 32, 32))
    config = TrainConfig(epochs=1, batch_size=2, lr=0.01, optimizer="adam", seed=0,
                         patch_size=(16, 16, 16))  # fmt: skip

    result = run_simulation(
        model=a_unet(3), dataset=data, partitions=[[0, 1], [2, 3]], rounds=2, config=config,
        eval_dataset=data, eval_indices=[4, 5], eval_batch_size=2, device=CPU,
    )  # fmt: skip

    assert [summary.failures for summary in result.rounds] == [{}, {}]
    for summary in result.rounds:
        assert "dice" in summary.train_metrics and "accuracy" not in summary.train_metrics
        assert summary.eval_metrics["num_samples"] == 2
        assert len(summary.eval_metrics["dice_per_class"]) == 2
