r"""Runs the tasks a config lists: build the synthetic archive, prepare records, pretrain, evaluate.

  python run.py --config demo --workdir workdir/demo
  caco-jax --config pretrain:caco,r18,100k --config.data.archive=/data/caco ...
  caco-jax --config configs/demo.py --print_config

`run.py` (a checkout) and the `caco-jax` command (an installed package) are this module's `run`.
A config is named (`demo`, `pretrain:caco,r18,100k`: the packaged configs, `config_files`) or given
by path; any value can be overridden with `--config.<key>=<value>`. `--help` lists the configs, the
tasks and the official encoders.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "A packaged config's name or a config file (name_or_file[:arg]).",
    lock_config=True,
)
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config (defaults and overrides) as JSON and exit."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for outputs; default workdir/<config name>."
)
_MULTIHOST = flags.DEFINE_bool(
    "multihost",
    False,
    "One process of a multi-host run: jax.distributed.initialize() detects the cluster (Cloud TPU, "
    "SLURM, Open MPI, Kubernetes). See docs/running.md.",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 in a multi-host run (any cluster)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in a multi-host run.", lower_bound=1
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in a multi-host run.", lower_bound=0
)
_PEER_TIMEOUT_SECONDS = flags.DEFINE_integer(
    "peer_timeout_seconds",
    60,
    "Multi-host run: seconds without a sign of life after which a process is taken for lost and "
    "every other process stops with one line naming it (JAX's heartbeat timeout, the backstop, is "
    "twice that). See docs/reliability.md.",
    lower_bound=2,
)
flags.mark_flags_as_required(["config"])
flags.register_multi_flags_validator(
    ["num_processes", "process_id"],
    lambda f: None in (f["num_processes"], f["process_id"]) or f["process_id"] < f["num_processes"],
    message="--process_id must be below --num_processes",
)


def main(argv):
    from caco_jax import config as config_lib
    from caco_jax import tasks
    from caco_jax.runtime import errors, multihost
    from caco_jax.runtime.workdir import Workdir
    from caco_jax.settings import SettingsError

    if len(argv) > 1:
        raise errors.UserError(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    if not flags.FLAGS["verbosity"].present:
        # Orbax and grain log every checkpoint operation at INFO; `--verbosity=0` shows them.
        logging.set_verbosity(logging.WARNING)
    settings = config_lib.resolve(_loaded_config())
    if _PRINT_CONFIG.value:
        print(json.dumps(settings.to_dict(), indent=2))
        return
    process = multihost.initialize(
        auto=_MULTIHOST.value,
        coordinator_address=_COORDINATOR_ADDRESS.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
        peer_timeout_seconds=_PEER_TIMEOUT_SECONDS.value,
    )
    refused = tasks.multiprocess_refusals(settings.tasks) if process.count > 1 else []
    if refused:
        raise SettingsError(
            f"config.tasks: {refused} run in one process; a run of several processes does "
            "synthesize, prepare and pretrain (evaluate afterwards without --multihost)"
        )
    workdir = Workdir(
        _WORKDIR.value
        or os.path.join(
            "workdir", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
        )
    )
    root = workdir.path()  # a local folder or a bucket URL
    if root.exists() and not root.is_dir():
        raise errors.UserError(
            f"--workdir {workdir} is a file; expected a folder (existing or new)"
        )
    root.mkdir(parents=True, exist_ok=True)
    with _workdir_lock(workdir, process):
        _run_tasks(settings, workdir, process)


@contextlib.contextmanager
def _workdir_lock(workdir, process):
    """The workdir's lock (`runtime.locks`): one run writes into a workdir at a time; in a run of
    several processes process 0 holds it for all, and its refusal ends them all."""
    from caco_jax.runtime import locks, multihost

    lock = locks.workdir_lock(workdir) if process.primary else locks.NO_LOCK
    try:
        lock.__enter__()
    except BaseException as error:
        if process.count > 1:  # the peers must not wait for this process
            multihost.exit_after_failure(error)
        raise
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _run_tasks(settings, workdir, process) -> None:
    from caco_jax import tasks
    from caco_jax.runtime import multihost, storage

    # Every process runs every task as the task table says; only process 0 reports.
    report = print if process.primary else lambda *args, **kwargs: None
    report(f"workdir: {workdir}", flush=True)
    if process.count > 1:
        report(f"{process.count} processes", flush=True)
    results = {}
    for name in settings.tasks:
        start = time.perf_counter()
        report(f"== {name}", flush=True)
        try:
            results[name] = tasks.run(
                name, settings, workdir, process_index=process.index, process_count=process.count
            )
        except BaseException as error:
            if process.count > 1:  # the peers must not wait for this process
                multihost.exit_after_failure(error)
            raise
        report(f"== {name} done in {time.perf_counter() - start:.1f}s", flush=True)
    if process.primary:
        storage.path(workdir.results).write_text(json.dumps(results, indent=2, default=str))
    report(json.dumps(results, indent=2, default=str))


def parse_flags(argv):
    """absl's parser, with packaged configs by name and one-line errors (`runtime.errors`) for bad
    flags, overrides of missing config keys and config files that do not load."""
    from caco_jax.runtime import errors

    argv = with_config_path(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        message = str(error)
        if "Traceback (most recent call last)" in message and not os.environ.get(
            errors.TRACEBACK_ENV
        ):  # a config file whose get_config raised: its first line and the error it ends with
            lines = [line.strip() for line in message.splitlines() if line.strip()]
            message = f"{lines[0]} {lines[-1]} ({errors.TRACEBACK_ENV}=1 shows the traceback)"
    except (KeyError, AttributeError) as error:
        message = _unknown_override(argv, error)
    print(f"{_program(argv)}: {message}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_STATUS)


def _loaded_config():
    """The config `--config` names; a file that does not load is one line (ml_collections loads
    it on first use and reports a missing file in several lines)."""
    from caco_jax.runtime import errors

    try:
        config = _CONFIG.value
        getattr(config, "tasks", None)  # a file that did not load raises on first use
        return config
    except OSError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise errors.UserError(
            f"--config {flags.FLAGS['config'].config_filename}: the config file does not load "
            f"({lines[-1] if lines else type(error).__name__})"
        ) from error


def _unknown_override(argv, error) -> str:
    """One line for ml_collections' KeyError of an override naming a key the config lacks: the
    override's whole key, and ml_collections' suggestion."""
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a repr, maybe nested
        try:
            text = ast.literal_eval(text)
        except (SyntaxError, ValueError):
            break
    name = text.splitlines()[0].strip("\"'") if text.strip() else "?"
    keys = [a.split("=", 1)[0].removeprefix("--config.") for a in argv if a.startswith("--config.")]
    key = next((k for k in keys if name in k.split(".")), name)
    suggested = re.search(r'Did you mean "([^"]+)"', text)
    hint = ""
    if suggested:
        hint = (
            " (did you mean config."
            + ".".join(suggested[1] if part == name else part for part in key.split("."))
            + "?)"
        )
    return f"--config.{key}: the config has no key {name!r}{hint}"


def with_config_path(argv: list[str]) -> list[str]:
    """``argv`` with a packaged config's name after ``--config`` replaced by its file's path."""
    from caco_jax import config_files

    resolved = list(argv)
    for index, arg in enumerate(resolved):
        if arg.startswith("--config="):
            resolved[index] = "--config=" + config_files.resolve_path(arg[len("--config=") :])
        elif arg == "--config" and index + 1 < len(resolved):
            resolved[index + 1] = config_files.resolve_path(resolved[index + 1])
    return resolved


def _program(argv) -> str:
    return os.path.basename(argv[0]) if argv else "caco-jax"


def _main_reporting_errors(argv):
    """`main`, ending with one line and status 2 on an expected error (`runtime.errors`)."""
    from caco_jax.runtime import errors

    try:
        main(argv)
    except (Exception, KeyboardInterrupt) as error:
        status = errors.report(error, _program(argv))
        errors.silence_exit_noise()
        sys.exit(status)


def run() -> None:
    """The command line: `python run.py ...` or `caco-jax ...`."""
    from caco_jax import config_files

    if any(arg in ("-h", "--help", "-?", "--usage") for arg in sys.argv[1:]) or len(sys.argv) < 2:
        print(config_files.usage(_program(sys.argv)))
        sys.exit(0 if len(sys.argv) > 1 else 2)
    # config_flags reads the overrides from sys.argv: it must see the same arguments.
    sys.argv = with_config_path(sys.argv)
    app.run(_main_reporting_errors, flags_parser=parse_flags)
