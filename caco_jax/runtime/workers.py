"""Worker processes that start from any caller: a script without a main guard, a notebook, run.py.

Python's `spawn` and `forkserver` start methods run the caller's main module again in every new
process (as ``__mp_main__``), so that functions defined there can be unpickled. A script that does
its work at top level, without ``if __name__ == "__main__":``, then starts that work again inside
each worker, and the worker dies at its first process start ("An attempt has been made to start a
new process before the current process has finished its bootstrapping phase"). The workers of
caco_jax run functions of the package only, and grain's workers receive their dataset
cloudpickled (functions of a main module by value), so none of them needs the caller's main module.

`context(method)` returns a multiprocessing context whose processes start without it; `install()`
does the same for grain's prefetch processes (`input.num_workers > 0`), whose context grain
chooses itself. Both work by leaving the main-module entries out of the start-up data that
`multiprocessing.spawn.get_preparation_data` gives a new process, for these processes only
(recognised by their name); every other process of the program starts as Python would start it.
Fork-started processes copy the parent and never ran the main module again; they need nothing.

The processes of `context` also end with the process that started them: each watches its starter
(`watch_parent`) and exits once it is gone, whatever ended it (kill -9 included). Without that, a
worker waiting for its next task waits forever, and with it the forkserver and the resource tracker
that serve it (seen: about 420 MB held half an hour after a killed `prepare`).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.spawn
import os
import threading
import time

# Name prefixes of the processes that start without the caller's main module.
PROCESS_PREFIX = "caco-"
_GRAIN_PREFIX = "grain-process-prefetch-"
# The start-up entries with which a new process runs the main module (by path or module name).
_MAIN_MODULE_ENTRIES = ("init_main_from_path", "init_main_from_name")

# How often a worker checks that the process that started it still runs, and the exit status of
# a worker that found it gone.
PARENT_POLL_SECONDS = 1.0
ORPHANED_EXIT_STATUS = 75

_install_lock = threading.Lock()


def install() -> None:
    """Starts caco_jax's and grain's worker processes without the caller's main module (see the
    module docstring). Idempotent; `context` calls it."""
    with _install_lock:
        original = multiprocessing.spawn.get_preparation_data
        if getattr(original, "_caco_wrapped", False):
            return

        def get_preparation_data(name):
            data = original(name)
            if name.startswith((PROCESS_PREFIX, _GRAIN_PREFIX)):
                for key in _MAIN_MODULE_ENTRIES:
                    data.pop(key, None)
            return data

        get_preparation_data._caco_wrapped = True
        multiprocessing.spawn.get_preparation_data = get_preparation_data


def context(method: str) -> multiprocessing.context.BaseContext:
    """A `spawn` or `forkserver` context whose processes do not run the caller's main module.

    Its processes are named `caco-<name>`, which is what marks them; everything else (queues,
    `ProcessPoolExecutor(mp_context=...)`, forkserver preloads) is the standard context's.
    """
    if method not in ("spawn", "forkserver"):
        raise ValueError(f"method must be 'spawn' or 'forkserver', got {method!r}")
    install()
    return _CONTEXTS[method]


def process_identity(pid: int) -> tuple[int, float]:
    """(pid, start time): a process, told from a later one that reuses its pid."""
    import psutil

    return pid, psutil.Process(pid).create_time()


def is_running(identity: tuple[int, float]) -> bool:
    import psutil

    pid, started = identity
    try:
        return psutil.Process(pid).create_time() == started
    except psutil.NoSuchProcess:
        return False


def watch_parent(identity: tuple[int, float], poll_seconds: float = PARENT_POLL_SECONDS) -> None:
    """Ends this process (status `ORPHANED_EXIT_STATUS`) once the process ``identity`` names has
    ended: a daemon thread checks every ``poll_seconds``. Its parent may be a forkserver, not the
    process that asked for it, so the starter is named rather than taken from ``getppid``."""

    def watch():
        while is_running(identity):
            time.sleep(poll_seconds)
        os._exit(ORPHANED_EXIT_STATUS)  # nobody is left to read what this process would send

    threading.Thread(target=watch, name="caco-parent-watch", daemon=True).start()


class _Marked:
    """Prefixes a process's name with `PROCESS_PREFIX`, the mark `install` recognises, and makes
    the process end with the one that started it (`watch_parent`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.name.startswith(PROCESS_PREFIX):
            self.name = PROCESS_PREFIX + self.name
        self._caco_starter = process_identity(os.getpid())

    def run(self):
        watch_parent(self._caco_starter)
        super().run()


# Module-level classes: a spawned process unpickles its Process object by qualified name.
class _SpawnProcess(_Marked, multiprocessing.context.SpawnProcess):
    pass


class _ForkServerProcess(_Marked, multiprocessing.context.ForkServerProcess):
    pass


class _SpawnContext(multiprocessing.context.SpawnContext):
    Process = _SpawnProcess


class _ForkServerContext(multiprocessing.context.ForkServerContext):
    Process = _ForkServerProcess


_CONTEXTS = {"spawn": _SpawnContext(), "forkserver": _ForkServerContext()}
