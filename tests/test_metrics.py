"""The downstream metrics (scikit-learn behind one-line wrappers) against references written out
by hand here, and the official per-batch aggregation."""

import numpy as np
import pytest

from caco_jax.evaluators import metrics


def reference_average_precision(targets, scores) -> float:
    """AP by its definition: the sum over distinct score thresholds, highest first, of the recall
    gained there times the precision there."""
    targets = np.ravel(targets).astype(float)
    scores = np.ravel(scores).astype(float)
    total = 0.0
    previous_recall = 0.0
    for threshold in sorted(set(scores.tolist()), reverse=True):
        chosen = scores >= threshold
        true_positives = targets[chosen].sum()
        recall = true_positives / targets.sum()
        total += (recall - previous_recall) * true_positives / chosen.sum()
        previous_recall = recall
    return total


def test_top1_accuracy_is_the_share_of_rows_whose_highest_logit_is_the_label():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert metrics.top1_accuracy(logits, np.array([1, 0, 0, 0])) == 0.75


def test_micro_and_macro_average_precision_follow_the_definition_including_ties():
    rng = np.random.default_rng(2)
    targets = rng.integers(0, 2, size=(40, 5))
    targets[:, 4] = 0  # a class without positives: no AP, left out of the macro mean
    scores = np.round(rng.random((40, 5)) + 0.3 * targets, 1)  # many tied scores
    assert metrics.micro_average_precision(targets, scores) == pytest.approx(
        reference_average_precision(targets, scores), abs=1e-12
    )
    per_class = [reference_average_precision(targets[:, c], scores[:, c]) for c in range(4)]
    assert metrics.macro_average_precision(targets, scores) == pytest.approx(np.mean(per_class))


def test_binary_scores_from_counts_and_zero_where_undefined():
    predicted = np.array([1, 1, 1, 0, 0, 0, 1], bool)
    actual = np.array([1, 1, 0, 1, 0, 0, 0], np.uint8)
    # tp 2, fp 2, fn 1
    assert metrics.binary_scores(predicted, actual) == pytest.approx(
        {"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7}
    )
    nothing = np.zeros(6, bool)
    assert metrics.binary_scores(nothing, nothing) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    # No change anywhere but one predicted: precision 0, recall undefined, F1 undefined -> 0.
    assert metrics.binary_scores(np.eye(1, 6, 2, dtype=bool)[0], nothing)["f1"] == 0.0


def test_confusion_matrix_skips_ignored_targets():
    confusion = metrics.confusion_matrix(
        np.array([0, 1, 1, 1, 0, 2]), np.array([0, 0, 1, 1, 2, 255]), 4
    )
    np.testing.assert_array_equal(
        confusion, [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    )


def test_batch_mean_averages_full_batches_in_the_given_order_and_drops_the_rest():
    values = np.arange(7.0)

    def mean(batch):
        return {"mean": float(batch.mean())}

    # Batches (0, 1, 2), (3, 4, 5); 6 dropped: the mean of 1 and 4.
    assert metrics.batch_mean(mean, (values,), 3) == {"mean": 2.5}
    # In the order (6, 5, 4), (3, 2, 1); 0 dropped: the mean of 5 and 2.
    assert metrics.batch_mean(mean, (values,), 3, order=np.arange(7)[::-1]) == {"mean": 3.5}
    with pytest.raises(ValueError, match="7 evaluation examples, fewer than one batch of 8"):
        metrics.batch_mean(mean, (values,), 8)
