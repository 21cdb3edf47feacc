"""Task `score_change`: how well the change labels of a CACo run match the synthetic ground truth.

Pretraining writes ``<workdir>/change/labels.csv`` (`pretrain.change_report`), one row per item
(a location in one window) with its running long-term / short-term distance ratio `r` and its
`changed` label. On the synthetic archive the true change of each location is known, so the labels
and the ratio can be scored against it:

- agreement: the share of locations whose label matches the truth. A location counts as labelled
  changed when either of its items is.
- chance: the agreement a labelling independent of the truth, with the same changed rate, would
  have on average: rate * prior + (1 - rate) * (1 - prior).
- ratio AUC: the probability that a changed location has a higher `r` (mean over its seen items)
  than an unchanged one, ties counting half, i.e. the ROC AUC of `r` as a change score; threshold
  free, 0.5 by chance.

Only locations with at least one seen item are scored.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os

import numpy as np
from sklearn.metrics import roc_auc_score

from caco_jax.runtime.workdir import Workdir
from caco_jax.sources.synthetic.ground_truth import (
    GroundTruth,
    ground_truth_path,
    read_ground_truth,
)

# The columns of labels.csv read here (it has more, see caco_jax/pretrain/change_report.py).
LABEL_COLUMNS = ("location_id", "seen", "r", "changed")


@dataclasses.dataclass(frozen=True)
class LocationLabel:
    """A location's labels in labels.csv, its two items combined."""

    changed: bool  # either item labelled changed
    ratios: tuple[float, ...]  # r of each seen item


def run_task(settings, workdir) -> dict:
    """Scores ``<workdir>/change/labels.csv`` against the ground truth of the synthetic archive in
    ``config.data.archive`` (or ``<workdir>/synthetic_archive``); prints and returns the scores.

    Returns {} with a note when there is no ground truth (a real archive) or no labels.csv (the run
    was not CACo, or has not reached an epoch end).
    """
    truth_path = ground_truth_path(settings.data.archive_dir(workdir))
    labels_path = Workdir.of(workdir).change_labels
    if not os.path.exists(truth_path):
        print(f"score_change: no synthetic ground truth {truth_path} (a real archive): not scored")
        return {}
    if not os.path.exists(labels_path):
        print(f"score_change: no change labels {labels_path} (written by CACo pretraining)")
        return {}
    scores = score(read_ground_truth(truth_path), read_labels(labels_path), labels_path)
    print(
        f"change labels vs the synthetic ground truth ({scores['change_locations']} locations): "
        f"agreement {scores['change_agreement']:.2f} (chance "
        f"{scores['change_agreement_chance']:.2f}); P(r of a changed location > r of an unchanged "
        f"one) {scores['change_ratio_auc']:.2f} (chance 0.50)",
        flush=True,
    )
    return scores


def read_labels(path: str) -> dict[str, LocationLabel]:
    """{location_id: its label} from a labels.csv. Raises ValueError naming the file and line for a
    missing column, an empty location id, a `seen` or `changed` other than 0/1 or a seen item whose
    `r` is not a finite number."""
    changed: dict[str, bool] = {}
    ratios: dict[str, list[float]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in LABEL_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing}; expected at least {LABEL_COLUMNS}")
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            location = row["location_id"]
            if not location:
                raise ValueError(f"{where}: empty location_id (the run did not know the ids)")
            for column in ("seen", "changed"):
                if row[column] not in ("0", "1"):
                    raise ValueError(f"{where}: {column} must be 0 or 1, got {row[column]!r}")
            changed[location] = changed.get(location, False) or row["changed"] == "1"
            ratios.setdefault(location, [])
            if row["seen"] == "1":
                ratios[location].append(_finite(row["r"], where))
    return {k: LocationLabel(changed[k], tuple(ratios[k])) for k in changed}


def _finite(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{where}: r of a seen item must be a finite number, got {text!r}")
    return value


def score(truth: list[GroundTruth], labels: dict[str, LocationLabel], labels_path: str) -> dict:
    """The agreement, chance agreement and ratio AUC over the locations with a seen item.

    Raises ValueError when `labels` names a location the ground truth lacks (labels of another
    archive) or no location has a seen item.
    """
    truth_by_id = {row.location_id: row.changed for row in truth}
    unknown = sorted(set(labels) - set(truth_by_id))
    if unknown:
        raise ValueError(
            f"{labels_path}: locations {unknown[:5]} are not in the synthetic ground truth "
            "(labels of another archive?)"
        )
    scored = sorted(k for k, label in labels.items() if label.ratios)
    if not scored:
        raise ValueError(f"{labels_path}: no item was seen, nothing to score")
    actual = np.array([truth_by_id[k] for k in scored])
    predicted = np.array([labels[k].changed for k in scored])
    agreement, chance = label_agreement(predicted, actual)
    mean_ratios = np.array([np.mean(labels[k].ratios) for k in scored])
    return {
        "change_agreement": agreement,
        "change_agreement_chance": chance,
        "change_ratio_auc": ratio_auc(mean_ratios, actual),
        "change_locations": len(scored),
    }


def label_agreement(predicted: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    """(share of equal labels, the share expected of labels independent of the truth with the
    same changed rate)."""
    predicted, actual = np.asarray(predicted, bool), np.asarray(actual, bool)
    rate, prior = predicted.mean(), actual.mean()
    return float(np.mean(predicted == actual)), float(rate * prior + (1 - rate) * (1 - prior))


def ratio_auc(ratios: np.ndarray, changed: np.ndarray) -> float:
    """P(ratio of a changed location > that of an unchanged one), ties half: scikit-learn's ROC AUC
    of the ratio as a change score; NaN without both kinds of location."""
    ratios, changed = np.asarray(ratios, np.float64), np.asarray(changed, bool)
    if ratios.shape != changed.shape or ratios.ndim != 1:
        raise ValueError(f"ratios {ratios.shape} and changed {changed.shape} must be equal 1-D")
    if changed.all() or not changed.any():
        return float("nan")
    return float(roc_auc_score(changed, ratios))
