"""Shuffle-BN (``config.train.bn_mode = "shuffle"``) against MoCo's batch_shuffle_ddp semantics.

MoCo gathers the key batch of all GPUs, permutes it with one permutation shared by every GPU, lets
GPU d encode rows ``order[d * n:(d + 1) * n]`` with its own BatchNorm statistics, gathers the
features and puts them back in the original row order. These tests run the step's key forwards on 8
simulated devices and check them against that recipe written out explicitly.
"""

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from caco_jax.pretrain import state as train_state
from caco_jax.pretrain import step as step_lib
from caco_jax.runtime import mesh as mesh_lib

NUM_DEVICES = 8
ROWS_PER_DEVICE = 2
ROWS = NUM_DEVICES * ROWS_PER_DEVICE


def test_each_row_is_encoded_on_the_device_the_permutation_sends_it_to_and_comes_back_in_place():
    mesh = mesh_lib.data_mesh()
    key = jax.random.PRNGKey(3)
    rows = np.arange(ROWS, dtype=np.float32)[:, None]

    def which_device(x):  # a row-wise "encoder" that records where it ran
        return x + 1000.0 * jax.lax.axis_index(mesh_lib.AXIS)

    sharded = jax.shard_map(
        lambda x: step_lib._encode_shuffled(which_device, x, key),
        mesh=mesh,
        in_specs=P(mesh_lib.AXIS),
        out_specs=P(mesh_lib.AXIS),
    )
    out = np.asarray(jax.jit(sharded)(rows))
    order = np.asarray(jax.random.permutation(key, ROWS))
    encoded_on = np.argsort(order) // ROWS_PER_DEVICE  # row order[j] goes to device j // n
    np.testing.assert_array_equal(out[:, 0] % 1000, np.arange(ROWS))  # original order restored
    np.testing.assert_array_equal(out[:, 0] // 1000, encoded_on)
    # The draw really moves rows between BatchNorm batches (identity would keep row i on i // n).
    assert np.mean(encoded_on != np.arange(ROWS) // ROWS_PER_DEVICE) > 0.5


def test_shuffled_key_forwards_equal_moco_batch_shuffle_written_out():
    mesh = mesh_lib.data_mesh()
    # A width-8 ResNet-10: the test is about where rows are normalised, not the network.
    model, params, stats = train_state.build_model(
        10, 3, 16, seed=0, compute_dtype="float32", bn_axis=None, width=8
    )
    views = np.random.default_rng(0).normal(size=(2, ROWS, 32, 32, 3)).astype(np.float32)
    shuffle_key = jax.random.PRNGKey(7)

    def per_device(params, stats, views, shuffle_key):
        return step_lib.key_forwards(model, params, stats, views, shuffle_key, "shuffle")

    sharded = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(), P(None, mesh_lib.AXIS), P()),
        out_specs=(P(None, None, mesh_lib.AXIS), P()),
    )
    embeddings, new_stats = jax.device_get(jax.jit(sharded)(params, stats, views, shuffle_key))

    @jax.jit
    def encode_chunk(stats, images):  # one device's forward with its own BatchNorm statistics
        key_model = model(params, stats)
        key_model.train()
        embeddings = key_model(images)  # updates the module's running statistics
        return nnx.to_pure_dict(nnx.state(key_model, nnx.BatchStat)), embeddings

    def moco_reference(orders):
        """Embeddings [V, S, N, D] and device-averaged running statistics, view by view."""
        device_stats = [stats] * NUM_DEVICES
        outputs = []
        for view, order in zip(views, orders, strict=True):
            shuffled = view[order]
            chunks = []
            for device in range(NUM_DEVICES):
                rows = slice(device * ROWS_PER_DEVICE, (device + 1) * ROWS_PER_DEVICE)
                device_stats[device], z = encode_chunk(device_stats[device], shuffled[rows])
                chunks.append(np.asarray(z))
            outputs.append(np.concatenate(chunks, axis=1)[:, np.argsort(order)])  # unshuffle
        mean_stats = jax.tree.map(lambda *s: np.mean(s, axis=0), *device_stats)
        return np.stack(outputs), mean_stats

    view_keys = jax.random.split(shuffle_key, len(views))  # one permutation per view, as MoCo
    orders = [np.asarray(jax.random.permutation(k, ROWS)) for k in view_keys]
    assert not np.array_equal(orders[0], orders[1])
    expected, expected_stats = moco_reference(orders)
    unshuffled, unshuffled_stats = moco_reference([np.arange(ROWS)] * len(views))

    np.testing.assert_allclose(embeddings, expected, atol=2e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        new_stats,
        expected_stats,
    )
    # Which rows share a BatchNorm batch changes the keys and the statistics: a shuffle that
    # forgot to permute (or permuted back before encoding) would fail the comparisons above.
    assert np.max(np.abs(expected - unshuffled)) > 1e-2
    changed = jax.tree.leaves(
        jax.tree.map(lambda a, b: np.max(np.abs(a - b)), expected_stats, unshuffled_stats)
    )
    assert max(changed) > 1e-3
    # The running statistics moved from their initial values (mean 0, variance 1) towards the data.
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)), new_stats, stats))
    assert min(moved) > 0
