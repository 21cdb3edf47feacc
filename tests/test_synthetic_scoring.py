"""The `score_change` task: change labels of a CACo run against the synthetic ground truth."""

from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest

from caco_jax import config as config_lib
from caco_jax.evaluators import change_scoring as scoring
from caco_jax.pretrain.change_report import LABEL_COLUMNS
from caco_jax.sources.synthetic import ground_truth

COLUMNS = LABEL_COLUMNS  # labels.csv as pretraining writes it


def _write_labels(workdir, items):
    """items: (location_id, seen, r, changed) per item, two per location in window order."""
    os.makedirs(os.path.join(workdir, "change"), exist_ok=True)
    with open(os.path.join(workdir, "change", "labels.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for item, (location_id, seen, r, changed) in enumerate(items):
            location = item // 2
            row = (item, location, location_id, 48.1, 11.5, item % 2, seen, 0.3, 0.2, r, changed)
            writer.writerow(row)


def _write_truth(workdir, changed):
    folder = os.path.join(workdir, "synthetic_archive")
    os.makedirs(folder, exist_ok=True)
    rows = [
        ground_truth.GroundTruth(f"{i:06d}", c, "new_built_up" if c else ground_truth.NO_CHANGE, 1)
        for i, c in enumerate(changed)
    ]
    ground_truth.write_ground_truth(os.path.join(folder, ground_truth.ground_truth_name()), rows)


def _settings(**data):
    return config_lib.resolve(config_lib.for_tasks("score_change")).replace(data=data)


@pytest.mark.parametrize("size, decimals", [(7, 0), (50, 6), (400, 1), (1000, 2)])
def test_ratio_auc_is_the_share_of_pairs_ordered_right(size, decimals):
    rng = np.random.default_rng(size)
    changed = rng.random(size) < 0.3
    changed[:2] = (True, False)  # both kinds present
    # Changed locations tend to have higher ratios; rounding makes ties, which count half.
    ratios = np.round(rng.gamma(2.0, 1.0, size) + 0.8 * changed, decimals)
    assert np.unique(ratios).size < size or decimals == 6
    # The share of (changed, unchanged) pairs ordered right, ties counting half.
    pairs = ratios[changed][:, None] - ratios[~changed][None, :]
    expected = np.mean((pairs > 0) + 0.5 * (pairs == 0))
    assert scoring.ratio_auc(ratios, changed) == pytest.approx(expected, abs=1e-12)


def test_ratio_auc_extremes_and_bad_shapes():
    changed = np.array([True, True, False, False, False])
    assert scoring.ratio_auc(np.array([5.0, 4.0, 3.0, 2.0, 1.0]), changed) == 1.0
    assert scoring.ratio_auc(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), changed) == 0.0
    assert scoring.ratio_auc(np.ones(5), changed) == 0.5
    assert math.isnan(scoring.ratio_auc(np.ones(3), np.ones(3, bool)))  # no unchanged location
    with pytest.raises(ValueError, match="must be equal 1-D"):
        scoring.ratio_auc(np.ones(4), changed)


def test_agreement_chance_and_auc_of_a_hand_made_run(tmp_path, capsys):
    workdir = str(tmp_path)
    # Locations 0..6; 0 and 2 changed. 5 has no seen item and 6 no labels: neither is scored.
    _write_truth(workdir, [True, False, True, False, False, False, False])
    _write_labels(
        workdir,
        [
            ("000000", 1, 3.0, 1), ("000000", 1, 1.0, 0),  # labelled changed, mean r 2.0
            ("000001", 1, 0.5, 0), ("000001", 1, 1.5, 0),  # unchanged, 1.0
            ("000002", 1, 1.0, 0), ("000002", 0, 0.0, 0),  # unchanged (missed), 1.0
            ("000003", 1, 0.8, 0), ("000003", 1, 0.4, 0),  # unchanged, 0.6
            ("000004", 1, 1.0, 1), ("000004", 0, 9.0, 0),  # changed (false alarm), 1.0
            ("000005", 0, 7.0, 0), ("000005", 0, 7.0, 0),  # never seen
        ],
    )  # fmt: skip
    scores = scoring.run_task(_settings(), workdir)
    # Labels right at 0, 1 and 3 of 5 locations. Labelled changed rate 2/5, true rate 2/5:
    # chance = 0.4 * 0.4 + 0.6 * 0.6. Changed r (2.0, 1.0) against unchanged (1.0, 0.6, 1.0):
    # 2.0 beats all three, 1.0 beats 0.6 and ties twice, so 5 of 6 pairs.
    assert scores == {
        "change_agreement": pytest.approx(0.6),
        "change_agreement_chance": pytest.approx(0.52),
        "change_ratio_auc": pytest.approx(5 / 6),
        "change_locations": 5,
    }
    assert "(5 locations): agreement 0.60 (chance 0.52)" in capsys.readouterr().out


def test_nothing_to_score_is_an_empty_result_with_a_note(tmp_path, capsys):
    workdir = str(tmp_path)
    _write_labels(workdir, [("000000", 1, 1.0, 1), ("000000", 1, 1.0, 0)])
    assert scoring.run_task(_settings(), workdir) == {}  # a real archive: no ground truth
    assert "no synthetic ground truth" in capsys.readouterr().out
    os.remove(os.path.join(workdir, "change", "labels.csv"))
    _write_truth(workdir, [True, False])
    assert scoring.run_task(_settings(), workdir) == {}  # not a CACo run
    assert "no change labels" in capsys.readouterr().out


def test_the_ground_truth_is_read_from_data_archive(tmp_path):
    workdir = str(tmp_path)
    _write_truth(workdir, [True, False])
    _write_labels(
        workdir, [("000000", 1, 2.0, 1), ("000000", 1, 2.0, 1)] + [("000001", 1, 1.0, 0)] * 2
    )
    settings = _settings(archive=os.path.join(workdir, "synthetic_archive"))
    assert scoring.run_task(settings, workdir)["change_agreement"] == 1.0
    settings = _settings(archive=os.path.join(workdir, "elsewhere"))
    assert scoring.run_task(settings, workdir) == {}


@pytest.mark.parametrize(
    "items, message",
    [
        ([("000009", 1, 1.0, 1), ("000009", 1, 1.0, 1)], r"\['000009'\] are not in the synthetic"),
        ([("", 1, 1.0, 1), ("", 1, 1.0, 1)], "line 2: empty location_id"),
        ([("000000", 1, "nan", 1), ("000000", 1, 1.0, 1)], "line 2: r of a seen item"),
        ([("000000", 1, "x", 1), ("000000", 1, 1.0, 1)], "line 2: r of a seen item"),
        ([("000000", 1, 1.0, 1), ("000000", 2, 1.0, 1)], "line 3: seen must be 0 or 1"),
        ([("000000", 1, 1.0, 1), ("000000", 1, 1.0, "yes")], "line 3: changed must be 0 or 1"),
        ([("000000", 0, 1.0, 1), ("000000", 0, 1.0, 1)], "no item was seen"),
    ],
)
def test_bad_labels_are_named(tmp_path, items, message):
    workdir = str(tmp_path)
    _write_truth(workdir, [True, False])
    _write_labels(workdir, items)
    with pytest.raises(ValueError, match=rf"labels\.csv.*{message}"):
        scoring.run_task(_settings(), workdir)


def test_labels_without_a_needed_column_are_refused(tmp_path):
    workdir = str(tmp_path)
    _write_truth(workdir, [True, False])
    os.makedirs(tmp_path / "change")
    (tmp_path / "change" / "labels.csv").write_text(
        "item_id,location_id,seen,changed\n0,000000,1,1\n"
    )
    with pytest.raises(ValueError, match=r"no column\(s\) \['r'\]"):
        scoring.run_task(_settings(), workdir)
