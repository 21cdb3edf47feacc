"""The objectives against straightforward float64 implementations of the official construction
(README, "Objectives"), written with explicit loops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caco_jax.pretrain import objectives

TEMPERATURE = 0.07

# Jitted once per shape: eager op-by-op dispatch is what makes small JAX tests slow.
caco_loss = jax.jit(functools.partial(objectives.caco_loss, temperature=TEMPERATURE))
teco_loss = jax.jit(functools.partial(objectives.teco_loss, temperature=TEMPERATURE))


def unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def logsumexp(x):
    m = max(x)
    return m + np.log(sum(np.exp(v - m) for v in x))


def reference_caco_rows(z_q, z_k, flat_queue, changed, temperature, rows):
    """Per-row, per-subspace logits lists (positive first) and losses of the official
    construction, with Python loops.

    ``flat_queue`` [3, K, D] is the official single queue per subspace: a window-h query sees its
    columns of parity h. Row i is window i % 2 of location i // 2.
    """
    num_items = z_k.shape[2]
    logits, losses = {}, np.zeros((len(rows), 3))
    for a, i in enumerate(rows):
        h, partner = i % 2, i + 1 - 2 * (i % 2)
        for s in range(3):
            q = z_q[s, a]
            row = [q @ z_k[s, s, i]]
            row += [q @ flat_queue[s, c] for c in range(flat_queue.shape[1]) if c % 2 == h]
            for v in {0: [], 1: [0, 2], 2: [0, 1]}[s]:
                row += [q @ z_k[s, v, j] for j in range(num_items)]
            for j in range(num_items):
                if j % 2 != h and not (j == partner and not changed[a]):
                    row.append(q @ z_k[s, s, j])
            row = [x / temperature for x in row]
            logits[a, s] = row
            losses[a, s] = logsumexp(row) - row[0]
    return logits, losses


def reference_seco_rows(z_q, z_k, queue, temperature, rows):
    num_subspaces, num_items = z_k.shape[0], z_k.shape[2]
    logits, losses = {}, np.zeros((len(rows), num_subspaces))
    for a, i in enumerate(rows):
        for s in range(num_subspaces):
            q = z_q[s, a]
            row = [q @ z_k[s, s, i]] + [q @ k for k in queue[s]]
            for v in range(num_subspaces):
                if s > 0 and v != s:
                    row += [q @ z_k[s, v, j] for j in range(num_items)]
            row = [x / temperature for x in row]
            logits[a, s] = row
            losses[a, s] = logsumexp(row) - row[0]
    return logits, losses


def window_halves(flat_queue):
    """Official interleaved [S, K, D] -> [S, 2, K/2, D] with half h = columns of parity h."""
    s, k, d = flat_queue.shape
    return flat_queue.reshape(s, k // 2, 2, d).transpose(0, 2, 1, 3)


def caco_inputs(seed, num_items=8, queue_size=22, dim=16):
    """queue_size 22: K/2 = 11 is not a multiple of the batch."""
    rng = np.random.default_rng(seed)
    z_q = unit(rng, 3, num_items, dim)
    z_k = unit(rng, 3, 3, num_items, dim)
    flat_queue = unit(rng, 3, queue_size, dim)
    # Masked and unmasked rows in both windows, and locations labelled differently per window.
    changed = np.array([True, False, False, False, True, True, False, True][:num_items])
    return z_q, z_k, flat_queue, changed


def as_f32(*arrays):
    return [jnp.asarray(a, jnp.float32) for a in arrays]


@pytest.mark.parametrize("seed", [0, 1])
def test_caco_loss_matches_reference(seed):
    z_q, z_k, flat_queue, changed = caco_inputs(seed)
    _, ref = reference_caco_rows(z_q, z_k, flat_queue, changed, TEMPERATURE, range(8))
    q, k, queue = as_f32(z_q, z_k, window_halves(flat_queue))
    loss, metrics = caco_loss(q, k, queue, jnp.asarray(changed))
    np.testing.assert_allclose(loss, ref.mean(axis=0).sum(), rtol=1e-5)
    for s in range(3):
        np.testing.assert_allclose(metrics[f"loss/subspace{s}"], ref[:, s].mean(), rtol=1e-5)


def test_caco_logits_order_and_mask():
    z_q, z_k, flat_queue, changed = caco_inputs(2)
    ref_logits, _ = reference_caco_rows(z_q, z_k, flat_queue, changed, TEMPERATURE, range(8))
    q, k, queue = as_f32(z_q, z_k, window_halves(flat_queue))
    logits = objectives.caco_logits(q, k, queue, jnp.asarray(changed), TEMPERATURE)
    for s in range(3):
        got = np.asarray(logits[s])
        # Every row has the full width; exactly the unchanged rows lose one (the partner) entry.
        assert got.shape == (8, 1 + 11 + (0 if s == 0 else 16) + 4)
        np.testing.assert_array_equal(np.isinf(got).sum(axis=1), ~changed)
        for i in range(8):
            kept = got[i][np.isfinite(got[i])]
            np.testing.assert_allclose(kept, ref_logits[i, s], rtol=1e-5, atol=1e-5)
        # The removed entry is the same location's other-window key in the subspace's own view.
        for i in np.flatnonzero(~changed):
            assert np.isneginf(got[i, -4 + i // 2])


def test_all_changed_keeps_more_negatives_and_teco_equals_all_changed():
    z_q, z_k, flat_queue, _ = caco_inputs(3)
    q, k, queue = as_f32(z_q, z_k, window_halves(flat_queue))
    masked, _ = caco_loss(q, k, queue, jnp.zeros(8, bool))
    teco, _ = teco_loss(q, k, queue)
    all_changed, _ = caco_loss(q, k, queue, jnp.ones(8, bool))
    _, ref = reference_caco_rows(z_q, z_k, flat_queue, np.ones(8, bool), TEMPERATURE, range(8))
    np.testing.assert_allclose(teco, all_changed, rtol=1e-6)
    as_integers, _ = caco_loss(q, k, queue, jnp.ones(8, jnp.int32))  # 0/1 labels work too
    np.testing.assert_allclose(as_integers, all_changed, rtol=1e-6)
    np.testing.assert_allclose(teco, ref.mean(axis=0).sum(), rtol=1e-5)
    assert teco > masked  # an extra negative can only raise the cross-entropy


def test_query_offset_selects_rows():
    """Local rows 4..7 with the global keys: per-row losses of exactly those rows."""
    z_q, z_k, flat_queue, changed = caco_inputs(4)
    _, ref = reference_caco_rows(z_q[:, 4:], z_k, flat_queue, changed[4:], TEMPERATURE, range(4, 8))
    q, k, queue = as_f32(z_q[:, 4:], z_k, window_halves(flat_queue))
    loss, _ = caco_loss(q, k, queue, jnp.asarray(changed[4:]), query_offset=jnp.int32(4))
    np.testing.assert_allclose(loss, ref.mean(axis=0).sum(), rtol=1e-5)


def test_sharded_loss_and_gradient_equal_single_device():
    """4 devices, each with its 4 query rows and the all-gathered keys, match one device."""
    num_devices = 4
    z_q, z_k, flat_queue, _ = caco_inputs(5, num_items=16)
    changed = jnp.asarray(np.random.default_rng(5).random(16) < 0.5)
    q, k, queue = as_f32(z_q, z_k, window_halves(flat_queue))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:num_devices]), ("data",))
    P = jax.sharding.PartitionSpec

    def local_loss(q_local, k_local, queue, changed_local):
        k_global = jax.lax.all_gather(k_local, "data", axis=2, tiled=True)
        offset = jax.lax.axis_index("data") * q_local.shape[1]
        loss, metrics = objectives.caco_loss(
            q_local, k_global, queue, changed_local, TEMPERATURE, query_offset=offset
        )
        return jax.lax.pmean(loss, "data"), jax.lax.pmean(metrics, "data")

    sharded = jax.shard_map(
        local_loss,
        mesh=mesh,
        in_specs=(P(None, "data"), P(None, None, "data"), P(), P("data")),
        out_specs=(P(), P()),
    )
    value_and_grad = lambda loss_fn: jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss_s, metrics_s), grad_s = value_and_grad(sharded)(q, k, queue, changed)
    (loss_1, metrics_1), grad_1 = value_and_grad(caco_loss)(q, k, queue, changed)
    np.testing.assert_allclose(loss_s, loss_1, rtol=1e-6)
    for name in metrics_1:
        np.testing.assert_allclose(metrics_s[name], metrics_1[name], rtol=1e-6)
    np.testing.assert_allclose(grad_s, grad_1, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mask_does_not_leak(dtype):
    """The removed partner is the query itself (the strongest possible negative): it must have no
    effect at all, in float32 and in bfloat16, on the loss or on the gradient."""
    z_q, z_k, flat_queue, _ = caco_inputs(6)
    z_k = z_k.copy()
    for i in range(8):  # each query's long-term partner key (own view) equals the query
        for s in range(3):
            z_k[s, s, i ^ 1] = z_q[s, i]
    unchanged = np.zeros(8, bool)
    _, ref = reference_caco_rows(z_q, z_k, flat_queue, unchanged, TEMPERATURE, range(8))
    q, k, queue = [jnp.asarray(a, dtype) for a in (z_q, z_k, window_halves(flat_queue))]
    loss_fn = lambda q: objectives.caco_loss(q, k, queue, jnp.asarray(unchanged), TEMPERATURE)[0]
    loss, grad = jax.jit(jax.value_and_grad(loss_fn))(q)
    assert loss.dtype == jnp.float32
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16 rounding of the inputs only
    np.testing.assert_allclose(loss, ref.mean(axis=0).sum(), rtol=tolerance)
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))
    leaked, _ = teco_loss(q, k, queue)
    assert leaked > loss + 1.0  # what a leak would look like


def test_gradients_finite_and_positive_closer_lowers_loss():
    z_q, z_k, flat_queue, changed = caco_inputs(7)
    q, k, queue = as_f32(z_q, z_k, window_halves(flat_queue))
    changed = jnp.asarray(changed)
    loss, grad = jax.jit(jax.value_and_grad(lambda q: caco_loss(q, k, queue, changed)[0]))(q)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    positives = k[jnp.arange(3), jnp.arange(3)]  # [3, N, D]
    closer = positives + 0.5 * (q - positives)
    closer = closer / jnp.linalg.norm(closer, axis=-1, keepdims=True)
    k_closer = k.at[jnp.arange(3), jnp.arange(3)].set(closer)
    loss_closer, metrics = caco_loss(q, k_closer, queue, changed)
    assert loss_closer < loss
    # Keys equal to the queries are always top-1.
    k_equal = k.at[jnp.arange(3), jnp.arange(3)].set(q)
    _, metrics = caco_loss(q, k_equal, queue, changed)
    for s in range(3):
        assert metrics[f"accuracy/subspace{s}"] == 1.0
    # Keys and queue are constants of the loss.
    grad_k = jax.jit(jax.grad(lambda k: caco_loss(q, k, queue, changed)[0]))(k)
    assert not np.any(grad_k)


def test_seco_loss_matches_reference():
    rng = np.random.default_rng(8)
    z_q, z_k, queue = unit(rng, 3, 6, 16), unit(rng, 3, 3, 6, 16), unit(rng, 3, 13, 16)
    _, ref = reference_seco_rows(z_q, z_k, queue, TEMPERATURE, range(6))
    loss, metrics = objectives.seco_loss(*as_f32(z_q, z_k, queue), TEMPERATURE)
    np.testing.assert_allclose(loss, ref.mean(axis=0).sum(), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/subspace2"], ref[:, 2].mean(), rtol=1e-5)
    logits = objectives.seco_logits(*as_f32(z_q, z_k, queue), TEMPERATURE)
    assert [x.shape[1] for x in logits] == [1 + 13, 1 + 13 + 12, 1 + 13 + 12]
    # Local rows 3..4 (SeCo has no pairs: any offset) with the global keys.
    local, _ = objectives.seco_loss(*as_f32(z_q[:, 3:5], z_k, queue), TEMPERATURE, query_offset=3)
    np.testing.assert_allclose(local, ref[3:5].mean(axis=0).sum(), rtol=1e-5)


def test_moco_loss_matches_reference():
    rng = np.random.default_rng(9)
    z_q, z_k, queue = unit(rng, 5, 16), unit(rng, 5, 16), unit(rng, 7, 16)
    expected = []
    for i in range(5):
        row = [z_q[i] @ z_k[i]] + [z_q[i] @ c for c in queue]
        row = [x / TEMPERATURE for x in row]
        expected.append(logsumexp(row) - row[0])
    loss, metrics = objectives.moco_loss(
        *as_f32(z_q[None], z_k[None, None], queue[None]), TEMPERATURE
    )
    np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)
    assert set(metrics) == {"loss/subspace0", "accuracy/subspace0"}


def test_bad_shapes_name_the_argument():
    z_q, z_k, flat_queue, changed = caco_inputs(0)
    q, k, queue = as_f32(z_q, z_k, window_halves(flat_queue))
    with pytest.raises(ValueError, match="queue"):
        objectives.caco_loss(q, k, queue[:, 0], jnp.asarray(changed), TEMPERATURE)
    with pytest.raises(ValueError, match="changed"):
        objectives.caco_loss(q, k, queue, jnp.asarray(changed[:4]), TEMPERATURE)
    with pytest.raises(ValueError, match="even"):
        objectives.caco_loss(q[:, :3], k, queue, jnp.asarray(changed[:3]), TEMPERATURE)
    with pytest.raises(ValueError, match="query_offset"):
        objectives.caco_loss(q[:, :4], k, queue, jnp.asarray(changed[:4]), 0.1, query_offset=3)
    with pytest.raises(ValueError, match="query_offset"):
        objectives.caco_loss(q[:, :4], k, queue, jnp.asarray(changed[:4]), 0.1, query_offset=6)
    with pytest.raises(ValueError, match="z_k"):
        objectives.seco_loss(q, k[:2], queue[:, 0], TEMPERATURE)
    with pytest.raises(ValueError, match="1 subspace"):
        objectives.moco_loss(q, k, queue[:, 0], TEMPERATURE)
