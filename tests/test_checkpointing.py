"""Resuming past damaged checkpoints: the newest one that restores is used, the others set aside.

A tiny pytree stands in for the training state: what is tested is how `Checkpointer.restore_latest`
treats the folders on disk, not the model.
"""

import gc
import logging as std_logging
import os
import sys
import warnings

import jax
import numpy as np
import pytest
from absl import logging as absl_logging

from caco_jax.runtime import checkpointing


def state_at(step):
    return {"weights": np.full((64, 64), step, np.float32), "step": np.int32(step)}


ABSTRACT_STATE = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state_at(0))


def checkpointer(directory):
    return checkpointing.Checkpointer(str(directory), every_steps=1, keep=5, async_save=False)


def write_steps(directory, steps):
    checkpoints = checkpointer(directory)
    for step in steps:
        checkpoints.save(step, state_at(step), data_position={"next_global_batch": step})
    checkpoints.close()


def largest_file(folder):
    paths = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    return max(paths, key=os.path.getsize)


def truncate_state(step_dir):
    """What a full disk or a partial copy leaves: the largest array data file cut short."""
    path = largest_file(os.path.join(step_dir, "state"))
    os.truncate(path, os.path.getsize(path) // 3)


def remove_state_data(step_dir):
    os.remove(largest_file(os.path.join(step_dir, "state")))


def truncate_data_position(step_dir):
    os.truncate(os.path.join(step_dir, "data_position", "metadata"), 5)


def warnings_logged(caplog):
    """The warnings `caco_jax.runtime.checkpointing` itself logged (not Orbax's)."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == std_logging.WARNING and record.pathname == checkpointing.__file__
    ]


@pytest.mark.parametrize("damage", [truncate_state, remove_state_data, truncate_data_position])
def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(
    tmp_path, capfd, caplog, damage
):
    write_steps(tmp_path, [1, 2, 3])
    damage(str(tmp_path / "3"))

    checkpoints = checkpointer(tmp_path)
    step, state = checkpoints.restore_latest(ABSTRACT_STATE)

    assert step == 2
    np.testing.assert_array_equal(state["weights"], state_at(2)["weights"])
    assert int(state["step"]) == 2
    # One line naming the step, what failed and where it went; nothing else on the terminal.
    (line,) = warnings_logged(caplog)
    assert "\n" not in line
    assert line.startswith("checkpoint step 3 does not restore (")
    assert line.endswith(f"moved to {tmp_path / '3.damaged-1'}, resuming from step 2")
    output = capfd.readouterr()
    assert "Traceback" not in output.err + output.out
    assert "Event loop" not in output.err + output.out
    # Kept on disk for inspection, and not a step for Orbax.
    assert (tmp_path / "3.damaged-1").is_dir()
    assert not (tmp_path / "3").exists()
    assert checkpoints.all_steps() == [1, 2]
    checkpoints.close()


def test_resumed_run_saves_the_damaged_step_afresh_without_touching_the_damaged_copy(
    tmp_path, caplog
):
    write_steps(tmp_path, [1, 2])
    truncate_state(str(tmp_path / "2"))
    checkpoints = checkpointer(tmp_path)
    assert checkpoints.restore_latest(ABSTRACT_STATE)[0] == 1
    damaged_files = sorted(os.listdir(tmp_path / "2.damaged-1"))
    # The resumed run reaches step 2 again and saves it.
    checkpoints.save(2, state_at(2), data_position={"next_global_batch": 2})
    checkpoints.close()

    assert sorted(os.listdir(tmp_path / "2.damaged-1")) == damaged_files
    # The same step damaged a second time goes next to the first copy, not over it.
    truncate_state(str(tmp_path / "2"))
    checkpoints = checkpointer(tmp_path)
    assert checkpoints.restore_latest(ABSTRACT_STATE)[0] == 1
    checkpoints.close()
    assert sorted(p for p in os.listdir(tmp_path) if "damaged" in p) == [
        "2.damaged-1",
        "2.damaged-2",
    ]
    assert len(warnings_logged(caplog)) == 2


def test_no_restorable_checkpoint_is_one_line_listing_every_step_and_moves_nothing(
    tmp_path, capfd, caplog
):
    write_steps(tmp_path, [1, 2])
    truncate_state(str(tmp_path / "2"))
    remove_state_data(str(tmp_path / "1"))

    checkpoints = checkpointer(tmp_path)
    with pytest.raises(checkpointing.NoRestorableCheckpointError) as raised:
        checkpoints.restore_latest(ABSTRACT_STATE)

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"no checkpoint in {tmp_path} restores (step 2: ")
    assert "; step 1: " in message
    output = capfd.readouterr()
    assert "Traceback" not in output.err + output.out
    assert warnings_logged(caplog) == []
    # A rerun must not silently start afresh: every checkpoint stays where it was.
    assert checkpoints.all_steps() == [1, 2]
    checkpoints.close()


def test_empty_folder_restores_nothing(tmp_path):
    checkpoints = checkpointer(tmp_path)
    assert checkpoints.restore_latest(ABSTRACT_STATE) == (None, None)
    checkpoints.close()


def test_intact_newest_checkpoint_restores_without_a_warning(tmp_path, caplog):
    write_steps(tmp_path, [1, 2])
    checkpoints = checkpointer(tmp_path)
    step, state = checkpoints.restore_latest(ABSTRACT_STATE)
    checkpoints.close()
    assert (step, int(state["step"]), warnings_logged(caplog)) == (2, 2, [])


def test_noise_of_a_failed_attempt_is_dropped_and_the_log_of_a_good_one_kept(
    tmp_path, capfd, caplog, monkeypatch
):
    write_steps(tmp_path, [1, 2])
    checkpoints = checkpointer(tmp_path)
    restore = checkpoints.restore

    class LeftBehind:
        """What a torn-down event loop leaves: an error raised when the garbage is collected."""

        def __del__(self):
            raise RuntimeError("Event loop is closed")

    def noisy_restore(step, target):
        if step == 2:
            absl_logging.error("tensorstore read failed")
            warnings.warn("coroutine was never awaited", RuntimeWarning, stacklevel=1)
            garbage = LeftBehind()
            garbage.cycle = garbage  # only the cycle collector frees it
            del garbage
            raise ValueError("OUT_OF_RANGE: byte range not valid")
        absl_logging.warning("restored with a note")
        return restore(step, target)

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    monkeypatch.setattr(checkpoints, "restore", noisy_restore)
    assert checkpoints.restore_latest(ABSTRACT_STATE)[0] == 1
    gc.collect()
    checkpoints.close()

    messages = [record.getMessage() for record in caplog.records]
    assert "restored with a note" in messages
    assert "tensorstore read failed" not in messages
    assert warnings_logged(caplog)[0].startswith(
        "checkpoint step 2 does not restore (ValueError: OUT_OF_RANGE: byte range not valid)"
    )
    assert unraisable == []
    assert "never awaited" not in capfd.readouterr().err


def test_a_save_that_runs_out_of_space_is_one_error_naming_the_step_without_noise(
    tmp_path, capfd, caplog
):
    """A full disk during an asynchronous save, as the file size limit makes one: the save threads'
    reports are held back and the next save raises one CheckpointSaveError with the root cause
    (it used to print thousands of lines, the cause among them)."""
    import resource
    import signal

    checkpoints = checkpointing.Checkpointer(str(tmp_path), every_steps=1, keep=5)
    checkpoints.save(1, state_at(1), data_position={"next_global_batch": 1})
    checkpoints.wait()
    noise = np.random.default_rng(0).random((512, 512), np.float32)  # 1 MiB, incompressible
    big = {"weights": noise, "step": np.int32(2)}
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails (EFBIG)
    try:
        with pytest.raises(checkpointing.CheckpointSaveError) as failed:
            with checkpointing.QuietSaveFailures():
                resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, limits[1]))
                checkpoints.save(2, big, data_position={"next_global_batch": 2})
                checkpoints.save(3, big, data_position={"next_global_batch": 3})
                checkpoints.wait()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
        checkpoints.close()
        gc.collect()
    message = str(failed.value)
    assert message.startswith(f"checkpoint step 2 could not be written to {tmp_path} (out of disk")
    assert "File too large" in message and "\n" not in message
    assert message.endswith(
        "training stopped. The newest complete checkpoint is step 1: free space or fix the "
        "folder, then rerun to resume from it"
    )
    output = capfd.readouterr()
    assert "Traceback" not in output.err and "OUT_OF_RANGE" not in output.err
    assert [r for r in caplog.records if r.levelno >= std_logging.ERROR] == []
    reopened = checkpointing.Checkpointer(str(tmp_path), every_steps=1, keep=5)
    assert reopened.all_steps() == [1]  # the failed steps were never renamed into place
    reopened.close()
