"""Evaluation at the sites: the seeded validation split and combining the sites' metrics."""

from pathlib import Path

import numpy as np
import pytest
import torch

from training.fl.data.datasets import ImageFolderDataset
from training.fl.evaluation import (
    cross_site_matrix,
    evaluate_model,
    validation_split,
    weighted_metrics,
)
from training.fl.metrics import classification_metrics
from training.fl.networks import build_network

CPU = torch.device("cpu")


def test_split_keeps_the_share_asked_for_and_loses_no_sample() -> None:
    indices = list(range(100, 150))
    training, validation = validation_split(indices, 0.2, "chest/site-a")
    assert len(validation) == 10
    assert sorted(training + validation) == indices
    assert not set(training) & set(validation)


def test_split_is_the_same_whatever_the_order_of_the_indices() -> None:
    # Given the same samples listed in two orders (as two partitions may list them)
    indices = list(range(40))
    shuffled = list(np.random.default_rng(7).permutation(indices))
    # Then the validation samples are the same, each list keeping its own order
    _, first = validation_split(indices, 0.25, "chest/site-a")
    training, second = validation_split(shuffled, 0.25, "chest/site-a")
    assert sorted(first) == sorted(second)
    assert second == [index for index in shuffled if index in set(first)]
    assert training == [index for index in shuffled if index not in set(first)]


def test_split_depends_on_the_seed_text() -> None:
    indices = range(200)
    _, site_a = validation_split(indices, 0.3, "chest/site-a")
    _, site_b = validation_split(indices, 0.3, "chest/site-b")
    assert site_a != site_b
    assert validation_split(indices, 0.3, "chest/site-a")[1] == site_a


@pytest.mark.parametrize(
    ("count", "fraction", "expected"),
    [(10, 0.0, 0), (1, 0.5, 0), (2, 0.01, 1), (3, 0.9, 2), (10, 0.25, 2)],
)
def test_split_sizes_keep_a_sample_on_each_side(count: int, fraction: float, expected: int) -> None:
    training, validation = validation_split(range(count), fraction, "d/s")
    assert len(validation) == expected
    assert len(training) == count - expected


@pytest.mark.parametrize("fraction", [-0.1, 1.0, float("nan")])
def test_split_refuses_a_fraction_outside_zero_to_one(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        validation_split(range(10), fraction, "d/s")


def test_split_refuses_repeated_indices() -> None:
    with pytest.raises(ValueError, match="distinct"):
        validation_split([1, 2, 2, 3], 0.5, "d/s")


def test_evaluate_model_is_the_metrics_of_the_models_predictions(
    small_synthetic_dir: Path,
) -> None:
    # Given a network and four samples of the synthetic set
    dataset = ImageFolderDataset(small_synthetic_dir)
    model = build_network("cnn-small", in_channels=1, num_classes=2, seed=3)
    indices = [0, 3, 5, 8]
    # When evaluate_model runs
    metrics = evaluate_model(model, dataset, indices, batch_size=3, device=CPU)
    # Then it equals the metrics computed here from the model's own probabilities
    model.eval()
    with torch.inference_mode():
        inputs = torch.stack([dataset[i][0] for i in indices])
        probabilities = torch.softmax(model(inputs).float(), dim=1).numpy()
    expected = classification_metrics(
        [dataset[i][1] for i in indices], probabilities, num_classes=2
    )
    assert metrics["num_samples"] == 4
    assert metrics["confusion_matrix"] == expected["confusion_matrix"]
    assert metrics["accuracy"] == expected["accuracy"]
    assert metrics["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_weighted_metrics_weigh_each_site_by_its_samples() -> None:
    by_site = {
        "a": {"num_samples": 30, "loss": 0.5, "accuracy": 0.9, "roc_auc": None,
              "confusion_matrix": [[10, 2], [1, 17]]},
        "b": {"num_samples": 10, "loss": 1.5, "accuracy": 0.5, "roc_auc": 0.7,
              "confusion_matrix": [[3, 2], [3, 2]]},
    }  # fmt: skip
    combined = weighted_metrics(by_site)
    assert combined["num_samples"] == 40
    assert combined["num_sites"] == 2
    assert combined["loss"] == pytest.approx((30 * 0.5 + 10 * 1.5) / 40)
    assert combined["accuracy"] == pytest.approx((30 * 0.9 + 10 * 0.5) / 40)
    assert combined["roc_auc"] == pytest.approx(0.7)  # only b reports one
    assert combined["balanced_accuracy"] is None
    assert combined["confusion_matrix"] == [[13, 4], [4, 19]]
    pooled = np.array(combined["confusion_matrix"])
    assert np.trace(pooled) / pooled.sum() == pytest.approx(combined["accuracy"])


def test_cross_site_matrix_has_a_row_per_model_and_a_column_per_site() -> None:
    evaluations = {
        "b": {
            "global": {"num_samples": 4, "accuracy": 0.5},
            "a": {"num_samples": 4, "accuracy": 0.25},
        },
        "a": {"global": {"num_samples": 6, "accuracy": 1.0}},
        "c": None,  # failed
    }
    matrix = cross_site_matrix(["global", "a", "b"], evaluations)
    assert matrix["models"] == ["global", "a", "b"]
    assert matrix["sites"] == ["a", "b", "c"]
    assert matrix["cells"]["global"] == {
        "a": {"num_samples": 6, "accuracy": 1.0},
        "b": {"num_samples": 4, "accuracy": 0.5},
        "c": None,
    }
    assert matrix["cells"]["a"]["b"] == {"num_samples": 4, "accuracy": 0.25}
    assert matrix["cells"]["b"] == {"a": None, "b": None, "c": None}
    assert matrix["weighted"]["global"]["accuracy"] == pytest.approx((6 * 1.0 + 4 * 0.5) / 10)
