"""The one device mesh of the project and how arrays move onto it.

A 1-D ``('data',)`` mesh over every device of every host, ordered by process: each process's
devices hold one contiguous block of rows in process order, so a global batch is the processes'
shards concatenated (the contract of `data.pipeline`). Pretraining, the evaluators and the
benchmarks all build their mesh here.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """The 1-D ``('data',)`` mesh over all devices of all hosts (or the given ones)."""
    devices = jax.devices() if devices is None else devices
    devices = sorted(devices, key=lambda d: d.process_index)  # stable: keeps the order within one
    return jax.sharding.Mesh(devices, (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def local_mesh() -> jax.sharding.Mesh:
    """The 1-D mesh over this process's devices: for work each process does on its own share
    (embeddings, change maps), with no collective across processes."""
    return data_mesh(jax.local_devices())


def gather(x):
    """Inside `jax.shard_map`: the rows of ``x`` of every device, replicated on each."""
    return jax.lax.all_gather(x, AXIS, tiled=True, to="invarying")


def replicate(tree, mesh):
    """A replicated copy of ``tree`` on the mesh (a copy: the step donates its input state)."""
    return jax.device_put(tree, NamedSharding(mesh, P()), may_alias=False)


def global_batch(local_batch: dict, mesh) -> dict:
    """This process's rows -> one array per field sharded along the rows over all hosts' devices."""
    rows = NamedSharding(mesh, P(AXIS))
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(rows, np.asarray(x)), local_batch
    )
