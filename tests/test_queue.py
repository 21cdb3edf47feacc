"""Queues: FIFO order, wrap-around, per-window halves, the official interleaved layout, EMA."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caco_jax.pretrain import queue
from caco_jax.pretrain.state import ema_update

enqueue = jax.jit(queue.enqueue)


def reference_fifo(initial, batches):
    """Slot-wise FIFO written with a Python deque of (slot) positions: the oldest slot is reused."""
    slots = initial.copy()
    order = collections.deque(range(len(slots)))  # next slot to overwrite first
    for batch in batches:
        for key in batch:
            slot = order.popleft()
            slots[slot] = key
            order.append(slot)
    return slots, order[0]


def test_init_is_normalised_and_shaped():
    q, ptr = queue.init_queue(jax.random.key(0), 3, 10, 8)
    assert q.shape == (3, 10, 8) and ptr.shape == () and ptr.dtype == jnp.int32
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, rtol=1e-5)
    w, wptr = queue.init_window_queue(jax.random.key(0), 3, 22, 8)
    assert w.shape == (3, 2, 11, 8) and wptr.shape == (2,)
    np.testing.assert_allclose(np.linalg.norm(w, axis=-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="even"):
        queue.init_window_queue(jax.random.key(0), 3, 21, 8)


def test_plain_enqueue_wraps_around():
    """K = 10 is not a multiple of the batch of 4."""
    rng = np.random.default_rng(0)
    q, ptr = queue.init_queue(jax.random.key(1), 2, 10, 3)
    initial = np.asarray(q)
    batches = [rng.normal(size=(2, 4, 3)).astype(np.float32) for _ in range(4)]
    for keys in batches:
        q, ptr = enqueue(q, ptr, jnp.asarray(keys))
    for s in range(2):
        expected, next_slot = reference_fifo(initial[s], [b[s] for b in batches])
        np.testing.assert_array_equal(q[s], expected)
        assert int(ptr) == next_slot


def test_window_enqueue_wraps_around_per_window():
    """K/2 = 11 is not a multiple of the 4 keys per window per batch of 8 (alternating windows)."""
    rng = np.random.default_rng(1)
    q, ptr = queue.init_window_queue(jax.random.key(2), 3, 22, 4)
    initial = np.asarray(q)
    windows = jnp.arange(8) % 2
    batches = [rng.normal(size=(3, 8, 4)).astype(np.float32) for _ in range(5)]
    for keys in batches:
        q, ptr = enqueue(q, ptr, jnp.asarray(keys), windows)
    for s in range(3):
        for h in range(2):
            expected, next_slot = reference_fifo(initial[s, h], [b[s, h::2] for b in batches])
            np.testing.assert_array_equal(q[s, h], expected)
            assert int(ptr[h]) == next_slot


def test_window_halves_match_the_official_interleaved_queue():
    """Official: one [K, D] queue, keys written at columns ptr..ptr+N; window h reads parity h."""
    rng = np.random.default_rng(2)
    size, batch = 16, 4
    official = rng.normal(size=(1, size, 3)).astype(np.float32)
    halves = jnp.asarray(official.reshape(1, size // 2, 2, 3).transpose(0, 2, 1, 3))
    ptr, official_ptr = jnp.zeros(2, jnp.int32), 0
    for _ in range(6):
        keys = rng.normal(size=(1, batch, 3)).astype(np.float32)
        official[:, official_ptr : official_ptr + batch] = keys
        official_ptr = (official_ptr + batch) % size
        halves, ptr = enqueue(halves, ptr, jnp.asarray(keys), jnp.arange(batch) % 2)
        for h in range(2):
            np.testing.assert_array_equal(halves[0, h], official[0, h::2])


def test_more_keys_than_a_window_holds_keeps_the_newest():
    q = jnp.zeros((1, 2, 3, 1))
    keys = jnp.arange(1.0, 6.0).reshape(1, 5, 1)  # five window-0 keys into a half of 3
    q, ptr = enqueue(q, jnp.array([1, 0], jnp.int32), keys, jnp.zeros(5, jnp.int32))
    # Writes at slots 1, 2, 0, 1, 2: keys 3, 4, 5 survive at slots 0, 1, 2.
    np.testing.assert_array_equal(q[0, 0, :, 0], [3.0, 4.0, 5.0])
    np.testing.assert_array_equal(q[0, 1], 0.0)
    np.testing.assert_array_equal(ptr, [0, 0])


def test_keys_to_enqueue_takes_each_subspace_own_view():
    z_k = jnp.arange(3 * 3 * 2 * 1.0).reshape(3, 3, 2, 1)
    np.testing.assert_array_equal(queue.keys_to_enqueue(z_k), z_k[[0, 1, 2], [0, 1, 2]])


def test_enqueue_rejects_mismatched_layouts():
    q, ptr = jnp.zeros((3, 2, 4, 4)), jnp.zeros(2, jnp.int32)
    with pytest.raises(ValueError, match="plain queue"):
        queue.enqueue(q, ptr, jnp.zeros((3, 2, 4)))
    with pytest.raises(ValueError, match="windows"):
        queue.enqueue(q, ptr, jnp.zeros((3, 2, 4)), jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="keys"):
        queue.enqueue(q, ptr, jnp.zeros((3, 2, 5)), jnp.zeros(2, jnp.int32))


def test_ema_update_over_a_pytree():
    target = {"a": jnp.ones(3), "b": [jnp.zeros((2, 2), jnp.bfloat16)]}
    online = {"a": jnp.full(3, 3.0), "b": [jnp.ones((2, 2))]}
    out = jax.jit(ema_update, static_argnums=2)(target, online, 0.75)
    np.testing.assert_allclose(out["a"], 1.5)
    np.testing.assert_allclose(np.asarray(out["b"][0], np.float32), 0.25)
    assert out["b"][0].dtype == jnp.bfloat16
    with pytest.raises(ValueError):
        ema_update(target, {"a": online["a"]}, 0.5)
