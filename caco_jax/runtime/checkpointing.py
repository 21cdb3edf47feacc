"""Orbax checkpoints of a training run: the state, the input stream's position and the config.

On disk, one folder per saved step under ``<workdir>/checkpoints/``::

  <step>/
    state/           the whole `TrainState` (every array a resume needs), Orbax's array format,
                     written asynchronously by all processes together
    data_position/   ``metadata``, JSON written by process 0 alone: ``next_global_batch`` (the
                     global step) and the stream settings that give it its meaning (method,
                     global_batch_size, seed, num_locations, epoch_over, num_acquisitions); see
                     `data.pipeline.Position`
    config/          ``metadata``, the run's config as JSON, for the record
    _CHECKPOINT_METADATA

Nothing in a checkpoint depends on the number of processes or devices that wrote it: the state is
restored through an abstract target whose leaves carry the shardings of the *current* mesh, and the
input stream is rebuilt on each process from ``next_global_batch`` (every process takes its slice
of the same global batches), so a run saved on N hosts (devices) resumes on M. Orbax writes each
step into a temporary folder and renames it when complete, so a crash mid-save leaves the previous
checkpoints intact.

A checkpoint damaged after it was written (a data file truncated by a full disk or a partial copy)
does not stop a resume: `Checkpointer.restore_latest` tries the steps newest first, moves each one
that fails to read aside as ``<step>.damaged-<n>`` (kept for inspection; Orbax does not take it for
a step) and resumes from the newest that restores. See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging as std_logging
import os
import signal
import sys
import threading
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from caco_jax.runtime import errors
from caco_jax.settings import Section

STATE, DATA_POSITION, CONFIG = "state", "data_position", "config"
DAMAGED_SUFFIX = ".damaged-"


@dataclasses.dataclass(frozen=True)
class CheckpointSettings(Section):
    """`config.checkpoint`: Orbax checkpoints of pretraining under ``<workdir>/checkpoints``."""

    SECTION = "checkpoint"
    every_steps: int = 1000  # and always at the end of the run
    keep: int = 3  # the newest N are kept
    export_encoder_every_checkpoint: bool = False  # export <workdir>/encoder at each save too

    def validate(self) -> None:
        self.require(self.every_steps >= 1, "every_steps", "must be >= 1")
        self.require(self.keep >= 1, "keep", "must be >= 1")


class NoRestorableCheckpointError(errors.UserError, RuntimeError):
    """Every checkpoint in the folder failed to restore."""


class CheckpointSaveError(errors.UserError, RuntimeError):
    """A checkpoint could not be written (a full disk, a folder gone); the complete ones before it
    are intact, since Orbax renames a step into place only once it is whole."""


class StateMismatchError(errors.UserError, ValueError):
    """A checkpoint's arrays differ in name, shape or type from the state to restore: it was
    written by a run with other settings, and is not damaged."""

    def __init__(self, step: int, directory: str, differences: list[str]):
        self.step, self.directory, self.differences = step, directory, differences
        more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
        self.summary = "; ".join(differences[:3]) + more
        super().__init__(
            f"checkpoint step {step} in {directory} holds arrays of other shapes than the state "
            f"to restore: {self.summary}"
        )


def abstract_target(state_shapes, shardings):
    """`jax.ShapeDtypeStruct` leaves with the given shardings: where restored arrays should land."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        state_shapes,
        shardings,
    )


def replicated_target(state, mesh):
    """The restore target of ``state``: its shapes and dtypes, replicated over ``mesh``."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shapes = jax.eval_shape(lambda s: s, state)
    return abstract_target(shapes, jax.tree.map(lambda _: replicated, shapes))


class Checkpointer:
    """Saves every ``every_steps`` steps (and when forced), keeps the newest ``keep``, restores.

    Saves are asynchronous: `save` returns once the arrays are copied off the devices, and the files
    are written in the background while training goes on. Call `close` (or `wait`) before the
    process exits.
    """

    def __init__(self, directory, *, every_steps: int, keep: int, async_save: bool = True):
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            # A step's save decision is ours (every_steps, end of run, preemption), not Orbax's.
            save_interval_steps=1,
        )
        self._manager = ocp.CheckpointManager(
            directory,
            item_names=(STATE, DATA_POSITION, CONFIG),
            options=options,
        )
        self._saving: int | None = None  # the step whose save was started last
        self._failed = False

    @property
    def directory(self) -> str:
        return str(self._manager.directory)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def due(self, step: int) -> bool:
        return step % self.every_steps == 0

    def save(self, step: int, state, *, data_position=None, config=None) -> None:
        """Starts saving ``state`` (and the input position and the run's settings, JSON-able
        dicts) as checkpoint ``step``."""
        items = {STATE: ocp.args.StandardSave(state)}
        if data_position is not None:
            items[DATA_POSITION] = ocp.args.JsonSave(data_position)
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(config)
        # An earlier asynchronous save that failed raises here: it is the one named, unless it
        # is complete (then what fails is this save).
        earlier = self._saving
        if earlier is None or earlier in self._complete_steps():
            earlier = step
        with self._reporting_save_failures(earlier):
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
            self._saving = step

    def restore(self, step: int, abstract_state):
        """The state of checkpoint ``step`` laid out as ``abstract_state`` says.

        ``abstract_state`` is a pytree of `jax.ShapeDtypeStruct` with shardings (see
        `abstract_target`).
        """
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)})
        )
        return restored[STATE]

    def restore_latest(self, abstract_state):
        """``(step, state)`` of the newest checkpoint that restores, ``(None, None)`` without any.

        A step restores when its state (laid out as ``abstract_state``) and its input position are
        read without error. Once an older step restored, each newer one that failed is reported in
        one line and moved aside as ``<step>.damaged-<n>``, so the resumed run saves that step
        afresh next to the damaged copy. When no step restores, nothing is moved and
        `NoRestorableCheckpointError` lists every step with its error.
        """
        failures = []
        for step in sorted(self.all_steps(), reverse=True):
            state, failure, differences = None, None, []
            # The error is dropped inside the block, so what it holds on to is collected there.
            with _SilencedNoise() as noise:
                try:
                    # Its arrays' names and shapes first: a checkpoint of another configuration is
                    # not damaged, and must neither be moved aside nor pass for damage.
                    differences = self.state_differences(step, abstract_state)
                    if not differences:
                        state = self.restore(step, abstract_state)
                        self.restore_data_position(step)
                except Exception as error:  # any failure to read: try an older step
                    failure = _one_line(error)
                    noise.failed()
            if differences:
                raise StateMismatchError(step, self.directory, differences)
            if jax.process_count() > 1:
                # All processes resume from the same step: a failure on one rules it out for all.
                restored = multihost_utils.process_allgather(np.array(failure is None))
                if failure is None and not restored.all():
                    failure = "it failed to restore on another process"
            if failure is not None:
                failures.append((step, failure))
                continue
            for failed_step, reason in failures:
                moved_to = self._move_aside(failed_step)
                logging.warning(
                    "checkpoint step %d does not restore (%s); moved to %s, resuming from step %d",
                    failed_step,
                    reason,
                    moved_to,
                    step,
                )
            return step, state
        if failures:
            listed = "; ".join(f"step {step}: {reason}" for step, reason in failures)
            raise NoRestorableCheckpointError(
                f"no checkpoint in {self.directory} restores ({listed}); move the folder away to "
                "start afresh"
            )
        return None, None

    def _move_aside(self, step: int) -> str:
        """Renames checkpoint ``step`` to the first free ``<step>.damaged-<n>``; returns that."""
        directory = self._manager.directory
        number = 1
        while (directory / f"{step}{DAMAGED_SUFFIX}{number}").exists():
            number += 1
        target = directory / f"{step}{DAMAGED_SUFFIX}{number}"
        several = jax.process_count() > 1
        if several:  # every process has chosen the same name before the folder moves
            multihost_utils.sync_global_devices(f"caco_jax_damaged_{step}_named")
        if jax.process_index() == 0:
            (directory / str(step)).rename(target)
        if several:  # and sees it moved before Orbax lists the steps again
            multihost_utils.sync_global_devices(f"caco_jax_damaged_{step}_moved")
        self._manager.reload()
        return str(target)

    def state_differences(self, step: int, abstract_state) -> list[str]:
        """The arrays of ``abstract_state`` whose name, shape or type checkpoint ``step`` does not
        hold (read from its metadata, no array data), as ``"<path>: saved <shape> <dtype>, now
        <shape> <dtype>"``; [] when they all match."""
        metadata = ocp.StandardCheckpointHandler().metadata(
            self._manager.directory / str(step) / STATE
        )
        saved = _flat_shapes(metadata.tree)
        wanted = _flat_shapes(abstract_state)
        differences = []
        for path in sorted(set(saved) | set(wanted)):
            if path not in saved:
                differences.append(f"{path}: not saved, now {_shape_text(wanted[path])}")
            elif path not in wanted:
                differences.append(f"{path}: saved {_shape_text(saved[path])}, not in the state")
            elif saved[path] != wanted[path]:
                differences.append(
                    f"{path}: saved {_shape_text(saved[path])}, now {_shape_text(wanted[path])}"
                )
        return differences

    def restore_config(self, step: int) -> dict | None:
        """The run's config saved with checkpoint ``step``; None without one (or unreadable)."""
        if not (self._manager.directory / str(step) / CONFIG).exists():
            return None
        try:
            with _SilencedNoise() as noise:
                try:
                    restored = self._manager.restore(
                        step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})
                    )
                except Exception:
                    noise.failed()
                    raise
        except Exception:  # damaged: the state's own restore decides what becomes of the step
            return None
        return restored[CONFIG]

    def restore_data_position(self, step: int) -> dict:
        """The input position saved with checkpoint ``step`` (`data.pipeline.Position` JSON)."""
        if not (self._manager.directory / str(step) / DATA_POSITION).exists():
            raise FileNotFoundError(
                f"checkpoint {step} in {self.directory} has no {DATA_POSITION}: it was not written "
                "by caco_jax pretraining"
            )
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{DATA_POSITION: ocp.args.JsonRestore()})
        )
        return restored[DATA_POSITION]

    def reached_preemption(self, step: int) -> bool:
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        with self._reporting_save_failures(self._saving):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the save in flight and closes; after a failed save, only closes (quietly:
        the failure was reported once)."""
        if self._failed:
            with _SilencedNoise() as noise, contextlib.suppress(Exception):
                noise.failed()
                self._manager.close()
            return
        self.wait()
        self._manager.close()

    @contextlib.contextmanager
    def _reporting_save_failures(self, step):
        """Turns Orbax's error of a failed save into one CheckpointSaveError naming the step, the
        root cause and the newest complete checkpoint."""
        try:
            yield
        except Exception as error:
            self._failed = True
            cause = errors.root_cause(error)
            text = _one_line(cause)
            if len(text) > 400:  # the file TensorStore names and, at the end, why it failed
                text = f"{text[:220]} ... {text[-160:]}"
            full = "out of disk space: " if errors.disk_full(error) else ""
            complete = self._complete_steps()
            kept = f"step {complete[-1]}" if complete else "none"
            raise CheckpointSaveError(
                f"checkpoint step {step if step is not None else '?'} could not be written to "
                f"{self.directory} ({full}{text}); training stopped. The newest complete "
                f"checkpoint is {kept}: free space or fix the folder, then rerun to resume from it"
            ) from error

    def _complete_steps(self) -> list[int]:
        """The steps whose folders are in place (complete: Orbax renames a step when whole)."""
        try:
            names = [path.name for path in self._manager.directory.iterdir()]
        except OSError:
            return []
        return sorted(int(name) for name in names if name.isdigit())


def _flat_shapes(tree) -> dict[str, tuple]:
    """{"a/b/c": (shape, dtype name)} of the array leaves of a pytree (a state, an abstract state
    or Orbax's metadata tree, whose dataclass nodes are dicts of their fields)."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not hasattr(leaf, "shape"):
            continue
        names = []
        for key in path:
            for attribute in ("name", "key", "idx"):
                if hasattr(key, attribute):
                    names.append(str(getattr(key, attribute)))
                    break
        flat["/".join(names)] = (tuple(leaf.shape), np.dtype(leaf.dtype).name)
    return flat


def _shape_text(shape_dtype: tuple) -> str:
    shape, dtype = shape_dtype
    return f"{list(shape)} {dtype}"


def _one_line(error: BaseException) -> str:
    """The innermost cause of ``error``, as ``Type: first line`` (TensorStore's own message)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


class _Held(std_logging.Filter):
    """Holds back the records of a logger while installed."""

    def __init__(self):
        super().__init__()
        self.records = []

    def filter(self, record):
        self.records.append(record)
        return False


class _SilencedNoise:
    """Keeps a restore attempt to the one line `restore_latest` writes about it.

    A read error inside Orbax's asynchronous restore brings warnings, log records and, when its
    event loop is torn down, "Event loop is closed" errors from tasks and coroutines collected
    later. Inside the block those go nowhere, and what the attempt left behind is collected before
    it ends. The log records are replayed at the end unless `failed` was called, so nothing worth
    seeing from a good restore is lost.
    """

    def __enter__(self):
        self._held = {std_logging.getLogger(name): _Held() for name in ("absl", "asyncio")}
        for logger, hold in self._held.items():
            logger.addFilter(hold)
        self._hooks = sys.unraisablehook, threading.excepthook
        sys.unraisablehook = threading.excepthook = lambda _: None
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        self._replay = True
        return self

    def failed(self) -> None:
        self._replay = False

    def __exit__(self, *exc):
        gc.collect()  # what a failed attempt left behind is reported now, while silenced
        self._warnings.__exit__(*exc)
        sys.unraisablehook, threading.excepthook = self._hooks
        for logger, hold in self._held.items():
            logger.removeFilter(hold)
            if self._replay and exc[0] is None:
                for record in hold.records:
                    logger.handle(record)
        return False


class QuietSaveFailures:
    """Inside the block, the reports that Orbax's background save threads make of a failed save
    are held back: error log records of the `absl` and `asyncio` loggers, exceptions of threads,
    and the "Exception ignored" reports of coroutines that die with the event loop. A full disk
    gave thousands of such lines (2,648, with 317 tracebacks, the cause on line 5) before. The
    main thread meets the failure at its next save (`CheckpointSaveError`, one line). When the
    block ends without one, what was held is replayed; after one, it is dropped (`run.py` also
    silences what the dying save threads report while the process ends: `errors.report`)."""

    def __enter__(self):
        self._held = {std_logging.getLogger(name): _HeldErrors() for name in ("absl", "asyncio")}
        for logger, hold in self._held.items():
            logger.addFilter(hold)
        self._hooks = sys.unraisablehook, threading.excepthook
        self._thread_errors, self._unraisable = [], []
        threading.excepthook = self._thread_error
        sys.unraisablehook = self._unraisable.append
        return self

    def _thread_error(self, args) -> None:
        if _from_saving(args.exc_traceback, args.exc_value):
            self._thread_errors.append(args)
        else:  # another thread's failure is reported as it happens
            self._hooks[1](args)

    def __exit__(self, exc_type, exc, traceback):
        failed = isinstance(exc, CheckpointSaveError)
        for logger, hold in self._held.items():
            logger.removeFilter(hold)
            if not failed:
                for record in hold.records:
                    logger.handle(record)
        if failed:
            gc.collect()  # the failed save's coroutines, while still silenced
        sys.unraisablehook, threading.excepthook = self._hooks
        if failed:
            return False
        for args in self._thread_errors:
            threading.excepthook(args)
        for args in self._unraisable:
            sys.unraisablehook(args)
        return False


def _from_saving(traceback, error) -> bool:
    """Whether an error comes from Orbax's or asyncio's code (a save in the background)."""
    while traceback is not None:
        name = traceback.tb_frame.f_code.co_filename
        if "orbax" in name or "asyncio" in name:
            return True
        traceback = traceback.tb_next
    return "orbax" in str(error).lower() or "event loop is closed" in str(error).lower()


class _HeldErrors(std_logging.Filter):
    """Holds back the error records of Orbax's save threads and of asyncio's tasks."""

    def __init__(self):
        super().__init__()
        self.records = []

    def filter(self, record):
        if record.levelno < std_logging.ERROR:
            return True
        saving = record.name == "asyncio" or "orbax" in record.pathname
        if not saving:
            return True
        self.records.append(record)
        return False


class PreemptionGuard:
    """Turns SIGTERM (a pod or cluster preemption notice) into a request to save and stop.

    Inside the ``with`` block a SIGTERM no longer kills the process; `should_stop(step)` turns True
    at the next step, when the loop saves a checkpoint and exits cleanly. With several processes a
    SIGTERM to any one of them stops them all at the same step: `jax.distributed.initialize` has
    JAX's preemption notifier catch SIGTERM (so no Python handler may replace it here), the
    processes agree on a step through the coordination service, and `should_stop` (Orbax
    `reached_preemption`) turns True at that step on every process. The loop must ask at every
    step.
    """

    def __init__(self, manager: Checkpointer):
        self._manager = manager
        self._requested = threading.Event()
        self._previous = None

    def __enter__(self):
        single = jax.process_count() == 1
        if single and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    def _on_sigterm(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint at the next step, then stopping.")
        self._requested.set()

    def request_stop(self) -> None:
        """What a SIGTERM does; with several processes, a SIGTERM to this one (see the class)."""
        if jax.process_count() > 1:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self._requested.set()

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            # A local flag could differ between hosts; only the synchronised answer is safe.
            return self._manager.reached_preemption(step)
        return self._requested.is_set()
