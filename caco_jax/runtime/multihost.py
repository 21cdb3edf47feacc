"""One run over several hosts: a JAX process per host (TPU pod slices, multi-node GPU clusters).

Every process runs the same command (`run.py --multihost` or the explicit coordinator flags) with
the same workdir on storage that all hosts share. Which task runs on which process is the task
table's business (`caco_jax.tasks`: every process, process 0 while the others wait, or one-process
tasks refused); this module is the runtime: joining the run, and stopping every process when one
is lost.

A process that dies stops the others (see docs/reliability.md): each process watches the others'
signs of life (`PeerWatch`) and ends itself with one line when one has shown none for
`peer_timeout_seconds`; a process that sees a collective fail because a peer is gone, or whose task
fails, ends at once (`stop_if_peer_lost`, `exit_after_failure`) instead of waiting at
`jax.distributed`'s shutdown barrier for processes that will never come.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import os
import re
import sys
import threading
import time

from caco_jax.runtime import errors

# A process that shows no sign of life for a minute is gone (JAX's own heartbeat default: 100 s).
DEFAULT_PEER_TIMEOUT_SECONDS = 60
# What the runtime says when another process of the run is gone: Gloo (CPU collectives) and NCCL
# see its connections close, the coordination service misses its heartbeats or loses its leader.
_LOST_PEER_SIGNS = (
    "connection closed by peer",
    "connection reset by peer",
    "remote process exited",
    "heartbeat",
    "unhealthy",
    "socket closed",
    "failed to send rpc to coordination service",
)
_ALIVE_KEYS = "caco_jax/alive/"
_DONE = "done"
_TASK_NAMED = re.compile(r"\btask[ :](\d+)|stopped sending heartbeats\):\s*(\d+)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Process:
    index: int = 0
    count: int = 1

    @property
    def primary(self) -> bool:
        return self.index == 0


def initialize(
    *,
    auto: bool,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    peer_timeout_seconds: int = DEFAULT_PEER_TIMEOUT_SECONDS,
) -> Process:
    """Joins the multi-process run: `jax.distributed.initialize` with the values given, JAX
    detecting the others (Cloud TPU, SLURM, Open MPI, Kubernetes). Nothing when `auto` is False and
    no value is given: a single-process run does not even import JAX here.

    A process of which the others see no sign of life for `peer_timeout_seconds` is taken for lost
    and they stop (`PeerWatch`). JAX's own heartbeat timeout, twice that, is the backstop: it ends
    the processes from C++ with a long report that does not say which process was lost first."""
    explicit = {
        key: value
        for key, value in dict(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        ).items()
        if value is not None
    }
    if not auto and not explicit:
        return Process()
    import jax

    jax.distributed.initialize(**explicit, heartbeat_timeout_seconds=2 * peer_timeout_seconds)
    process = Process(jax.process_index(), jax.process_count())
    if process.count > 1:
        watch = PeerWatch(process, peer_timeout_seconds)
        watch.start()
        # Before `jax.distributed`'s own exit handler (registered when JAX was imported, so run
        # after this one), which waits for every process at a barrier.
        atexit.register(watch.stop)
    return process


class PeerWatch(threading.Thread):
    """Ends this process with one line naming the peer that shows no sign of life for `timeout` s.

    Every process bumps a counter under ``caco_jax/alive/<index>`` in the coordination service's
    key-value store ten times per `timeout` and reads everyone's. A peer whose counter has not moved
    for `timeout` seconds is gone (killed, its host down, or hung), and nothing collective can
    finish without it, so this process exits (see `stop_if_peer_lost`). A process that finishes
    normally says so (`stop`, at exit) and is no longer watched.
    """

    def __init__(self, process: Process, timeout: float):
        super().__init__(name="caco_jax_peer_watch", daemon=True)
        from orbax.checkpoint import multihost as orbax_multihost

        self._client = orbax_multihost.get_jax_distributed_client()
        self._process, self._timeout = process, timeout
        self._key = f"{_ALIVE_KEYS}{process.index}"
        self._stopped = threading.Event()

    def run(self):
        last_seen = {i: time.monotonic() for i in range(self._process.count)}
        del last_seen[self._process.index]
        counters = {}
        for beat in itertools.count():
            try:
                self._client.key_value_set(self._key, str(beat), allow_overwrite=True)
                alive = {
                    int(key.rsplit("/", 1)[-1]): value
                    for key, value in self._client.key_value_dir_get(_ALIVE_KEYS)
                }
            except Exception as error:  # the coordination service, on process 0, is unreachable
                if self._stopped.is_set():
                    return
                _exit_lost("process 0, which runs the coordination service", _one_line(error))
            now = time.monotonic()
            for peer, seen in list(last_seen.items()):
                if alive.get(peer) == _DONE:
                    del last_seen[peer]
                elif alive.get(peer) != counters.get(peer):
                    counters[peer], last_seen[peer] = alive.get(peer), now
                elif now - seen > self._timeout:
                    _exit_lost(
                        f"process {peer}",
                        f"no sign of life for {self._timeout:g} s, --peer_timeout_seconds",
                    )
            if self._stopped.wait(self._timeout / 10):
                return

    def stop(self) -> None:
        """Stops watching and tells the others that this process finished."""
        self._stopped.set()
        self.join()
        self._client.key_value_set(self._key, _DONE, allow_overwrite=True)


def lost_peer(error: BaseException) -> str | None:
    """The process ``error`` says is gone ("process 1", or "another process" when it does not name
    one), or None when ``error`` is not about a lost peer."""
    message = str(error)
    if not any(sign in message.lower() for sign in _LOST_PEER_SIGNS):
        return None
    named = _TASK_NAMED.search(message)
    return f"process {named.group(1) or named.group(2)}" if named else "another process"


def stop_if_peer_lost(error: BaseException) -> None:
    """Ends this process at once with one line on stderr when ``error`` says a peer process is gone;
    returns otherwise.

    Nothing collective can finish without the peer: not the checkpoint being written (process 0
    marks it complete only once every process has written its part), not `jax.distributed`'s
    shutdown at exit (which would wait for the peer until its shutdown timeout, then abort with a
    long report). So the process exits here, with status 1.
    """
    peer = lost_peer(error)
    if peer is not None:
        _exit_lost(peer, f"{type(error).__name__}: {_one_line(error)[:300]}")


def exit_after_failure(error: BaseException) -> None:
    """Ends a process of a multi-process run whose task failed: the error on stderr (one line for
    an expected error, with exit status 2, or its traceback, status 1; `runtime.errors`) without
    `jax.distributed`'s shutdown barrier, which would hold this process, and the peers blocked in
    a collective with it, until its timeout. The peers then see this process gone and stop too."""
    stop_if_peer_lost(error)
    if isinstance(error, SystemExit):
        if isinstance(error.code, int):
            sys.stdout.flush()
            os._exit(error.code)
        _exit_now(str(error.code))
    status = errors.report(error)
    os._exit(status)


def _exit_lost(peer: str, cause: str) -> None:
    import jax

    _exit_now(
        f"run.py: process {jax.process_index()} of {jax.process_count()} lost contact with {peer} "
        f"({cause}); it died, hangs or was stopped: see its log. Stopping without saving; rerun "
        "every process to resume from the newest complete checkpoint"
    )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _exit_now(message: str) -> None:
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(1)


def current() -> Process:
    """This process's place in the run (JAX's process index and count)."""
    import jax

    return Process(jax.process_index(), jax.process_count())


def barrier(name: str) -> None:
    """Waits until every process of the run reaches ``name`` (returns at once in one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
