"""One run over several hosts: a JAX process per host (TPU pod slices, multi-node GPU clusters).

Every process runs the same command (`run.py --multihost` or the explicit coordinator flags) with
the same workdir on storage that all hosts share. Only process 0 writes the synthetic archive and
prepares the records; each other process waits for the prepared dataset (at most
`config.data.wait_seconds`) instead. Before pretraining every process fingerprints the dataset it
sees (its `dataset_info.json` and `metadata.json`) and all of them stop, naming the processes that
differ, unless the fingerprints agree. Pretraining itself runs on all processes together; only
process 0 prints, logs and writes results (metrics_writer, the change histograms and labels, the
encoder export and `results.json` all check `jax.process_index()`).

The evaluators run in one process; a multi-process run lists only `MULTIHOST_TASKS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable

from caco_jax import tasks

MULTIHOST_TASKS = ("synthesize", "prepare", "pretrain")
_POLL_SECONDS = 0.5


class DatasetWaitError(RuntimeError):
    """Process 0's prepared dataset did not appear in time."""


class DatasetMismatchError(RuntimeError):
    """The processes see different datasets."""


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
) -> Process:
    """Joins the multi-process run: `jax.distributed.initialize` with the values given, JAX
    detecting the others (Cloud TPU, SLURM, Open MPI, Kubernetes). Nothing when `auto` is False and
    no value is given: a single-process run does not even import JAX here."""
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

    jax.distributed.initialize(**explicit)
    return Process(jax.process_index(), jax.process_count())


def check_tasks(task_names, process: Process) -> None:
    """Raises ValueError naming a task that cannot run in a multi-process run."""
    if process.count == 1:
        return
    for name in task_names:
        if name not in MULTIHOST_TASKS:
            raise ValueError(
                f"config.tasks: {name!r} runs in one process; a multi-process run does "
                f"{', '.join(MULTIHOST_TASKS)} (evaluate afterwards without --multihost)"
            )


def task(name: str, process: Process) -> Callable[[object, str], dict]:
    """The function that runs task `name` in this process (see the module docstring)."""
    if process.count == 1:
        return tasks.get(name)
    if name == "pretrain":
        return _after_dataset_check(tasks.get(name))
    if process.primary:
        return tasks.get(name)
    if name == "prepare":
        return lambda config, workdir: wait_for_dataset(config, workdir, process)
    return lambda config, workdir: {"skipped": "process 0 runs this task"}


def data_dir(config, workdir: str) -> str:
    return config.data.data_dir or os.path.join(workdir, "tfds")


def wait_for_dataset(config, workdir: str, process: Process, poll_seconds=_POLL_SECONDS) -> dict:
    """Waits until the records of `config.data` are prepared (by process 0), at most
    `config.data.wait_seconds`; raises DatasetWaitError naming the folder otherwise."""
    from caco_jax.data import builder as builder_lib

    directory = data_dir(config, workdir)
    builder = builder_lib.CacoGeography(config=config.data.builder_config, data_dir=directory)
    # TFDS prepares in a temporary folder and renames it when complete, dataset_info.json inside.
    info = builder.data_path / "dataset_info.json"
    start = time.monotonic()
    while not info.exists():
        if time.monotonic() - start >= config.data.wait_seconds:
            raise DatasetWaitError(
                f"process {process.index}: no prepared caco_geography/"
                f"{config.data.builder_config} records in {directory} after "
                f"{config.data.wait_seconds:g} s (config.data.wait_seconds); process 0 prepares "
                "them there: is that folder on storage every host shares, and did process 0 fail?"
            )
        time.sleep(poll_seconds)
    return {"data_dir": directory, "waited_seconds": round(time.monotonic() - start, 1)}


def dataset_fingerprint(config, workdir: str) -> str:
    """SHA-256 of the prepared dataset's description (`dataset_info.json`, `metadata.json`)."""
    from caco_jax.data import builder as builder_lib

    builder = builder_lib.CacoGeography(
        config=config.data.builder_config, data_dir=data_dir(config, workdir)
    )
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{builder.data_dir}: no prepared caco_geography/{config.data.builder_config} records"
        )
    digest = hashlib.sha256()
    for name in ("dataset_info.json", "metadata.json"):
        path = builder.data_path / name
        digest.update(name.encode())
        digest.update(path.read_bytes() if path.exists() else b"(none)")
    return digest.hexdigest()


def check_same_dataset(config, workdir: str) -> None:
    """Every process compares the fingerprints of all; all raise DatasetMismatchError together."""
    import numpy as np
    from jax.experimental import multihost_utils

    mine = dataset_fingerprint(config, workdir)
    everyone = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(mine), np.uint8))
    fingerprints = [bytes(row).hex() for row in np.asarray(everyone)]
    differing = [i for i, f in enumerate(fingerprints) if f != fingerprints[0]]
    if differing:
        raise DatasetMismatchError(
            f"processes {differing} see another caco_geography/{config.data.builder_config} "
            f"dataset in {data_dir(config, workdir)} than process 0 (fingerprints of "
            "dataset_info.json and metadata.json differ): every host must read the same "
            "prepared records"
        )


def _after_dataset_check(run_task):
    def run(config, workdir):
        check_same_dataset(config, workdir)
        return run_task(config, workdir)

    return run
