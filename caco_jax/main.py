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

import json
import os
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
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from caco_jax import config as config_lib
    from caco_jax import tasks
    from caco_jax.runtime import multihost, storage
    from caco_jax.runtime.workdir import Workdir
    from caco_jax.settings import SettingsError

    if not flags.FLAGS["verbosity"].present:
        # Orbax and grain log every checkpoint operation at INFO; `--verbosity=0` shows them.
        logging.set_verbosity(logging.WARNING)
    try:
        settings = config_lib.resolve(_CONFIG.value)
    except SettingsError as error:
        raise app.UsageError(str(error)) from None
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
        raise app.UsageError(
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
        sys.exit(f"run.py: --workdir {workdir} is a file; expected a folder (existing or new)")
    root.mkdir(parents=True, exist_ok=True)
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
            results[name] = _run_task(name, settings, workdir, process)
        except BaseException as error:
            if process.count > 1:  # the peers must not wait for this process
                multihost.exit_after_failure(error)
            raise
        report(f"== {name} done in {time.perf_counter() - start:.1f}s", flush=True)
    if process.primary:
        storage.path(workdir.results).write_text(json.dumps(results, indent=2, default=str))
    report(json.dumps(results, indent=2, default=str))


def _run_task(name, settings, workdir, process) -> dict:
    from caco_jax import tasks
    from caco_jax.runtime import checkpointing

    try:
        return tasks.run(
            name, settings, workdir, process_index=process.index, process_count=process.count
        )
    except checkpointing.NoRestorableCheckpointError as error:
        sys.exit(f"run.py: {error}")


def parse_flags(argv):
    """absl's parser, with packaged configs by name and one-line errors for bad flags and
    overrides of missing config keys."""
    argv = with_config_path(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"{_program(argv)}: {error}")
    except (KeyError, AttributeError) as error:
        key = str(error).strip("\"'")
        sys.exit(
            f"{_program(argv)}: a --config.* override names {key!r}, which the config does not have"
        )


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


def run() -> None:
    """The command line: `python run.py ...` or `caco-jax ...`."""
    from caco_jax import config_files

    if any(arg in ("-h", "--help", "-?", "--usage") for arg in sys.argv[1:]) or len(sys.argv) < 2:
        print(config_files.usage(_program(sys.argv)))
        sys.exit(0 if len(sys.argv) > 1 else 2)
    # config_flags reads the overrides from sys.argv: it must see the same arguments.
    sys.argv = with_config_path(sys.argv)
    app.run(main, flags_parser=parse_flags)
