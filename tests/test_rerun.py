"""Running a config twice in one workdir, as a user does: the README's demo command, shrunk to
seconds, exits 0 both times; a second run.py while one writes is refused at once.

The demo config runs every task of the README's demo (synthesize, prepare, pretrain, score_change,
change_map, eval_land_cover) with 8 locations, a width-8 ResNet-10 on 32x32 crops and one step per
epoch. The second run finds the archive, the records and a complete pretraining, says so, and
redoes the products (the change map, the probe) whole.
"""

import json
import os
import signal
import subprocess
import sys
import time

from helpers import xla_flags

from caco_jax.runtime import locks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_DEMO = (
    "--config.synthetic.num_locations=8",
    "--config.data.num_workers=1",
    "--config.model.depth=10",
    "--config.model.width=8",
    "--config.model.embedding_dim=16",
    "--config.augment.crop_size=32",
    "--config.method.num_negatives=32",
    "--config.train.batch_size=16",
    "--config.train.epochs=2",
    "--config.train.milestones=(1,)",
    "--config.checkpoint.every_steps=1",
    "--config.logging.progress_bar=False",
    "--config.land_cover.image_size=32",
    "--config.land_cover.epochs=2",
    "--config.land_cover.milestones=(1,)",
    "--config.land_cover.batch_size=8",
    "--config.change_map.land_mask=False",
)


def run_py(workdir, *args, **kwargs):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
    command = [sys.executable, "run.py", "--config", "configs/demo.py", "--workdir", workdir]
    return subprocess.run(
        [*command, *SMALL_DEMO, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        **kwargs,
    )


def test_the_demo_twice_in_one_workdir_exits_0_both_times(tmp_path):
    workdir = str(tmp_path / "demo")
    first = run_py(workdir)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    before = json.loads((tmp_path / "demo" / "results.json").read_text())
    second = run_py(workdir)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    after = json.loads((tmp_path / "demo" / "results.json").read_text())
    out = second.stdout
    assert "prepare: reusing the records in" in out
    assert "complete at checkpoint step 2 (the run asks for 2 steps): nothing to train" in out
    assert "nan samples/s" not in out
    assert "change_map: replacing the change map of an earlier run in" in out
    assert "Traceback" not in second.stderr
    assert after["synthesize"]["written"] is False and after["prepare"]["reused"] is True
    assert after["pretrain"]["steps"] == before["pretrain"]["steps"] == 2
    assert after["pretrain"]["resumed_from"] == 2
    # The same products: the change map of the same encoder and labels.
    assert after["change_map"]["changed"] == before["change_map"]["changed"]
    assert after["eval_land_cover"]["rows"] == before["eval_land_cover"]["rows"]
    assert not (tmp_path / "demo" / locks.LOCK_FILE).exists()


HOLDER = """
import sys, time
from caco_jax.runtime import locks
locks.WriterLock(sys.argv[1], "workdir").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_run_into_a_workdir_being_written_is_refused_at_once(tmp_path):
    workdir = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workdir)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        started = time.monotonic()
        refused = run_py(str(workdir))
        seconds = time.monotonic() - started
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert refused.returncode == 2
    (line,) = refused.stderr.splitlines()
    assert (
        line.startswith(f"run.py: workdir {workdir} is being written by another run (host ")
        and f"pid {holder.pid}," in line
    )
    assert "== synthesize" not in refused.stdout  # refused before any task
    assert seconds < 60, f"refused after {seconds:.1f} s"  # at start-up, not after any work
