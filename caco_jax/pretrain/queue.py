"""Queues of past keys (the MoCo memory), as pure functions of (queue, pointer, keys).

Two layouts:

- plain, MoCo v2 and SeCo: ``queue`` [S, K, D] with ``ptr`` an int32 scalar;
- per window, CACo and TeCo: ``queue`` [S, 2, K/2, D] with ``ptr`` int32 [2], ``queue[s, h]``
  holding the subspace-s keys of window-h items. The official code keeps one [D, K] queue per
  subspace and reads its even columns for early-window queries and its odd columns for late-window
  ones; since its pointer moves by the (even) batch size and the batch alternates windows row by
  row, column 2p+h is exactly position p of our half h. Holding the halves explicitly makes the
  "each query sees the K/2 queued keys of its own window" rule independent of the batch size and of
  K being a multiple of it.

Each step enqueues, per subspace s, the keys of subspace s's own positive view (key head s on key
view s, ``z_k[s, s]``) of all items of the global batch in batch order, overwriting the oldest. The
official code asserts K % batch == 0; here the write wraps around the end instead, so any K works.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnums=1)  # one fused program instead of many eager ops
def _random_unit_vectors(key, shape):
    """Standard normal vectors normalised along the last axis (torch.randn + normalize)."""
    x = jax.random.normal(key, shape, jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def init_queue(key, num_subspaces: int, size: int, dim: int):
    """A plain queue [S, K, D] of random unit vectors and its pointer (int32 scalar 0)."""
    if size < 1:
        raise ValueError(f"queue size must be >= 1, got {size}")
    return _random_unit_vectors(key, (num_subspaces, size, dim)), jnp.zeros((), jnp.int32)


def init_window_queue(key, num_subspaces: int, size: int, dim: int):
    """A per-window queue [S, 2, K/2, D] of random unit vectors and its pointers (int32 [2], zeros).

    ``size`` is the total K of the official code (16384), split into one half per time window.
    """
    if size < 2 or size % 2:
        raise ValueError(f"queue size must be even and >= 2 (one half per window), got {size}")
    queue = _random_unit_vectors(key, (num_subspaces, 2, size // 2, dim))
    return queue, jnp.zeros((2,), jnp.int32)


def keys_to_enqueue(z_k):
    """[S, N, D]: subspace s's own positive keys ``z_k[s, s]`` from key embeddings [S, S, N, D]."""
    diagonal = jnp.arange(z_k.shape[0])
    return z_k[diagonal, diagonal]


def _enqueue_by_window(queue, ptr, keys, windows):
    """queue [S, W, L, D], ptr [W], keys [S, N, D], windows [N] in [0, W): FIFO per window."""
    num_windows, length = queue.shape[1], queue.shape[2]
    in_window = windows[:, None] == jnp.arange(num_windows)[None, :]  # [N, W]
    counts = jnp.sum(in_window, axis=0, dtype=jnp.int32)
    rank = jnp.sum(jnp.cumsum(in_window, axis=0, dtype=jnp.int32) * in_window, axis=1) - 1
    slot = (ptr[windows] + rank) % length
    # When a window receives more than `length` keys, only its newest `length` survive; the older
    # ones are sent out of bounds and dropped, so no two keys ever target one slot.
    survives = rank >= counts[windows] - length
    slot = jnp.where(survives, slot, length)
    queue = queue.at[:, windows, slot].set(keys.astype(queue.dtype), mode="drop")
    return queue, (ptr + counts) % length


def enqueue(queue, ptr, keys, windows=None):
    """Writes ``keys`` [S, N, D] (global batch order) over the oldest entries; returns (queue, ptr).

    Inside ``jax.shard_map`` pass the keys of the whole global batch, gathered in device order
    (``jax.lax.all_gather(..., tiled=True, to="invarying")``, so that the replicated queue can leave
    shard_map with ``out_specs=P()``): every device then writes the same keys.

    Plain queue [S, K, D] (``windows`` None): key j goes to slot (ptr + j) mod K.
    Per-window queue [S, 2, K/2, D] (``windows`` [N] int, 0 early / 1 late): the j-th key of
    window h in batch order goes to ``queue[:, h, (ptr[h] + j) mod K/2]``; for the CACo layout
    ``windows = jnp.arange(N) % 2``.
    """
    keys = jax.lax.stop_gradient(keys)
    if keys.ndim != 3 or keys.shape[0] != queue.shape[0] or keys.shape[-1] != queue.shape[-1]:
        raise ValueError(f"keys must be [S, N, D] matching queue {queue.shape}, got {keys.shape}")
    if windows is None:
        if queue.ndim != 3 or ptr.shape != ():
            raise ValueError(
                "a plain queue is [S, K, D] with a scalar pointer, "
                f"got {queue.shape} and {ptr.shape}"
            )
        no_window = jnp.zeros((keys.shape[1],), jnp.int32)
        queue, ptr = _enqueue_by_window(queue[:, None], ptr[None], keys, no_window)
        return queue[:, 0], ptr[0]
    if queue.ndim != 4 or queue.shape[1] != 2 or ptr.shape != (2,):
        raise ValueError(
            "a per-window queue is [S, 2, K/2, D] with pointers [2], "
            f"got {queue.shape} and {ptr.shape}"
        )
    if windows.shape != (keys.shape[1],):
        raise ValueError(f"windows must be [N] = [{keys.shape[1]}], got {windows.shape}")
    return _enqueue_by_window(queue, ptr, keys, windows.astype(jnp.int32))


@dataclasses.dataclass(frozen=True)
class QueueKind:
    """How a `methods.Method.queue` kind is created and filled."""

    init: Callable  # (key, num_subspaces, K, D) -> (queue, pointer)
    enqueue: Callable  # (queue, pointer, keys [S, N, D], windows [N]) -> (queue, pointer)


def _enqueue_ignoring_windows(queue, ptr, keys, windows):
    del windows  # one queue for every item
    return enqueue(queue, ptr, keys)


QUEUES = {
    "per_window": QueueKind(init_window_queue, enqueue),
    "single": QueueKind(init_queue, _enqueue_ignoring_windows),
}
