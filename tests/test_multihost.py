"""run.py over two JAX processes on localhost (caco_jax/multihost.py), as on two hosts.

Two `run.py` processes with the explicit coordinator flags (2 CPU devices each) run
configs/smoke.py's synthesize, prepare and pretrain tasks into one workdir: process 0 alone writes
the archive, the records, the logs and results; together they train and save a checkpoint, which a
single process then resumes.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from caco_jax import config as config_lib
from caco_jax import multihost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 locations: one caco batch of 8 items per epoch.
SMALL = ("--config.synthetic.num_locations=4", "--config.data.num_workers=1")
QUIET = ("--config.logging.progress_bar=False",)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_py(workdir, *args, devices=2):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        # Unoptimised CPU code compiles in about half the time; a step or two runs as fast.
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
    }
    command = [sys.executable, "run.py", "--config", "configs/smoke.py", "--workdir", workdir]
    return subprocess.Popen(
        [*command, *SMALL, *QUIET, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(processes, timeout=300):
    outputs = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]
            outputs.append(stdout)
    finally:  # a failed process must not leave its partner waiting for it
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return outputs


def logged_steps(workdir):
    """The steps of metrics.jsonl's per-step lines (those with a learning rate), in file order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [line["step"] for line in lines if "learning_rate" in line]


def test_two_processes_prepare_once_train_together_and_one_process_resumes(tmp_path):
    workdir = str(tmp_path / "w")
    port = free_port()
    outputs = finish(
        [
            run_py(
                workdir,
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                "--config.train.max_steps=1",
                "--config.checkpoint.every_steps=1",
            )
            for i in range(2)
        ]
    )
    primary, secondary = outputs
    assert "== prepare" in primary and "2 processes" in primary
    # Only process 0 reports (Gloo, JAX's CPU collectives, prints its connections on stdout).
    assert [line for line in secondary.splitlines() if not line.startswith("[Gloo]")] == []
    # Written once: one archive, one dataset, one results.json from process 0.
    assert sorted(os.listdir(os.path.join(workdir, "synthetic_archive"))) == [
        "clean_synthetic_geography",
        "clean_synthetic_geography_ground_truth.csv",
    ]
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["synthesize"]["written"] is True
    assert results["prepare"]["locations_written"] == 4
    assert logged_steps(workdir) == [1]  # one writer: the step's metrics once
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]

    (resumed,) = finish(
        [run_py(workdir, "--config.tasks=('pretrain',)", "--config.train.max_steps=2")]
    )
    assert "resumed from checkpoint step 1" in resumed, resumed[-2000:]
    assert logged_steps(workdir) == [1, 2]


def test_a_waiting_process_stops_with_one_line_naming_the_folder_and_the_key(tmp_path):
    config = config_lib.for_tasks("prepare")
    config.data.wait_seconds = 0.2
    with pytest.raises(multihost.DatasetWaitError) as error:
        multihost.wait_for_dataset(
            config, str(tmp_path), multihost.Process(index=1, count=2), poll_seconds=0.05
        )
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "tfds") in message and "config.data.wait_seconds" in message
    assert message.startswith("process 1:")


def test_a_multi_process_run_refuses_tasks_that_run_in_one_process():
    multihost.check_tasks(("synthesize", "prepare", "pretrain"), multihost.Process(0, 2))
    multihost.check_tasks(("linear_probe",), multihost.Process(0, 1))
    with pytest.raises(ValueError, match=r"config\.tasks: 'linear_probe' runs in one process"):
        multihost.check_tasks(("pretrain", "linear_probe"), multihost.Process(1, 2))
