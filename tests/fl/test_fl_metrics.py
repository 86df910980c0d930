"""Classification metrics against values worked out by hand."""

import json
import math

import numpy as np
import pytest

from training.fl.metrics import classification_metrics

# Five binary samples; the positive-class probabilities give predictions 0, 1, 1, 0, 1.
Y_TRUE = [0, 0, 1, 1, 1]
P_POSITIVE = [0.1, 0.6, 0.8, 0.4, 0.9]


def binary_probabilities(positive: list[float]) -> np.ndarray:
    p = np.array(positive)
    return np.stack([1 - p, p], axis=1)


def test_binary_metrics_match_hand_computed_values() -> None:
    metrics = classification_metrics(Y_TRUE, binary_probabilities(P_POSITIVE), num_classes=2)
    # Confusion matrix rows are true classes: TN=1 FP=1 / FN=1 TP=2.
    assert metrics["confusion_matrix"] == [[1, 1], [1, 2]]
    assert metrics["num_samples"] == 5
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["recall"] == pytest.approx([1 / 2, 2 / 3])
    assert metrics["precision"] == pytest.approx([1 / 2, 2 / 3])
    assert metrics["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert metrics["sensitivity"] == pytest.approx(2 / 3)
    assert metrics["specificity"] == pytest.approx(1 / 2)
    # 5 of the 6 (positive, negative) pairs are ranked correctly; only 0.4 < 0.6 is not.
    assert metrics["roc_auc"] == pytest.approx(5 / 6)
    true_class_probabilities = [0.9, 0.4, 0.8, 0.4, 0.9]
    expected_loss = -sum(math.log(p) for p in true_class_probabilities) / 5
    assert metrics["loss"] == pytest.approx(expected_loss)


def test_roc_curve_runs_from_origin_to_top_right() -> None:
    metrics = classification_metrics(Y_TRUE, binary_probabilities(P_POSITIVE), num_classes=2)
    curve = metrics["roc_curve"]
    assert (curve["fpr"][0], curve["tpr"][0]) == (0.0, 0.0)
    assert (curve["fpr"][-1], curve["tpr"][-1]) == (1.0, 1.0)
    assert curve["fpr"] == sorted(curve["fpr"])


def test_roc_curve_is_downsampled_to_at_most_101_points() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    scores = np.clip(labels * 0.2 + rng.uniform(0, 0.8, 2000), 0, 1)
    curve = classification_metrics(labels, binary_probabilities(list(scores)), num_classes=2)[
        "roc_curve"
    ]
    assert 50 < len(curve["fpr"]) <= 101
    assert len(curve["fpr"]) == len(curve["tpr"])
    assert (curve["fpr"][-1], curve["tpr"][-1]) == (1.0, 1.0)


def test_auc_is_none_when_only_one_class_is_present() -> None:
    metrics = classification_metrics(
        [1, 1, 1], binary_probabilities([0.2, 0.7, 0.9]), num_classes=2
    )
    assert metrics["roc_auc"] is None
    assert metrics["roc_curve"] is None
    assert metrics["sensitivity"] == pytest.approx(2 / 3)
    assert metrics["specificity"] == 0.0
    # Balanced accuracy averages only over classes that occur.
    assert metrics["balanced_accuracy"] == pytest.approx(2 / 3)


def test_multiclass_metrics_have_per_class_lists_and_no_binary_keys() -> None:
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    metrics = classification_metrics([0, 1, 2, 2], probabilities, num_classes=3)
    assert metrics["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert metrics["recall"] == pytest.approx([1.0, 1.0, 0.5])
    assert metrics["precision"] == pytest.approx([1.0, 0.5, 1.0])
    assert "roc_auc" not in metrics


def test_metrics_are_json_serialisable() -> None:
    metrics = classification_metrics(Y_TRUE, binary_probabilities(P_POSITIVE), num_classes=2)
    assert json.loads(json.dumps(metrics)) == metrics


@pytest.mark.parametrize(
    ("labels", "probabilities", "message"),
    [
        ([0, 1], np.full((3, 2), 0.5), "shape"),
        ([], np.zeros((0, 2)), "zero samples"),
        ([0, 2], np.full((2, 2), 0.5), "labels must lie"),
    ],
)
def test_inconsistent_inputs_are_rejected(
    labels: list[int], probabilities: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        classification_metrics(labels, probabilities, num_classes=2)


def test_counts_equal_scikit_learns_with_classes_never_predicted_or_present() -> None:
    from sklearn.metrics import confusion_matrix, precision_score, recall_score

    # Given 5 classes where class 3 is never a label and class 4 never predicted
    rng = np.random.default_rng(3)
    labels = rng.choice([0, 1, 2, 4], size=200)
    probabilities = rng.random((200, 5))
    probabilities[:, 4] = 0
    predictions = probabilities.argmax(axis=1)
    # When FedLens counts them
    metrics = classification_metrics(labels, probabilities, num_classes=5)
    # Then its matrix, precision and recall are scikit-learn's (0 where undefined)
    classes = list(range(5))
    assert (
        metrics["confusion_matrix"]
        == confusion_matrix(labels, predictions, labels=classes).tolist()
    )
    assert metrics["precision"] == pytest.approx(
        precision_score(labels, predictions, labels=classes, average=None, zero_division=0)
    )
    assert metrics["recall"] == pytest.approx(
        recall_score(labels, predictions, labels=classes, average=None, zero_division=0)
    )
