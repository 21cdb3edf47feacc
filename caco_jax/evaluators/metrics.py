"""The downstream metrics of the paper's tables, as small pure NumPy functions over a whole
evaluation set.

The official code logged these per batch and let Lightning average the batch values; computing them
once
over the whole set is exact and independent of the batch size (a documented difference).
"""

from __future__ import annotations

import numpy as np


def top1_accuracy(logits, labels) -> float:
    """Fraction of rows whose highest logit is the label."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"top1_accuracy: {logits.shape[0]} rows of logits, {labels.shape[0]} labels"
        )
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def average_precision(targets, scores) -> float:
    """Area under the precision-recall curve as sklearn's ``average_precision_score`` computes it:
    the sum over distinct score thresholds of (recall gain) x precision. 0.0 when there is no
    positive."""
    targets = np.asarray(targets).reshape(-1).astype(np.float64)
    scores = np.asarray(scores).reshape(-1).astype(np.float64)
    if targets.shape != scores.shape:
        raise ValueError(f"average_precision: {targets.shape} targets, {scores.shape} scores")
    num_positive = targets.sum()
    if num_positive == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    targets, scores = targets[order], scores[order]
    # The last index of each run of equal scores: one point of the curve per distinct threshold.
    threshold_ends = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    true_positives = np.cumsum(targets)[threshold_ends]
    predicted_positives = threshold_ends + 1.0
    precision = true_positives / predicted_positives
    recall = true_positives / num_positive
    recall_gain = np.diff(np.r_[0.0, recall])
    return float(np.sum(recall_gain * precision))


def multilabel_average_precision(targets, scores) -> dict[str, float]:
    """Micro AP (all (example, class) pairs pooled: the paper's BigEarthNet number) and macro AP
    (the mean of per-class APs over the classes that have at least one positive; how many is
    reported)."""
    targets = np.asarray(targets)
    scores = np.asarray(scores)
    if targets.ndim != 2 or targets.shape != scores.shape:
        raise ValueError(
            f"multilabel AP: targets {targets.shape} and scores {scores.shape} must be [N, C]"
        )
    present = np.flatnonzero(targets.sum(axis=0) > 0)
    per_class = [average_precision(targets[:, c], scores[:, c]) for c in present]
    return {
        "micro_ap": average_precision(targets, scores),
        "macro_ap": float(np.mean(per_class)) if per_class else 0.0,
        "macro_ap_classes": len(per_class),
    }


def binary_counts(probabilities, targets, threshold: float = 0.5) -> np.ndarray:
    """(true positives, false positives, false negatives) of ``probabilities >= threshold``, int64,
    so that counts of many images can be summed before the ratios are taken."""
    predicted = np.asarray(probabilities) >= threshold
    actual = np.asarray(targets).astype(bool)
    if predicted.shape != actual.shape:
        raise ValueError(f"binary_counts: predictions {predicted.shape} vs targets {actual.shape}")
    return np.array(
        [np.sum(predicted & actual), np.sum(predicted & ~actual), np.sum(~predicted & actual)],
        dtype=np.int64,
    )


def precision_recall_f1(counts) -> dict[str, float]:
    """Precision, recall and F1 of the positive class from summed ``binary_counts``; 0 where
    undefined."""
    true_positives, false_positives, false_negatives = (int(c) for c in counts)
    precision = _ratio(true_positives, true_positives + false_positives)
    recall = _ratio(true_positives, true_positives + false_negatives)
    f1 = _ratio(2 * true_positives, 2 * true_positives + false_positives + false_negatives)
    return {"precision": precision, "recall": recall, "f1": f1}


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def confusion_matrix(predictions, targets, num_classes: int) -> np.ndarray:
    """int64 [num_classes, num_classes] pixel counts, rows = target class, columns = predicted
    class; target values outside [0, num_classes) (ignored pixels) are not counted. Matrices of
    many images are summed before `intersection_over_union`."""
    predictions = np.asarray(predictions).reshape(-1).astype(np.int64)
    targets = np.asarray(targets).reshape(-1).astype(np.int64)
    if predictions.shape != targets.shape:
        raise ValueError(
            f"confusion_matrix: {predictions.size} predictions, {targets.size} targets"
        )
    if predictions.size and (predictions.min() < 0 or predictions.max() >= num_classes):
        raise ValueError(f"confusion_matrix: predictions outside [0, {num_classes})")
    valid = (targets >= 0) & (targets < num_classes)
    pairs = targets[valid] * num_classes + predictions[valid]
    counts = np.bincount(pairs, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def intersection_over_union(confusion) -> dict:
    """Per-class IoU = TP / (TP + FP + FN) from a summed `confusion_matrix`, and mIoU = their mean
    over the classes whose union is not empty (DynamicEarthNet's own `jaccard_index.py`: a class
    neither present nor predicted anywhere has no IoU and is left out; its IoU is None)."""
    confusion = np.asarray(confusion, np.int64)
    intersections = np.diag(confusion)
    unions = confusion.sum(axis=0) + confusion.sum(axis=1) - intersections
    per_class = [int(i) / int(u) if u else None for i, u in zip(intersections, unions, strict=True)]
    defined = [v for v in per_class if v is not None]
    return {"miou": float(np.mean(defined)) if defined else 0.0, "iou": per_class}
