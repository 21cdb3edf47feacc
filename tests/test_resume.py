"""Resuming pretraining compares the checkpoint's settings with the run's (caco_jax/pretrain/
resume.py): a change that alters the training is refused naming each key with both values, or,
accepted, recorded; what does not alter it passes; shape changes name the setting, not damage.

One tiny run (a width-8 ResNet-10, one step on one device) is trained once; each test resumes a
copy of its workdir. Refusals come before any step, so only the tests that train on compile (the
program the first run compiled, from the persistent cache).
"""

import json
import os
import shutil

import jax
import pytest
from helpers import fake_source, tiny_settings

from caco_jax.pretrain import resume, train
from caco_jax.runtime import checkpointing
from caco_jax.runtime import mesh as mesh_lib

SETTINGS = tiny_settings(max_steps=1).replace(checkpoint={"every_steps": 1})


def run(settings, workdir):
    return train.train(
        settings, os.fspath(workdir), fake_source(), mesh=mesh_lib.data_mesh(jax.devices()[:1])
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    run(SETTINGS, workdir)
    return workdir


@pytest.fixture
def workdir(trained, tmp_path):
    copy = tmp_path / "w"
    shutil.copytree(trained, copy)
    return copy


def folders(workdir):
    return sorted(os.listdir(workdir / "checkpoints"))


def saved_config(workdir, step):
    checkpoints = checkpointing.Checkpointer(
        os.fspath(workdir / "checkpoints"), every_steps=1, keep=3
    )
    try:
        return checkpoints.restore_config(step)
    finally:
        checkpoints.close()


def test_checkpoints_record_the_settings_and_no_change_yet(trained):
    config = saved_config(trained, 1)
    assert {k: v for k, v in config.items() if k != resume.CHANGES_KEY} == json.loads(
        json.dumps(SETTINGS.to_dict())
    )
    assert config[resume.CHANGES_KEY] == []


def test_a_change_that_alters_the_training_is_refused_naming_each_key_with_both_values(workdir):
    changed = SETTINGS.replace(
        train={"base_learning_rate": 0.06, "max_steps": 2},
        augment={"crop_size": 48},
        method={"temperature": 0.2},
    )
    before = folders(workdir)
    with pytest.raises(resume.ConfigChangedError) as refused:
        run(changed, workdir)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        f"checkpoint step 1 in {workdir / 'checkpoints'} was trained with other settings (saved "
        "-> now): method.temperature 0.07 -> 0.2; train.base_learning_rate 0.03 -> 0.06; "
        "augment.crop_size 32 -> 48. Resuming would mix two configurations"
    )
    assert message.endswith("--config.train.allow_config_change=True")
    assert folders(workdir) == before  # nothing moved aside, nothing trained


def test_what_does_not_alter_the_training_passes_freely(workdir, capsys):
    longer = SETTINGS.replace(
        train={"max_steps": 2, "epochs": 3, "milestones": (1,)},
        checkpoint={"every_steps": 5, "keep": 2},
        logging={"every_steps": 2, "progress_bar": False},
        input={"num_threads": 2, "prefetch_batches": 1},
    )
    results = run(longer, workdir)
    assert (results["resumed_from"], results["steps"]) == (1, 2)
    assert "resumed from checkpoint step 1\n" in capsys.readouterr().out


def test_an_accepted_change_is_recorded_in_the_metrics_and_the_checkpoints(workdir, capsys):
    accepted = SETTINGS.replace(
        train={"base_learning_rate": 0.06, "max_steps": 2, "allow_config_change": True}
    )
    results = run(accepted, workdir)
    assert (results["resumed_from"], results["steps"]) == (1, 2)
    assert (
        "resumed from checkpoint step 1; accepted by config.train.allow_config_change and "
        "recorded in metrics.jsonl and the checkpoints: train.base_learning_rate 0.03 -> 0.06"
    ) in capsys.readouterr().out
    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if "config_change" in line]
    assert records == [{"step": 1, "config_change": {"train.base_learning_rate": [0.03, 0.06]}}]
    history = saved_config(workdir, 2)[resume.CHANGES_KEY]
    assert history == [{"step": 1, "changes": {"train.base_learning_rate": [0.03, 0.06]}}]
    # The next resume compares with the new values and keeps the record.
    again = run(accepted.replace(train={"max_steps": 3, "allow_config_change": False}), workdir)
    assert again["steps"] == 3 and saved_config(workdir, 3)[resume.CHANGES_KEY] == history


def test_a_change_of_shapes_names_the_setting_not_damage(workdir):
    smaller = SETTINGS.replace(model={"embedding_dim": 8}, train={"max_steps": 2})
    with pytest.raises(resume.ConfigChangedError, match=r"model\.embedding_dim 16 -> 8"):
        run(smaller, workdir)
    accepted = smaller.replace(train={"allow_config_change": True})
    with pytest.raises(resume.StateChangedError) as refused:
        run(accepted, workdir)
    message = str(refused.value)
    assert message.startswith(
        f"checkpoint step 1 in {workdir / 'checkpoints'} holds a state of other shapes than "
        "this run's ("
    )
    assert "key_params/heads/heads/0/output/bias: saved [16] float32, now [8] float32" in message
    assert "the settings changed since it was written: model.embedding_dim 16 -> 8" in message
    assert "cannot accept a change of shapes" in message and "It is not damaged" in message
    assert folders(workdir) == ["1"]  # not moved aside as damaged


@pytest.mark.parametrize(
    ("change", "named"),
    [({"seed": 7}, "seed 0 -> 7"), ({"train": {"batch_size": 8}}, "train.batch_size 16 -> 8")],
)
def test_another_batch_size_or_seed_is_one_line_even_when_accepted(workdir, change, named):
    changed = SETTINGS.replace(**change).replace(train={"max_steps": 2})
    with pytest.raises(resume.ConfigChangedError, match=named):
        run(changed, workdir)
    accepted = changed.replace(train={"allow_config_change": True})
    with pytest.raises(resume.ResumeError) as refused:
        run(accepted, workdir)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("checkpoint step 1 cannot be resumed")
    assert f"(accepted changes: {named})" in message
    assert "config.train.allow_config_change cannot accept" in message


def test_a_checkpoint_without_comparable_settings_resumes_saying_so(workdir, capsys):
    shutil.rmtree(workdir / "checkpoints" / "1" / "config")  # as written before they were kept
    results = run(SETTINGS.replace(train={"max_steps": 2}), workdir)
    assert (results["resumed_from"], results["steps"]) == (1, 2)
    assert (
        "resumed from checkpoint step 1; checkpoint step 1 records no comparable settings "
        "(written before checkpoints recorded them): resuming without comparing them"
    ) in capsys.readouterr().out


def test_a_complete_run_trains_nothing_and_says_so(workdir, capsys):
    encoder_files = {
        path: os.stat(os.path.join(root, path)).st_mtime_ns
        for root, _, names in os.walk(workdir / "encoder")
        for path in names
    }
    results = run(SETTINGS, workdir)
    output = capsys.readouterr().out
    assert (
        "pretrain: complete at checkpoint step 1 (the run asks for 1 steps): nothing to train"
        in output
    )
    assert "nothing to train" in output and "no step run now" in output and "nan" not in output
    assert (results["steps"], results["samples_per_s"]) == (1, None)
    assert encoder_files == {  # the export of that step is kept, not rewritten
        path: os.stat(os.path.join(root, path)).st_mtime_ns
        for root, _, names in os.walk(workdir / "encoder")
        for path in names
    }
