"""The downstream metrics against scikit-learn on fixed inputs."""

import numpy as np
import pytest
from sklearn import metrics as skm

from caco_jax.evaluators import metrics


def test_top1_accuracy_matches_sklearn():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 10))
    labels = rng.integers(0, 10, size=50)
    expected = skm.accuracy_score(labels, logits.argmax(1))
    assert metrics.top1_accuracy(logits, labels) == pytest.approx(expected)


def test_average_precision_matches_sklearn_including_ties():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 2, size=200)
    scores = np.round(rng.random(200), 1)  # many tied scores
    expected = skm.average_precision_score(targets, scores)
    assert metrics.average_precision(targets, scores) == pytest.approx(expected, abs=1e-12)


def test_multilabel_average_precision_micro_and_macro_match_sklearn():
    rng = np.random.default_rng(2)
    targets = rng.integers(0, 2, size=(64, 19))
    targets[0] = 1  # every class has a positive
    scores = rng.random((64, 19)) + 0.5 * targets
    result = metrics.multilabel_average_precision(targets, scores)
    assert result["micro_ap"] == pytest.approx(
        skm.average_precision_score(targets, scores, average="micro")
    )
    assert result["macro_ap"] == pytest.approx(
        skm.average_precision_score(targets, scores, average="macro")
    )
    assert result["macro_ap_classes"] == 19


def test_macro_average_precision_skips_classes_without_positives():
    targets = np.array([[1, 0], [0, 0], [1, 0]])
    scores = np.array([[0.9, 0.1], [0.2, 0.5], [0.8, 0.3]])
    result = metrics.multilabel_average_precision(targets, scores)
    assert result["macro_ap_classes"] == 1
    assert result["macro_ap"] == pytest.approx(1.0)


def test_precision_recall_f1_match_sklearn_and_sum_over_images():
    rng = np.random.default_rng(3)
    images = [(rng.random((7, 9)), rng.integers(0, 2, size=(7, 9))) for _ in range(3)]
    counts = sum(metrics.binary_counts(p, t) for p, t in images)
    predicted = np.concatenate([(p >= 0.5).ravel() for p, _ in images])
    actual = np.concatenate([t.ravel() for _, t in images])
    result = metrics.precision_recall_f1(counts)
    assert result["precision"] == pytest.approx(skm.precision_score(actual, predicted))
    assert result["recall"] == pytest.approx(skm.recall_score(actual, predicted))
    assert result["f1"] == pytest.approx(skm.f1_score(actual, predicted))


def test_precision_recall_f1_are_zero_without_predicted_or_actual_positives():
    counts = metrics.binary_counts(np.zeros((4, 4)), np.zeros((4, 4)))
    assert metrics.precision_recall_f1(counts) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_shape_mismatches_are_errors():
    with pytest.raises(ValueError, match="targets"):
        metrics.average_precision(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="predictions"):
        metrics.binary_counts(np.ones((2, 2)), np.ones((2, 3)))
