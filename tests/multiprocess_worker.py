"""One process of a real two-process JAX run on CPU, started by test_multiprocess.py.

    python multiprocess_worker.py <process_id> <coordinator port> <checkpoint dir>

Checks, with this process's real `jax.process_index()` / `jax.process_count()`, that its input rows
land in the global batch where the single-process stream has them, then saves checkpoint 3 (a
replicated state and the input position) together with the other process.
"""

import os
import sys

# 4 devices per process; the suite's compile flags (tests/conftest.py) are kept.
os.environ["XLA_FLAGS"] = " ".join(
    ["--xla_force_host_platform_device_count=4"]
    + [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax

process_id, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402
from helpers import fake_source, tiny_config  # noqa: E402

from caco_jax import checkpointing  # noqa: E402
from caco_jax import mesh as mesh_lib  # noqa: E402
from caco_jax.data import pipeline  # noqa: E402

STEPS = 3

config = tiny_config()
source = fake_source()
mesh = mesh_lib.data_mesh()
assert jax.process_count() == 2 and mesh.devices.size == 8
stream = pipeline.Stream.from_config(config, len(source))
mine = pipeline.make_pipeline(
    config,
    source,
    stream,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
)
whole = pipeline.make_pipeline(config, source, stream)
for _ in range(STEPS):
    expected = next(whole)
    batch = mesh_lib.global_batch(next(mine), mesh)
    for name in ("item_id", "images"):
        assert batch[name].shape[0] == config.train.batch_size
        for shard in batch[name].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), expected[name][shard.index[0]])

checkpoints = checkpointing.Checkpointer(directory, every_steps=1, keep=1)
position = pipeline.Position(STEPS, stream).to_json()
state = mesh_lib.replicate({"step": np.int32(STEPS)}, mesh)
checkpoints.save(STEPS, state, data_position=position, config=config)
checkpoints.close()
