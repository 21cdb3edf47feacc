"""Evaluations during pretraining (`config.evals`): the kNN classifier against a direct NumPy
computation, the settings and the schedule, and tiny runs: training bit-identical with and without
evals (EuroSAT read from `manual_dir` in its download layout, the synthetic land cover and change),
and a resumed run that reruns the evaluations after its checkpoint without duplicate lines."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from downloads import (
    bigearthnet_patches,
    write_bigearthnet,
    write_bigearthnet_lists,
    write_eurosat_lists,
    write_eurosat_rgb_zip,
)
from helpers import fake_source, tiny_config

from caco_jax import config as config_lib
from caco_jax.data.normalization import Normalization
from caco_jax.evaluators import common, online
from caco_jax.pretrain import evals, train
from caco_jax.runtime import checkpointing, inference
from caco_jax.runtime import mesh as mesh_lib
from caco_jax.settings import SettingsError
from caco_jax.sources.synthetic.ground_truth import (
    GroundTruth,
    ground_truth_path,
    write_ground_truth,
)

# --------------------------------------------------------------------------------------------------
# Pure functions and settings (unit tier).


def numpy_knn_scores(train, targets, test, k, temperature):
    """solo-learn's WeightedKNNClassifier.compute written out row by row in float64."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    k = min(k, len(train))
    scores = np.zeros((len(test), targets.shape[1]))
    for row, query in enumerate(test):
        similarities = np.array([query @ example for example in train])
        for neighbour in np.argsort(-similarities, kind="stable")[:k]:
            scores[row] += np.exp(similarities[neighbour] / temperature) * targets[neighbour]
    return scores


def test_knn_scores_match_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(37, 8)), rng.normal(size=(23, 8))
    labels = rng.integers(0, 4, 37)
    one_hot = np.eye(4)[labels]
    multi_hot = (rng.random((37, 4)) < 0.4).astype(np.float64)
    for targets, k, temperature in ((one_hot, 5, 0.07), (multi_hot, 7, 0.5), (one_hot, 50, 0.1)):
        expected = numpy_knn_scores(train, targets, test, k, temperature)
        # 5 test rows per chunk: several chunks, the last one padded.
        actual = online.knn_class_scores(
            train, targets, test, k=k, temperature=temperature, chunk_elements=5 * 37
        )
        np.testing.assert_allclose(actual, expected, rtol=2e-5)
        np.testing.assert_array_equal(actual.argmax(1), expected.argmax(1))
    # k above the memory bank: every training row votes (k clamps to 37).
    everyone = numpy_knn_scores(train, one_hot, test, 37, 0.1)
    np.testing.assert_allclose(
        online.knn_class_scores(train, one_hot, test, k=50, temperature=0.1), everyone, rtol=2e-5
    )


def test_change_distances_are_mean_distances_across_and_within_windows():
    # One location, features on the unit circle: early at 0 and 90 degrees, late at 180.
    features = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    long_term, short_term = online.change_distances(
        features, np.zeros(3, int), np.array([0, 0, 1]), 1
    )
    np.testing.assert_allclose(long_term, [(2.0 + np.sqrt(2.0)) / 2])
    np.testing.assert_allclose(short_term, [np.sqrt(2.0)])


def halved(images):
    return images / 2.0


def test_frozen_model_splits_rows_over_every_device_and_gathers_every_row():
    model = common.random_encoder(10, 3, seed=0, width=8)
    images = np.random.default_rng(0).normal(size=(5, 32, 32, 3)).astype(np.float32)
    frozen = inference.FrozenModel(model, halved, batch_size=6, mesh=mesh_lib.data_mesh())
    assert frozen.batch_size == 8  # a multiple of the 8 devices; the 5 rows padded to it
    np.testing.assert_allclose(frozen(images), np.asarray(model(halved(images))), atol=1e-5)


def evals_config(**evaluators):
    config = tiny_config()
    for name, spec in evaluators.items():
        config.evals[name] = spec
    return config


def test_eval_settings_round_trip_and_errors_name_the_evaluator_and_key():
    assert config_lib.for_tasks("pretrain").evals.to_dict() == {}
    config = evals_config(nearest=dict(type="knn", dataset="eurosat", k=5, manual_dir="/data"))
    settings = config_lib.resolve(config)
    (spec,) = settings.evals.evaluators
    assert (spec.name, spec.type, spec.dataset, spec.k, spec.temperature) == (
        "nearest", "knn", "eurosat", 5, 0.07
    )  # fmt: skip
    assert settings.evals.to_dict()["nearest"]["manual_dir"] == "/data"
    assert evals.EvalsSettings.from_mapping(settings.evals.to_dict()) == settings.evals
    change = config_lib.resolve(evals_config(change=dict(type="change_auc"))).evals.evaluators[0]
    assert change.dataset == "change"
    for spec, message in (
        (dict(type="knn", dataset="land_cover", k=0), r"^config\.evals\.bad\.k: must be >= 1$"),
        (dict(type="kmeans", dataset="land_cover"), r"^config\.evals\.bad\.type: one of "),
        (dict(type="knn", dataset="imagenet"), r"^config\.evals\.bad\.dataset: knn reads one of"),
        (dict(type="change_auc", dataset="eurosat"), r"^config\.evals\.bad\.dataset: change_auc"),
        (dict(type="knn", dataset="eurosat", every=3), r"^config\.evals\.bad: unknown key\(s\)"),
        (dict(type="knn", dataset="eurosat", image_size=16), r"^config\.evals\.bad\.image_size"),
    ):
        with pytest.raises(SettingsError, match=message):
            config_lib.resolve(evals_config(bad=spec))
    config = tiny_config()
    config.evals.bad = 3
    with pytest.raises(SettingsError, match=r"^config\.evals\.bad: an evaluator is a dict"):
        config_lib.resolve(config)


def test_evaluators_run_at_their_epochs_or_steps_and_always_at_the_last_step():
    def steps(**keys):
        spec = evals.EvalSpec(name="e", type="knn", dataset="eurosat", **keys)
        return [s for s in range(1, 12) if spec.due(s, steps_per_epoch=3, last_step=11)]

    assert steps() == [3, 6, 9, 11]
    assert steps(every_epochs=2) == [6, 11]
    assert steps(every_epochs=0) == [11]
    assert steps(every_steps=4) == [4, 8, 11]


def test_resuming_drops_the_eval_lines_written_after_the_checkpoint(tmp_path):
    lines = [
        {"step": 2, "loss": 1.0},
        {"step": 2, "epoch": 1.0, "eval/a/top1": 0.5},
        {"step": 3, "loss": 0.9},
        {"step": 4, "epoch": 2.0, "eval/a/top1": 0.6},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 5, "eval/a')
    assert evals.drop_eval_lines_after(str(path), 2) == 1
    kept = path.read_text().splitlines()
    assert [json.loads(line) for line in kept[:-1]] == lines[:3]
    assert kept[-1] == '{"step": 5, "eval/a'  # a line cut by a crash is left as it was
    assert evals.drop_eval_lines_after(str(tmp_path / "missing.jsonl"), 2) == 0


def test_a_missing_download_names_the_evaluators_key_before_any_work(tmp_path):
    spec = evals.EvalSpec(name="sat", type="knn", dataset="eurosat", data_dir=str(tmp_path))
    context = evals.EvalContext(None, None, None, Normalization.rgb(), mesh_lib.data_mesh())
    with pytest.raises(FileNotFoundError, match=r"^config\.evals\.sat\.manual_dir: .*EuroSAT_RGB"):
        online.KnnEvaluator(spec, context)


# --------------------------------------------------------------------------------------------------
# Evaluators and tiny runs (integration tier).


def test_bigearthnet_evaluators_score_micro_ap_from_the_download(tmp_path, one_device):
    manual = tmp_path / "manual"
    manual.mkdir()
    write_bigearthnet(manual, bigearthnet_patches(), as_tar=True)
    write_bigearthnet_lists(manual)
    context = evals.EvalContext(None, None, None, Normalization.rgb(), mesh_lib.data_mesh())
    keys = dict(dataset="bigearthnet", manual_dir=str(manual), data_dir=str(tmp_path / "tfds"))
    knn = online.KnnEvaluator(evals.EvalSpec(name="ben", type="knn", k=3, **keys), context)
    assert knn.metric == "micro_ap"
    assert knn.data.train_targets.shape == (14, 19)  # 16 listed, 2 cloud or snow patches removed
    encoder = common.random_encoder(10, 3, seed=0, width=8)
    spec = evals.EvalSpec(
        name="ben", type="linear_probe", probe_epochs=2, probe_batch_size=4, **keys
    )
    for evaluator in (knn, online.LinearProbeEvaluator(spec, context)):
        (score,) = evaluator.evaluate(encoder).values()
        assert 0.0 < score <= 1.0
    # A probe batch larger than its 14 training patches: refused when the evaluator is built,
    # before any training, naming the evaluator's key.
    too_large = dataclasses.replace(spec, probe_batch_size=16)
    with pytest.raises(online.EvalInputError, match=r"^config\.evals\.ben\.probe_batch_size: 16 "):
        online.LinearProbeEvaluator(too_large, context)


def write_truth(archive, source):
    """A ground truth for `helpers.fake_source`'s locations: classes and changes by index."""
    os.makedirs(archive)
    write_ground_truth(
        ground_truth_path(archive),
        [
            GroundTruth(source.location_id(i), i % 2 == 1, "demolition" if i % 2 else "none", i % 5)
            for i in range(len(source))
        ],
    )


def restore_template(settings, source, mesh):
    run = train.setup(settings, len(source), mesh=mesh)
    return checkpointing.replicated_target(mesh_lib.replicate(run.initial_state, mesh), mesh)


def saved_state(workdir, template, step):
    checkpoints = checkpointing.Checkpointer(str(workdir / "checkpoints"), every_steps=1, keep=3)
    state = checkpoints.restore(step, template)
    checkpoints.close()
    return jax.device_get(state)


def read_lines(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def eval_steps(lines, name):
    return [line["step"] for line in lines if f"eval/{name}/seconds" in line]


def test_a_run_with_evals_trains_bit_identically_and_resumes_without_duplicate_lines(
    tmp_path, monkeypatch
):
    """Evaluations of every type on EuroSAT (from `manual_dir`, its download layout) and the
    synthetic land cover and change; then a crash before the last checkpoint, and the run resumed
    with a stop requested at its last step; then a stop at the step before."""
    manual = tmp_path / "manual"
    manual.mkdir()
    write_eurosat_rgb_zip(manual)
    write_eurosat_lists(manual)
    source = fake_source()
    write_truth(str(tmp_path / "archive"), source)
    mesh = mesh_lib.data_mesh(jax.devices()[:1])  # several devices: test_frozen_model_...
    plain = tiny_config()  # 2 steps per epoch, 2 epochs
    plain.data.archive = str(tmp_path / "archive")  # the configs differ only by config.evals
    plain.checkpoint.every_steps = 2
    eurosat = dict(dataset="eurosat", manual_dir=str(manual), data_dir=str(tmp_path / "tfds"))
    config = evals_config(
        eurosat_knn=dict(type="knn", k=5, batch_size=16, **eurosat),
        eurosat_probe=dict(
            type="linear_probe", every_epochs=0, probe_epochs=3, probe_batch_size=8, **eurosat
        ),
        land_cover_knn=dict(
            type="knn",
            dataset="land_cover",
            every_steps=1,
            train_examples=20,
            test_examples=12,
            batch_size=16,
        ),
        change=dict(type="change_auc", every_epochs=2, test_examples=8, batch_size=16),
    )
    config.data.archive = str(tmp_path / "archive")
    config.checkpoint.every_steps = 2
    with_evals, plain = config_lib.resolve(config), config_lib.resolve(plain)

    results = {}
    for name, settings in (("plain", plain), ("evals", with_evals)):
        results[name] = train.train(settings, str(tmp_path / name), source, mesh=mesh)

    # Every leaf of both checkpoints (params, BatchNorm statistics, optimizer state, queue, rng,
    # change statistics) exactly equal.
    template = restore_template(plain, source, mesh)  # the same state shapes with evals
    for step in (2, 4):
        jax.tree.map(
            np.testing.assert_array_equal,
            saved_state(tmp_path / "plain", template, step),
            saved_state(tmp_path / "evals", template, step),
        )
    lines = {name: read_lines(tmp_path / name) for name in results}
    losses = {name: [(x["step"], x["loss"]) for x in lines[name] if "loss" in x] for name in lines}
    assert len(losses["plain"]) == 4 and losses["evals"] == losses["plain"]
    assert not any(key.startswith("eval/") for line in lines["plain"] for key in line)

    found = lines["evals"]
    assert eval_steps(found, "eurosat_knn") == [2, 4]
    assert eval_steps(found, "eurosat_probe") == [4]
    assert eval_steps(found, "land_cover_knn") == [1, 2, 3, 4]
    assert eval_steps(found, "change") == [4]
    knn_line = next(x for x in found if "eval/eurosat_knn/top1" in x)
    assert knn_line["epoch"] == 1.0 and 0.0 <= knn_line["eval/eurosat_knn/top1"] <= 1.0
    change_line = next(x for x in found if "eval/change/ratio_auc" in x)
    assert 0.0 <= change_line["eval/change/long_term_auc"] <= 1.0

    summary = results["evals"]["evals"]
    assert summary["eurosat_knn"]["metric"] == "top1"
    assert [h["step"] for h in summary["eurosat_knn"]["history"]] == [2, 4]
    probe_line = next(x for x in found if "eval/eurosat_probe/top1" in x)
    assert summary["eurosat_probe"]["latest"]["top1"] == probe_line["eval/eurosat_probe/top1"]
    assert os.path.getsize(results["evals"]["evals_plot"]) > 0
    assert "evals" not in results["plain"]

    # A crash after step 4's evaluations, before its checkpoint: the run resumes from step 2,
    # drops the eval lines after it and evaluates again at steps 3 and 4, each line once. A stop
    # (SIGTERM) requested at step 4, the last, does not skip its evaluations: no resumed run
    # would reach a later step.
    shutil.rmtree(tmp_path / "evals" / "checkpoints" / "4")
    monkeypatch.setattr(checkpointing.PreemptionGuard, "should_stop", lambda self, step: step == 4)
    resumed = train.train(with_evals, str(tmp_path / "evals"), source, mesh=mesh)
    assert (resumed["resumed_from"], resumed["steps"]) == (2, 4)
    again = read_lines(tmp_path / "evals")
    for name in ("eurosat_knn", "eurosat_probe", "land_cover_knn", "change"):
        assert eval_steps(again, name) == eval_steps(found, name)

    def without_seconds(lines):
        return [{k: v for k, v in x.items() if "seconds" not in k} for x in lines if "epoch" in x]

    # The same encoder at the same step (resuming is exact): the same numbers.
    assert without_seconds(again) == without_seconds(found)
    jax.tree.map(
        np.testing.assert_array_equal,
        saved_state(tmp_path / "plain", template, 4),
        saved_state(tmp_path / "evals", template, 4),
    )

    # A stop at step 3, before the last: that step's evaluations are not run (the checkpoint is
    # written at once) and the resumed run evaluates at the next scheduled point, step 4.
    shutil.rmtree(tmp_path / "evals" / "checkpoints" / "4")
    monkeypatch.setattr(checkpointing.PreemptionGuard, "should_stop", lambda self, step: step == 3)
    stopped = train.train(with_evals, str(tmp_path / "evals"), source, mesh=mesh)
    assert (stopped["resumed_from"], stopped["steps"]) == (2, 3)
    assert eval_steps(read_lines(tmp_path / "evals"), "land_cover_knn") == [1, 2]
    monkeypatch.setattr(checkpointing.PreemptionGuard, "should_stop", lambda self, step: False)
    finished = train.train(with_evals, str(tmp_path / "evals"), source, mesh=mesh)
    assert (finished["resumed_from"], finished["steps"]) == (3, 4)
    last = read_lines(tmp_path / "evals")
    assert eval_steps(last, "land_cover_knn") == [1, 2, 4]
    for name in ("eurosat_knn", "eurosat_probe", "change"):
        assert eval_steps(last, name) == eval_steps(found, name)
    jax.tree.map(
        np.testing.assert_array_equal,
        saved_state(tmp_path / "plain", template, 4),
        saved_state(tmp_path / "evals", template, 4),
    )
