"""A real two-process JAX run on one machine (two CPU processes of 4 devices each).

The workers (multiprocess_worker.py) check that each process's input rows land in the global batch
where one process would put them, and save a checkpoint together; this process (one process, 8
devices) then resumes the input stream from it.
"""

import os
import subprocess
import sys

import numpy as np
from helpers import fake_source, free_port, tiny_config

from caco_jax import checkpointing
from caco_jax.data import pipeline

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_two_processes_assemble_the_global_batch_and_save_a_position_one_process_resumes(
    tmp_path,
):
    directory = str(tmp_path / "checkpoints")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(TESTS), TESTS])}
    port = str(free_port())
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(TESTS, "multiprocess_worker.py"),
                str(i),
                port,
                directory,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        for worker in workers:
            output, _ = worker.communicate(timeout=240)
            assert worker.returncode == 0, output[-3000:]
    finally:  # a failed or hung worker must not leave its partner waiting for it
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    config = tiny_config()
    source = fake_source()
    checkpoints = checkpointing.Checkpointer(directory, every_steps=1, keep=1)
    assert checkpoints.latest_step() == 3
    stream = pipeline.Stream.from_config(config, len(source))
    start = pipeline.Position.from_json(checkpoints.restore_data_position(3)).start_batch(stream)
    checkpoints.close()
    straight = pipeline.make_pipeline(config, source, stream)
    expected = [next(straight)["item_id"] for _ in range(start + 2)][start:]
    resumed = pipeline.make_pipeline(config, source, stream, start_batch=start)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["item_id"], want)
