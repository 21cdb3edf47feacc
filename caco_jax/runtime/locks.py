"""One writer at a time for a folder: a workdir, a data_dir.

Two runs writing into one workdir interleave their metrics and delete each other's checkpoints; two
prepares into one data_dir race for the same dataset folder. So a run holds a lock on each folder it
writes (`WriterLock`): a file ``caco_jax.lock`` in the folder holding the writer's host, pid, start
time and command, locked with ``flock`` while the writer runs. A second writer is refused at once
with one line naming the holder (`LockedError`).

A lock whose writer is gone is stale, and is taken over with a note: the kernel releases a
``flock`` when its process ends, however it ends (kill -9 included), so a lock file that can be
locked again belongs to a writer that no longer runs, whatever the file still says. A writer
that ends normally removes the file.

Local folders and mounted filesystems that support ``flock`` (NFS does) are locked. A bucket URL
(``gs://...``) is not: buckets have no lock that a killed writer releases, so `workdir_lock`
returns `NO_LOCK` there (docs/reliability.md).

Within one process a lock is re-entrant: `run.py` holds the workdir's for the whole run, and the
`pretrain` task, which takes it itself when called from Python, takes it again without waiting.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading

from caco_jax.runtime import errors, storage
from caco_jax.runtime.workdir import LOCK_FILE

_held: dict[str, list] = {}  # lock path -> [open file descriptor, depth], this process's locks
_held_lock = threading.Lock()


class LockedError(errors.UserError):
    """Another run holds the folder's lock."""


class WriterLock:
    """The lock of ``folder`` (``what`` names it in messages: "workdir", "data_dir"); a context
    manager, or `acquire` and `release`."""

    def __init__(self, folder, what: str):
        self.folder = os.path.abspath(os.fspath(folder))
        self.what = what
        self.path = os.path.join(self.folder, LOCK_FILE)

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def acquire(self) -> None:
        """Takes the lock, or raises LockedError naming its holder. Takes over a stale lock with
        a note on stderr."""
        with _held_lock:
            if self.path in _held:
                _held[self.path][1] += 1
                return
            os.makedirs(self.folder, exist_ok=True)
            fd, previous = self._lock_file()
            if previous:
                print(
                    f"{self.what} {self.folder}: taking over the lock of a run that ended without "
                    f"releasing it ({describe(previous)})",
                    file=sys.stderr,
                    flush=True,
                )
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder_record()).encode() + b"\n", 0)
            os.fsync(fd)
            _held[self.path] = [fd, 1]

    def release(self) -> None:
        with _held_lock:
            entry = _held.get(self.path)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1]:
                return
            del _held[self.path]
            # Removed while still locked, so a writer waiting for it finds the file gone and
            # makes a new one (see `_lock_file`).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(entry[0])

    def _lock_file(self) -> tuple[int, dict]:
        """(descriptor of the locked file, what it said before) or LockedError."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = _read(fd)
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise LockedError(
                    f"{self.what} {self.folder} is being written by another run "
                    f"({describe(holder)}; lock file {self.path}): wait for it to end, stop it, "
                    f"or use another {self.what}"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd, _read(fd)
            os.close(fd)  # the holder removed that file as we locked it: lock the new one


def workdir_lock(workdir) -> contextlib.AbstractContextManager:
    """The lock of a run's workdir (`WriterLock`); `NO_LOCK` for a bucket URL."""
    root = os.fspath(workdir)
    if storage.is_url(root):
        return NO_LOCK
    return WriterLock(root, "workdir")


def holder_record() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:500],
    }


def describe(record: dict) -> str:
    """``host <h>, pid <p>, started <t>: <command>`` of a lock file's record."""
    if not record:
        return "holder unknown"
    parts = [f"host {record.get('host', '?')}", f"pid {record.get('pid', '?')}"]
    if record.get("started"):
        parts.append(f"started {record['started']}")
    text = ", ".join(parts)
    return f"{text}: {record['command']}" if record.get("command") else text


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {"host": "?", "pid": "?", "command": "(unreadable lock file)"}


NO_LOCK = contextlib.nullcontext()
