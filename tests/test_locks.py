"""One writer per folder (caco_jax/runtime/locks.py): a lock file holding the writer, taken with
flock, refused while held, taken over once its writer is gone.

A second process is stood in for by a second open of the lock file: flock locks belong to an open
file description, so this process's own second open is refused exactly as another process's
would be (tests/test_rerun.py refuses a second run.py process itself)."""

import fcntl
import json
import os
import socket

import pytest

from caco_jax.runtime import locks


def hold_as_another_run(folder, record):
    """The lock file of ``folder`` written and flocked the way another run holds it; returns its
    descriptor (closing it releases the lock)."""
    path = os.path.join(folder, locks.LOCK_FILE)
    with open(path, "w") as f:
        json.dump(record, f)
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_the_lock_file_names_its_writer_while_held_and_goes_with_it(tmp_path):
    lock = locks.WriterLock(tmp_path / "w", "workdir")
    with lock:
        with open(tmp_path / "w" / locks.LOCK_FILE) as f:
            record = json.load(f)
        assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
        assert record["command"] and record["started"]
    assert not (tmp_path / "w" / locks.LOCK_FILE).exists()
    with lock:  # and can be taken again
        pass


def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path):
    record = {"host": "node-7", "pid": 31337, "started": "2026-05-01T12:00:00+00:00",
              "command": "run.py --config configs/demo.py"}  # fmt: skip
    holder = hold_as_another_run(tmp_path, record)
    try:
        with pytest.raises(locks.LockedError) as refused:
            locks.WriterLock(tmp_path, "workdir").acquire()
    finally:
        os.close(holder)
    assert str(refused.value) == (
        f"workdir {tmp_path} is being written by another run (host node-7, pid 31337, started "
        "2026-05-01T12:00:00+00:00: run.py --config configs/demo.py; lock file "
        f"{tmp_path / locks.LOCK_FILE}): wait for it to end, stop it, or use another workdir"
    )
    with open(tmp_path / locks.LOCK_FILE) as f:
        assert json.load(f) == record  # the holder's file is left as it was


def test_a_stale_lock_of_a_writer_that_is_gone_is_taken_over_with_a_note(tmp_path, capsys):
    # What a run killed with -9 leaves: its file, no flock (the kernel released it).
    stale = {"host": "node-7", "pid": 31337, "command": "run.py --config configs/demo.py"}
    (tmp_path / locks.LOCK_FILE).write_text(json.dumps(stale))
    with locks.WriterLock(tmp_path, "data_dir"):
        with open(tmp_path / locks.LOCK_FILE) as f:
            assert json.load(f)["pid"] == os.getpid()
    assert capsys.readouterr().err == (
        f"data_dir {tmp_path}: taking over the lock of a run that ended without releasing it "
        "(host node-7, pid 31337: run.py --config configs/demo.py)\n"
    )


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    outer = locks.WriterLock(tmp_path, "workdir")
    with outer, locks.WriterLock(tmp_path, "workdir"):  # run.py, then the pretrain task
        assert (tmp_path / locks.LOCK_FILE).exists()
    assert not (tmp_path / locks.LOCK_FILE).exists()


def test_a_bucket_workdir_is_not_locked():
    assert locks.workdir_lock("gs://bucket/run") is locks.NO_LOCK
    assert isinstance(locks.workdir_lock("/tmp/run"), locks.WriterLock)
