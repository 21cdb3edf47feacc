"""Every worker pool starts from a plain script without a main guard (caco_jax/runtime/workers.py).

With spawn/forkserver workers that ran the caller's main module again, such a script would run
again inside each worker, and the worker would die at its first process start.
"""

import os
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# No `if __name__ == "__main__":`: the README's preparation snippet as a user would paste it,
# between a synthetic archive written by 2 processes and a batch read by a grain worker.
SCRIPT = """
import multiprocessing.spawn
import sys

import tensorflow_datasets as tfds

import caco_jax
from caco_jax.data import dataset, pipeline
from caco_jax.data.pipeline import InputSettings
from caco_jax.runtime import workers
from caco_jax.sources import synthetic

print("script body ran", flush=True)
archive_dir, data_dir = sys.argv[1], sys.argv[2]
synthetic.write_archive(archive_dir, num_locations=4, seed=0, num_workers=2)

builder = tfds.builder("caco_geography/rgb", data_dir=data_dir, num_workers=2)
builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=archive_dir)
)
source = dataset.open_records(data_dir, builder_config="rgb")
print("records", len(source), flush=True)

settings = InputSettings(num_workers=1)
stream = pipeline.make_pipeline(settings, source, pipeline.Stream("caco", 4, 0, len(source)))
batch = next(stream)
print("batch", batch["images"].shape, sorted(batch["location_index"].tolist()), flush=True)
stream.close()

# Only the marked processes start without the main module; others start as Python starts them.
keys = multiprocessing.spawn.get_preparation_data
print("others rerun main", "init_main_from_path" in keys("SpawnProcess-9"), flush=True)
print("caco reruns main", "init_main_from_path" in keys(workers.PROCESS_PREFIX + "x"), flush=True)
"""


def test_records_are_synthesized_prepared_and_read_by_workers_from_an_unguarded_script(tmp_path):
    script = tmp_path / "prepare.py"
    script.write_text(textwrap.dedent(SCRIPT))
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "archive"), str(tmp_path / "tfds")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert lines.count("script body ran") == 1  # no worker ran the script again
    assert "records 4" in lines
    # caco mode: 2 locations per global batch of 4, each as its two windows' rows.
    (batch,) = [line for line in lines if line.startswith("batch ")]
    assert batch.startswith("batch (4, 3, 264, 264, 3)"), batch
    assert "others rerun main True" in lines
    assert "caco reruns main False" in lines


# prepare's worker processes (and the forkserver and resource tracker that serve them) waiting for
# a location that will never come, as they wait when prepare is killed half way.
ORPHANS_SCRIPT = """
import time

from caco_jax.data import builder, shard_writer


def locations():
    time.sleep(600)  # the archive stream, stalled: the workers wait for their first location
    yield


groups = builder.PIXEL_GROUPS["rgb"]
shard_writer.write_shards(
    locations(), groups=groups, features=builder.acquisition_features(groups), directory=".",
    prefix="p", num_workers=2, on_location=print,
)
"""


def test_workers_end_with_a_parent_killed_with_sigkill(tmp_path):
    import psutil

    script = tmp_path / "stalled_prepare.py"
    script.write_text(textwrap.dedent(ORPHANS_SCRIPT))
    parent = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
    )
    try:
        started = time.monotonic()
        # The forkserver, the resource tracker and the two workers below it.
        while len(psutil.Process(parent.pid).children(recursive=True)) < 4:
            assert time.monotonic() - started < 120, "the workers did not start"
            time.sleep(0.2)
        descendants = psutil.Process(parent.pid).children(recursive=True)
        workers = [p for p in descendants if p.parent().pid != parent.pid]
        assert len(workers) == 2
    finally:
        parent.kill()  # as kill -9 does: no cleanup of its own
        parent.wait()
    gone, alive = psutil.wait_procs(descendants, timeout=30)
    for process in alive:  # a failed test must not leave them behind either
        process.kill()
    assert alive == [], [p.cmdline()[:4] for p in alive]
    assert len(gone) == len(descendants)
