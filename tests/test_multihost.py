"""run.py over two JAX processes on localhost (caco_jax/runtime/multihost.py), as on two hosts.

Two `run.py` processes with the explicit coordinator flags (2 CPU devices each) run
configs/smoke.py's synthesize, prepare and pretrain tasks into one workdir: process 0 alone writes
the archive, the records, the logs and results; together they train, and a SIGTERM to process 1
alone stops both at one saved step. Two processes resume from it, process 1 is killed and process 0
stops within seconds with one line; every checkpoint left behind restores in a single process, and
a single run.py process resumes the newest. The runs share a compilation cache, so the later ones
compile little.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import free_port, write_band_files, xla_flags

from caco_jax import config as config_lib
from caco_jax import tasks
from caco_jax.data import dataset
from caco_jax.pretrain import train
from caco_jax.runtime import checkpointing, multihost
from caco_jax.runtime import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 locations: one caco batch of 8 items per epoch; a width-8 ResNet-10 (the test is about the
# processes, not the network).
SMALL = (
    "--config.synthetic.num_locations=4",
    "--config.data.num_workers=1",
    "--config.model.depth=10",
    "--config.model.width=8",
)
QUIET = ("--config.logging.progress_bar=False",)
# Enough steps that a run is still training when a test signals it.
LONG = (
    "--config.train.epochs=30",
    "--config.train.max_steps=30",
    "--config.checkpoint.every_steps=1",
)


def run_py(workdir, *args, devices=2):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        # The suite's compile flags; the compilation cache is this pytest process's (conftest.py).
        "XLA_FLAGS": xla_flags(devices),
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


def two_processes(workdir, *args):
    port = free_port()
    return [
        run_py(
            workdir,
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            *args,
        )
        for i in range(2)
    ]


def wait_for_checkpoint(workdir, step, processes, timeout=600):
    """Waits until checkpoint `step` is complete (Orbax renames it to `<step>` when it is)."""
    path = os.path.join(workdir, "checkpoints", str(step))
    deadline = time.monotonic() + timeout
    while not os.path.isdir(path):
        for process in processes:
            if process.poll() is not None:
                finish(processes)  # fails with the output of the process that stopped
                pytest.fail(f"the run ended before checkpoint {step}")
        if time.monotonic() > deadline:
            kill_all(processes)
            pytest.fail(f"no checkpoint {step} after {timeout} s")
        time.sleep(0.2)


def finish(processes, timeout=300):
    outputs = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]
            outputs.append(stdout)
    finally:  # a failed process must not leave its partner waiting for it
        kill_all(processes)
    return outputs


def kill_all(processes):
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


def logged_steps(workdir):
    """The steps of metrics.jsonl's per-step lines (those with a learning rate), in file order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [line["step"] for line in lines if "learning_rate" in line]


def test_two_processes_prepare_once_stop_together_resume_and_a_lost_one_stops_the_other(tmp_path):
    workdir = str(tmp_path / "w")
    processes = two_processes(workdir, *LONG)
    wait_for_checkpoint(workdir, 1, processes)
    # A preemption notice to one host: every host saves the same step and exits cleanly.
    processes[1].send_signal(signal.SIGTERM)
    primary, secondary = finish(processes)
    assert "== prepare" in primary and "2 processes" in primary
    # Only process 0 reports. Gloo, JAX's CPU collectives, prints its connections on stdout from
    # several threads, whose pieces can interleave: nothing else may be left.
    gloo = (
        r"\[Gloo\] Rank | is connected to "
        r"| peer ranks\. Expected number of connected peer ranks is : "
    )
    assert re.sub(rf"{gloo}|\d+|\s", "", secondary) == "", secondary
    # Written once: one archive, one dataset, one results.json from process 0.
    assert sorted(os.listdir(os.path.join(workdir, "synthetic_archive"))) == [
        "clean_synthetic_geography",
        "clean_synthetic_geography_ground_truth.csv",
    ]
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["synthesize"]["written"] is True
    assert results["prepare"]["locations_written"] == 4
    stopped = results["pretrain"]["steps"]
    assert results["pretrain"]["stopped_early"] and 1 < stopped < 30
    assert logged_steps(workdir) == list(range(1, stopped + 1))  # one writer: each step once
    checkpoints = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), every_steps=1, keep=3
    )
    assert checkpoints.latest_step() == stopped
    assert checkpoints.restore_data_position(stopped)["next_global_batch"] == stopped
    checkpoints.close()

    # Both resume from that step; process 1 is killed once they saved another.
    processes = two_processes(
        workdir, "--config.tasks=('pretrain',)", "--peer_timeout_seconds=15", *LONG
    )
    wait_for_checkpoint(workdir, stopped + 1, processes)
    processes[1].kill()
    killed = time.monotonic()
    try:
        resumed, stderr = processes[0].communicate(timeout=120)
    finally:
        kill_all(processes)
    assert f"resumed from checkpoint step {stopped}" in resumed, resumed[-2000:]
    assert logged_steps(workdir)[: stopped + 1] == list(range(1, stopped + 2))  # continued
    assert processes[0].returncode == 1, stderr[-4000:]
    assert time.monotonic() - killed < 60
    lines = stderr.strip().splitlines()
    # Named when the peer watch notices first; a collective that fails at once names no one.
    assert re.match(
        r"run\.py: process 0 of 2 lost contact with (process 1|another process) \(.*\); it died, "
        r"hangs or was stopped: see its log\. Stopping without saving; rerun every process",
        lines[-1],
    ), stderr[-4000:]
    assert len(lines) < 10, stderr[-4000:]

    # Every checkpoint Orbax counts as complete restores, here in one process on one device; what
    # the kill cut short is not counted.
    checkpoints = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), every_steps=1, keep=3
    )
    steps = checkpoints.all_steps()
    assert max(steps) > stopped
    for name in os.listdir(checkpoints.directory):
        assert (name.isdigit() and int(name) in steps) or "tmp" in name, name
    mesh = mesh_lib.data_mesh(jax.devices()[:1])
    run = train.setup(config_lib.resolve(smoke_config()), 4, mesh=mesh)
    target = checkpointing.replicated_target(mesh_lib.replicate(run.initial_state, mesh), mesh)
    for step in steps:
        assert int(checkpoints.restore(step, target).step) == step
        assert checkpoints.restore_data_position(step)["next_global_batch"] == step
    checkpoints.close()

    # One process (with the 4 devices the two had) resumes the newest and trains one more step.
    newest = max(steps)
    single = run_py(
        workdir,
        "--config.tasks=('pretrain',)",
        f"--config.train.max_steps={newest + 1}",
        "--config.train.epochs=30",
        devices=4,
    )
    (output,) = finish([single])
    assert f"resumed from checkpoint step {newest}" in output, output[-2000:]
    assert logged_steps(workdir)[-1] == newest + 1


def smoke_config():
    """configs/smoke.py as the runs above use it."""
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    try:
        import smoke
    finally:
        sys.path.pop(0)
    config = smoke.get_config()
    config.synthetic.num_locations = 4
    config.model.depth, config.model.width = 10, 8
    return config


def test_a_waiting_process_stops_with_one_line_naming_the_folder_and_the_key(tmp_path):
    config = config_lib.for_tasks("prepare")
    config.data.wait_seconds = 0.2
    with pytest.raises(dataset.DatasetWaitError) as error:
        dataset.wait_for_dataset(config_lib.resolve(config), str(tmp_path), poll_seconds=0.05)
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "tfds") in message and "config.data.wait_seconds" in message
    assert message.startswith("process 0:")


# Three processes that join a run: process 0 idles, process 1 ends normally at once, process 2 is
# killed at once. The peer watch alone, without JAX computations.
PEER_WATCH_WORKER = """
import os, signal, sys, time
from caco_jax.runtime import multihost
process_id, port = int(sys.argv[1]), sys.argv[2]
multihost.initialize(auto=False, coordinator_address=f"localhost:{port}", num_processes=3,
                     process_id=process_id, peer_timeout_seconds=3)
if process_id == 0:
    time.sleep(30)
elif process_id == 2:
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_peer_watch_names_a_process_that_died_and_not_one_that_finished():
    port = free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", PEER_WATCH_WORKER, str(i), str(port)],
            cwd=ROOT,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    try:
        _, stderr = processes[0].communicate(timeout=120)
    finally:
        kill_all(processes)
    assert processes[0].returncode == 1, stderr[-4000:]
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith(
            "run.py: process 0 of 3 lost contact with process 2 (no sign of life for 3 s, "
            "--peer_timeout_seconds); it died, hangs or was stopped"
        )
    ), stderr[-4000:]


def test_a_lost_peer_is_recognised_and_named_when_the_runtime_names_it():
    gloo = RuntimeError(
        "UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] "
        "Connection closed by peer [127.0.0.1]:14472"
    )
    heartbeat = RuntimeError(
        "UNAVAILABLE: Task 1 heartbeat timeout. This indicates that the remote task has failed"
    )
    unhealthy = RuntimeError(
        "UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n3\nThe tasks"
    )
    assert multihost.lost_peer(gloo) == "another process"
    assert multihost.lost_peer(heartbeat) == "process 1"
    assert multihost.lost_peer(unhealthy) == "process 3"
    assert multihost.lost_peer(RuntimeError("RESOURCE_EXHAUSTED: Out of memory")) is None
    multihost.stop_if_peer_lost(ValueError("not about a peer"))  # returns: not a lost peer


def test_the_task_table_says_which_process_runs_what(monkeypatch):
    assert tasks.multiprocess_refusals(("synthesize", "prepare", "pretrain")) == []
    assert tasks.multiprocess_refusals(("pretrain", "eval_land_cover")) == ["eval_land_cover"]
    calls = []
    monkeypatch.setattr(dataset, "run_task", lambda s, w: calls.append("prepare") or {})
    monkeypatch.setattr(dataset, "wait_for_dataset", lambda s, w: calls.append("wait") or {})
    skipped = tasks.run("synthesize", None, "w", process_index=1, process_count=2)
    assert skipped == {"skipped": "process 0 runs this task"}
    for index in (1, 0):
        tasks.run("prepare", None, "w", process_index=index, process_count=2)
    tasks.run("prepare", None, "w")  # one process: it prepares
    assert calls == ["wait", "prepare", "prepare"]


def run_config(config_file, workdir, processes, devices):
    """run.py with ``config_file`` as ``processes`` processes on localhost (1: a plain run), each
    with ``devices`` simulated devices; their stdout, once every one exited 0."""
    port = free_port()
    command = [sys.executable, "run.py", "--config", str(config_file), "--workdir", workdir]
    joined = [
        (f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
         f"--process_id={i}")
        for i in range(processes)
    ] if processes > 1 else [()]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices)}
    started = [
        subprocess.Popen(
            [*command, *flags], cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for flags in joined
    ]  # fmt: skip
    return finish(started)


PRODUCTS_CONFIG = """
from caco_jax import config as config_lib


def get_config():
    config = config_lib.for_tasks("embed", "change_map")
    config.embed.source = {before!r}
    config.embed.encoder = config.change_map.encoder = {encoder!r}
    config.embed.batch_size = config.change_map.batch_size = 4
    config.change_map.before, config.change_map.after = {before!r}, {after!r}
    config.change_map.before_dn_offset = config.change_map.after_dn_offset = 0.0
    config.embed.dn_offset = 0.0
    return config
"""


def test_embeddings_and_change_maps_split_over_two_processes_equal_one_process(tmp_path):
    """run.py's embed and change_map tasks over two processes: each embeds every other tile of the
    scenes and writes its part of the GeoParquet datasets, process 0 draws the map; the rows, the
    ratios and the labels equal those of one process."""
    import csv

    from rasterio.transform import from_origin

    from caco_jax.data.normalization import EXPORT_KEY, Normalization
    from caco_jax.evaluators import common
    from caco_jax.models import export
    from caco_jax.products import embed

    rng = np.random.default_rng(0)
    before = rng.integers(1500, 3500, size=(3, 96, 160), dtype=np.uint16)  # 3 x 5 tiles of 32
    after = before + rng.integers(0, 80, size=before.shape, dtype=np.uint16)
    after[:, 32:64, 64:96] = 7000
    grid = from_origin(500_000.0, 4_700_000.0, 10.0, 10.0)
    write_band_files(tmp_path / "before", before, grid)
    write_band_files(tmp_path / "after", after, grid)
    metadata = {EXPORT_KEY: Normalization.rgb().to_json(), "image_size": 32}
    model = common.random_encoder(10, 3, seed=1, width=8)
    encoder = export.save_encoder(tmp_path / "encoder", model, metadata)
    config_file = tmp_path / "products.py"
    config_file.write_text(
        PRODUCTS_CONFIG.format(
            before=str(tmp_path / "before"), after=str(tmp_path / "after"), encoder=str(encoder)
        )
    )

    def run(workdir, processes):
        return run_config(config_file, workdir, processes, devices=2)

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run(one, 1)
    outputs = run(two, 2)
    assert "2 processes" in outputs[0]
    assert sorted(os.listdir(os.path.join(two, "embeddings"))) == [
        "_manifest.json",
        "part-00000-of-00002.parquet",
        "part-00001-of-00002.parquet",
    ]
    for name in ("embeddings", "change_map/embeddings_before", "change_map/embeddings_after"):
        single = embed.Embeddings.read(os.path.join(one, name))
        split = embed.Embeddings.read(os.path.join(two, name))
        assert len(single.ids) == 15 and sorted(split.ids) == sorted(single.ids)
        order = [split.ids.index(i) for i in single.ids]
        np.testing.assert_allclose(split.embeddings[order], single.embeddings, atol=1e-5)
        np.testing.assert_array_equal(split.lat[order], single.lat)
        assert [split.footprints[i] for i in order] == single.footprints
    tables = []
    for workdir in (one, two):
        with open(os.path.join(workdir, "change_map", "change_map.csv")) as f:
            tables.append(list(csv.DictReader(f)))
    assert [r["id"] for r in tables[0]] == [r["id"] for r in tables[1]]
    assert [r["changed"] for r in tables[0]] == [r["changed"] for r in tables[1]]
    np.testing.assert_allclose(
        [float(r["ratio"]) for r in tables[1]], [float(r["ratio"]) for r in tables[0]], rtol=1e-4
    )
    assert tables[0][7]["changed"] == "True"  # the tile at (32, 64)


EVALS_CONFIG = """
from caco_jax import config as config_lib


def get_config():
    config = config_lib.for_tasks("synthesize", "prepare", "pretrain")
    config.synthetic.num_locations = 8
    config.data.num_workers = 1
    config.model.depth, config.model.width, config.model.embedding_dim = 10, 8, 16
    config.augment.crop_size = 32
    config.method.num_negatives = 32
    config.train.batch_size = 8
    config.train.epochs = 2
    config.train.milestones = (1,)
    # Updates below float32's resolution: the weights stay as initialised, so both layouts
    # evaluate the same encoder (their training differs in the last bits through the
    # cross-process all-reduce, and the change labels amplify that within an epoch).
    config.train.base_learning_rate = 1e-12
    config.logging.progress_bar = False
    config.evals.land_cover_knn = dict(
        type="knn", dataset="land_cover", every_epochs=1, train_examples=24, test_examples=16,
        batch_size=8,
    )
    return config
"""


def test_evaluations_during_pretraining_gather_features_over_two_processes(tmp_path):
    """`config.evals` in a run of two processes of 2 devices each: the kNN's features are computed
    on all 4 devices and gathered, and process 0 writes each evaluation's line once, with the
    numbers of one process holding the 4 devices."""
    config_file = tmp_path / "evals.py"
    config_file.write_text(EVALS_CONFIG)

    def run(workdir, processes):
        run_config(config_file, workdir, processes, devices=4 // processes)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        losses = [(x["step"], x.get("loss"), x.get("epoch/loss")) for x in lines if "step" in x]
        return [x for x in lines if "eval/land_cover_knn/top1" in x], losses

    (single, single_losses), (split, split_losses) = (
        run(str(tmp_path / "one"), 1),
        run(str(tmp_path / "two"), 2),
    )
    assert split_losses == single_losses  # the same training, so the same encoder evaluated
    assert [line["step"] for line in split] == [line["step"] for line in single] == [2, 4]
    for one, two in zip(single, split, strict=True):
        assert two["eval/land_cover_knn/top1"] == one["eval/land_cover_knn/top1"]
        assert 0.0 <= one["eval/land_cover_knn/top1"] <= 1.0
