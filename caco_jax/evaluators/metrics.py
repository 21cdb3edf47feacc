"""The downstream metrics of the paper's tables, through scikit-learn where it has them, and the two
ways a metric is aggregated over an evaluation set.

- pooled: computed once over the whole set (exact, independent of any batching).
- per batch (`batch_mean`): as the official scripts logged it: the metric of each batch of the
  validation loader (the last partial batch dropped, `drop_last=True`), averaged over the batches
  (Lightning's epoch mean, which with equal batches is the plain mean). This is the default
  number of each evaluator, the pooled one is reported beside it under its own name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn import metrics as skm


def top1_accuracy(logits, labels) -> float:
    """Share of rows whose highest logit is the label."""
    return float(skm.accuracy_score(np.asarray(labels), np.argmax(np.asarray(logits), axis=-1)))


def micro_average_precision(targets, scores) -> float:
    """Average precision of every (example, class) pair pooled: the paper's BigEarthNet number,
    `average_precision_score(..., average="micro")` as SeCo's `ssl_finetuner.py` calls it."""
    return float(skm.average_precision_score(targets, scores, average="micro"))


def macro_average_precision(targets, scores) -> float:
    """The mean of per-class APs over the classes with at least one positive (the others have no
    AP)."""
    present = np.asarray(targets).sum(axis=0) > 0
    return float(
        skm.average_precision_score(
            np.asarray(targets)[:, present], np.asarray(scores)[:, present], average="macro"
        )
    )


def binary_scores(predicted, actual) -> dict[str, float]:
    """Precision, recall and F1 of the positive class, 0 where undefined (Lightning 1.1's F1 maps
    its NaN to 0; its precision and recall add 1e-6 to the denominator)."""
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        np.ravel(actual).astype(np.uint8),
        np.ravel(predicted).astype(np.uint8),
        average="binary",
        zero_division=0,
    )
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def confusion_matrix(predictions, targets, num_classes: int) -> np.ndarray:
    """int64 [num_classes, num_classes] pixel counts, rows = target class, columns = predicted
    class; pixels whose target is outside [0, num_classes) (ignored pixels) are not counted.
    Matrices of many images are summed before `intersection_over_union`."""
    predictions, targets = np.ravel(predictions), np.ravel(targets)
    valid = (targets >= 0) & (targets < num_classes)
    return skm.confusion_matrix(
        targets[valid], predictions[valid], labels=np.arange(num_classes)
    ).astype(np.int64)


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


def batch_mean(
    metric: Callable[..., dict[str, float]],
    arrays: Sequence[np.ndarray],
    batch_size: int,
    order: np.ndarray | None = None,
) -> dict[str, float]:
    """The official aggregation: `metric(*batch)` of each full batch of `batch_size` consecutive
    examples of `arrays` (in `order`, default as given), the last partial batch dropped, each of
    its values averaged over the batches. Fewer examples than one batch is an error: the official
    loader yields no batch, and no number."""
    count = len(arrays[0])
    batches = count // batch_size
    if batches == 0:
        raise ValueError(
            f"{count} evaluation examples, fewer than one batch of {batch_size}: the official "
            "loader drops the last partial batch, so there is nothing to average"
        )
    order = np.arange(count) if order is None else np.asarray(order)
    values = [
        metric(*(array[order[b * batch_size : (b + 1) * batch_size]] for array in arrays))
        for b in range(batches)
    ]
    return {key: float(np.mean([v[key] for v in values])) for key in values[0]}
