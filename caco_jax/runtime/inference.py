"""A frozen model over host batches on every device: what the evaluators and the products share.

The batch is split over this process's devices (a 1-D mesh, `runtime.mesh`) and the model is
replicated;
only the raw pixels cross to the devices, and ``preprocess`` (the encoder's input recipe) runs
inside the compiled function. Each batch is padded to the global batch size, so a shape compiles
once, and the function is keyed by (graph, preprocess), so every encoder of one architecture and
recipe reuses one compile.

The default mesh is this process's devices: in a run of several processes each process embeds its
own share (`products.embed`). On a mesh over every process's devices (the training mesh, as the
evaluations during pretraining use) every process passes the same host batch: each places the
rows of its own devices (`jax.make_array_from_callback`), and the output is gathered (replicated
on every device), so every process gets every row.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from caco_jax.runtime import mesh as mesh_lib
from caco_jax.runtime import progress


def global_batch_size(requested: int, mesh: jax.sharding.Mesh) -> int:
    """``requested`` rounded up to a multiple of the device count."""
    return math.ceil(requested / mesh.size) * mesh.size


def pad_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """``batch`` with zero rows appended up to ``size`` rows."""
    if batch.shape[0] == size:
        return batch
    padding = np.zeros((size - batch.shape[0], *batch.shape[1:]), batch.dtype)
    return np.concatenate([batch, padding])


class FrozenModel:
    """``model`` in eval mode, replicated on every device; calling it with a host batch of at most
    `batch_size` rows returns ``model(preprocess(batch))`` on the host (on a mesh of several
    processes every process must pass the same batch).

    ``preprocess`` must be hashable (a function, or a frozen dataclass with ``__call__``): with
    the model's graph it keys the compiled function.
    """

    def __init__(
        self,
        model: nnx.Module,
        preprocess: Callable[[jax.Array], jax.Array],
        *,
        batch_size: int,
        mesh: jax.sharding.Mesh | None = None,
    ):
        # This process's devices: in a run of several processes each embeds its own share.
        mesh = mesh or mesh_lib.local_mesh()
        self.batch_size = global_batch_size(batch_size, mesh)
        self.preprocess = preprocess
        model.eval()
        self._graphdef, state = nnx.split(model)
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._state = jax.device_put(state, self._replicated)
        self._rows = NamedSharding(mesh, PartitionSpec(mesh_lib.AXIS))

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        count = raw.shape[0]
        if count > self.batch_size:
            raise ValueError(f"a batch of {count} rows, more than batch_size={self.batch_size}")
        padded = pad_batch(np.asarray(raw), self.batch_size)
        rows = jax.make_array_from_callback(padded.shape, self._rows, lambda index: padded[index])
        outputs = _apply(self._graphdef, self.preprocess, self._replicated, self._state, rows)
        return np.asarray(outputs)[:count]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _apply(graphdef, preprocess, replicated, state, raw):
    outputs = nnx.merge(graphdef, state)(preprocess(raw))
    return jax.lax.with_sharding_constraint(outputs, replicated)  # gathered: every process's


def extract_features(
    model: nnx.Module,
    load_batch: Callable[[np.ndarray], np.ndarray],
    count: int,
    *,
    preprocess: Callable[[jax.Array], jax.Array],
    batch_size: int = 256,
    description: str = "features",
) -> np.ndarray:
    """Pooled features [count, d] of the frozen encoder ``model`` in eval mode.

    ``load_batch(indices)`` returns the raw images of those examples (any dtype, NHWC);
    ``preprocess`` maps them to the encoder's input on the devices.
    """
    frozen = FrozenModel(model, preprocess, batch_size=batch_size)
    features = [
        frozen(load_batch(np.arange(start, min(start + frozen.batch_size, count))))
        for start in progress.trange(0, count, frozen.batch_size, desc=description, leave=False)
    ]
    return np.concatenate(features) if features else np.zeros((0, model.feature_dim), np.float32)
