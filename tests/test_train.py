"""The data-parallel pretraining step and the training loop, on 8 simulated CPU devices.

The network is a width-8 ResNet-10 on 32x32 crops (`helpers.tiny_config`): these tests are about
the step, its collectives and the loop, not the network.
"""

import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    BATCH,
    NUM_LOCATIONS,
    assert_trees_close,
    fake_batch,
    fake_source,
    tiny_config,
    tiny_settings,
)

from caco_jax import config as config_lib
from caco_jax.data import pipeline
from caco_jax.pretrain import queue as queue_lib
from caco_jax.pretrain import train
from caco_jax.runtime import checkpointing
from caco_jax.runtime import mesh as mesh_lib
from caco_jax.settings import SettingsError


def one_step(settings, num_devices, batches, dtype=None):
    """(initial state, [(state, metrics) after one step from it, per batch], (state, metrics)
    after a second step on the first batch) on ``num_devices``; with ``dtype`` every float of the
    state is cast to it first."""
    mesh = mesh_lib.data_mesh(jax.devices()[:num_devices])
    run = train.setup(settings, NUM_LOCATIONS, mesh=mesh)
    initial = jax.device_get(run.initial_state)
    if dtype is not None:
        initial = jax.tree.map(lambda x: x.astype(dtype) if x.dtype.kind == "f" else x, initial)
    results = []
    for batch in batches:
        new_state, metrics = run.train_step(
            mesh_lib.replicate(initial, mesh), mesh_lib.global_batch(batch, mesh)
        )
        results.append(jax.device_get((new_state, metrics)))
    second = run.train_step(
        mesh_lib.replicate(results[0][0], mesh), mesh_lib.global_batch(batches[0], mesh)
    )
    return initial, results, jax.device_get(second)


def test_one_step_of_a_tiny_network():
    """The smoke test to run while editing the step (seconds): `train.setup` and one step of a
    width-8 ResNet-10 on one device, two locations per batch."""
    settings = tiny_settings(batch_size=4).replace(method={"num_negatives": 8})
    mesh = mesh_lib.data_mesh(jax.devices()[:1])
    run = train.setup(settings, NUM_LOCATIONS, mesh=mesh)
    state = mesh_lib.replicate(run.initial_state, mesh)
    state, metrics = run.train_step(state, mesh_lib.global_batch(fake_batch(batch=4), mesh))
    state, metrics = jax.device_get((state, metrics))
    assert int(state.step) == 1 and bool(state.all_finite) and np.isfinite(metrics["loss"])
    assert sorted(metrics) == sorted(
        ["loss", "learning_rate", "changed_fraction"]
        + [f"{kind}/subspace{s}" for kind in ("loss", "accuracy") for s in range(3)]
    )
    np.testing.assert_array_equal(state.queue["pointer"], [2, 2])  # two keys per window


@pytest.fixture(scope="module")
def sync_steps():
    """CACo, one location per device: every collective of the shared step (EMA, scanned key
    forwards, gathered keys, change statistics, synchronised BatchNorm, summed gradients,
    per-window enqueue) and the objective's query_offset and partner mask at their smallest shard.
    Computed in float64, so that 8 devices and 1 agree for any batch: in float32 the two runs
    differ by rounding (BatchNorm sums in another order), and where a ReLU input sits within that
    rounding of zero the unit flips and a gradient jumps (seen at some batch seeds)."""
    settings = tiny_settings().replace(model={"compute_dtype": "float64"})
    batches = [fake_batch(seed) for seed in range(3)]
    with jax.enable_x64(True):
        return (
            one_step(settings, 8, batches, jnp.float64),
            one_step(settings, 1, batches, jnp.float64),
        )


def test_eight_devices_equal_one_device_with_synchronised_batchnorm(sync_steps):
    (_, steps8, second8), (_, steps1, second1) = sync_steps
    steps8, steps1 = [*steps8, second8], [*steps1, second1]
    for (state8, metrics8), (state1, metrics1) in zip(steps8, steps1, strict=True):
        assert np.isfinite(metrics1["loss"])
        # float64 rounding through the network: agreement far below float32's 1e-7.
        assert_trees_close(metrics8, metrics1, 1e-9)
        # optax.sgd's momentum trace after one step is exactly gradient + weight decay x params.
        assert_trees_close(state8.opt_state, state1.opt_state, 1e-9)
        assert_trees_close(state8.query_params, state1.query_params, 1e-9)
        assert_trees_close(state8.query_stats, state1.query_stats, 1e-9)
        assert_trees_close(state8.key_stats, state1.key_stats, 1e-9)
        assert_trees_close(state8.queue, state1.queue, 1e-9)
        assert_trees_close(state8.change["running"], state1.change["running"], 1e-9)


def test_step_enqueues_the_batch_and_updates_state(sync_steps):
    initial, ((state, metrics), *_), (second, _) = sync_steps[0]
    keys, old = state.queue["keys"], initial.queue["keys"]  # CACo: [S, 2, K/2, D], per window
    half = BATCH // 2  # each window receives the keys of its own half of the batch
    np.testing.assert_array_equal(state.queue["pointer"], [half, half])
    assert not np.any(np.all(keys[:, :, :half] == old[:, :, :half], axis=-1))
    np.testing.assert_array_equal(keys[:, :, half:], old[:, :, half:])
    np.testing.assert_allclose(np.linalg.norm(keys, axis=-1), 1.0, rtol=1e-5)
    assert state.step == 1 and bool(state.all_finite)
    assert metrics["changed_fraction"] == 0.0
    # The EMA runs before the forward passes: step 1 averages two equal sides (key = query at
    # step 0), step 2 gives m key_1 + (1 - m) query_1 with the official m.
    jax.tree.map(np.testing.assert_array_equal, state.key_params, initial.query_params)
    m = 0.999
    expected = jax.tree.map(lambda k, q: m * k + (1 - m) * q, state.key_params, state.query_params)
    assert_trees_close(second.key_params, expected, 1e-12)
    moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), second.key_params, state.key_params)
    assert max(jax.tree.leaves(moved)) > 0  # m < 1: the key side moved


def update_direction_cosine(initial_a, state_a, initial_b, state_b):
    """Cosine similarity of two runs' parameter updates (state - initial), all leaves together."""

    def update(state, initial):
        return np.concatenate(
            [
                (np.asarray(a, np.float64) - np.asarray(b, np.float64)).ravel()
                for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(initial), strict=True)
            ]
        )

    a = update(state_a.query_params, initial_a.query_params)
    b = update(state_b.query_params, initial_b.query_params)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_bfloat16_step_keeps_a_float32_state_and_follows_the_float32_step():
    batches = [fake_batch(seed) for seed in range(3)]
    initial32, steps32, _ = one_step(tiny_settings(), 1, batches)
    bfloat16 = tiny_settings().replace(model={"compute_dtype": "bfloat16"})
    initial16, steps16, _ = one_step(bfloat16, 1, batches)
    losses, cosines = [], []
    for (state16, metrics16), (state32, metrics32) in zip(steps16, steps32, strict=True):
        # Mixed precision: bfloat16 convolutions and matmuls, everything stored in float32.
        for name in ("query_params", "query_stats", "key_params", "key_stats", "opt_state"):
            floats = [x for x in jax.tree.leaves(getattr(state16, name)) if x.dtype.kind == "f"]
            assert floats and all(x.dtype == np.float32 for x in floats), name
        assert bool(state16.all_finite) and np.isfinite(metrics16["loss"])
        losses.append(abs(metrics16["loss"] / metrics32["loss"] - 1))
        cosines.append(update_direction_cosine(initial16, state16, initial32, state32))
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2 %); through 10 layers the
    # loss moves by a few tenths of a percent. The update direction agrees, though not to 0.99:
    # a tiny network at initialisation is that sensitive to any bfloat16-sized perturbation (ReLU
    # units near zero flip; 16-row BatchNorm batches). A wrong sign or a dropped gradient term
    # would be far below 0.8. Measured over the three batches: see the assertion message.
    summary = f"loss differences {np.round(losses, 4)}, cosines {np.round(cosines, 3)}"
    assert max(losses) < 1.5e-2 and min(cosines) > 0.8, summary


def test_gathered_keys_land_in_the_queue_in_global_batch_order():
    mesh = mesh_lib.data_mesh()
    kind = queue_lib.QUEUES["per_window"]  # CACo's
    queue, pointer = kind.init(jax.random.PRNGKey(0), 3, 64, 4)
    # Key j of subspace s is the vector (s, j, window, 1) (not normalised: we only track identity).
    items = np.arange(BATCH)
    keys = np.stack(
        [np.stack([np.full(BATCH, s), items, items % 2, np.ones(BATCH)], axis=1) for s in range(3)]
    ).astype(np.float32)

    def per_device(queue, pointer, local_keys, windows):
        return kind.enqueue(
            queue,
            pointer,
            mesh_lib.gather(local_keys.swapaxes(0, 1)).swapaxes(0, 1),
            mesh_lib.gather(windows),
        )

    sharded = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(jax.P(), jax.P(), jax.P(None, "data"), jax.P("data")),
        out_specs=(jax.P(), jax.P()),
    )
    new_queue, new_pointer = jax.jit(sharded)(queue, pointer, keys, (items % 2).astype(np.int32))
    new_queue = np.asarray(new_queue)
    for window in (0, 1):
        expected = keys[:, items % 2 == window]  # that window's keys, in global batch order
        np.testing.assert_array_equal(new_queue[:, window, : BATCH // 2], expected)
    np.testing.assert_array_equal(new_pointer, [BATCH // 2, BATCH // 2])


def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path):
    settings = tiny_settings(max_steps=3)  # 2 steps per epoch: the labels are fitted at step 2
    source = fake_source()
    mesh = mesh_lib.data_mesh(jax.devices()[:1])
    straight = train.train(settings, str(tmp_path / "straight"), source, mesh=mesh)

    # "Interrupted" after one step (a checkpoint is written at the end).
    first = train.train(
        settings.replace(train={"max_steps": 1}), str(tmp_path / "resumed"), source, mesh=mesh
    )
    resumed = train.train(settings, str(tmp_path / "resumed"), source, mesh=mesh)
    assert (first["steps"], resumed["resumed_from"], resumed["steps"], straight["steps"]) == (
        1,
        1,
        3,
        3,
    )

    def final_state(workdir):
        checkpoints = checkpointing.Checkpointer(
            str(workdir / "checkpoints"), every_steps=1, keep=3
        )
        run = train.setup(settings, len(source), mesh=mesh)
        template = checkpointing.replicated_target(
            mesh_lib.replicate(run.initial_state, mesh), mesh
        )
        state = checkpoints.restore(3, template)
        checkpoints.close()
        return jax.device_get(state)

    jax.tree.map(
        np.testing.assert_array_equal,
        final_state(tmp_path / "resumed"),
        final_state(tmp_path / "straight"),
    )
    assert os.path.exists(tmp_path / "resumed" / "checkpoints" / "1" / "data_position")
    assert os.path.exists(tmp_path / "straight" / "encoder")
    assert os.path.exists(tmp_path / "straight" / "change" / "histogram_epoch=000.png")


def test_input_position_saved_by_two_hosts_resumes_on_one_and_on_four_hosts(tmp_path):
    settings = tiny_settings(batch_size=8)  # 4 locations per global batch: 4 batches per epoch
    source = fake_source()
    stream = pipeline.Stream.of(settings.method.method, 8, settings.seed, len(source))

    def global_item_ids(hosts, start_batch, steps):
        """The global batches' item ids, assembled from ``hosts`` simulated processes."""
        iterators = [
            pipeline.make_pipeline(
                settings.input,
                source,
                stream,
                start_batch=start_batch,
                process_index=index,
                process_count=hosts,
            )
            for index in range(hosts)
        ]
        return np.stack(
            [np.concatenate([next(it)["item_id"] for it in iterators]) for _ in range(steps)]
        )

    uninterrupted = global_item_ids(1, 0, 10)  # crosses two epoch boundaries (new orders)
    np.testing.assert_array_equal(global_item_ids(2, 0, 3), uninterrupted[:3])
    # Two hosts stop after step 3; what they save does not name a process.
    checkpoints = checkpointing.Checkpointer(str(tmp_path), every_steps=1, keep=1)
    position = pipeline.Position(3, stream)
    checkpoints.save(3, {"step": np.int32(3)}, data_position=position.to_json())
    checkpoints.wait()
    written = os.listdir(tmp_path / "3" / "data_position")  # grain's were process_<i>-of-<n>.json
    assert "metadata" in written and not any("process" in name for name in written)
    saved = pipeline.Position.from_json(checkpoints.restore_data_position(3))
    assert saved == position
    for hosts in (1, 4):
        start = saved.start_batch(stream)
        assert start == 3
        np.testing.assert_array_equal(global_item_ids(hosts, start, 7), uninterrupted[3:])
    with pytest.raises(ValueError, match="seed=0, this run has seed=5"):
        saved.start_batch(dataclasses.replace(stream, seed=5))
    checkpoints.close()


def test_non_finite_state_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    mesh = mesh_lib.data_mesh(jax.devices()[:1])
    settings = tiny_settings(max_steps=1).replace(checkpoint={"every_steps": 1})
    train.train(settings, str(tmp_path), fake_source(), mesh=mesh)
    # Resumed with a learning rate of 1e38: the next update sends the parameters to Inf.
    settings = settings.replace(
        train={"max_steps": 3, "base_learning_rate": 1e38, "allow_config_change": True}
    )
    with pytest.raises(train.NonFiniteLossError, match="last good checkpoint is step 1"):
        train.train(settings, str(tmp_path), fake_source(), mesh=mesh)
    checkpoints = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), every_steps=1, keep=3)
    assert checkpoints.latest_step() == 1  # nothing of the bad state was saved
    checkpoints.close()


def test_checkpoint_written_on_eight_devices_restores_on_one(tmp_path):
    settings = tiny_settings()
    mesh8 = mesh_lib.data_mesh()
    mesh1 = mesh_lib.data_mesh(jax.devices()[:1])
    run = train.setup(settings, NUM_LOCATIONS, mesh=mesh8)
    state = mesh_lib.replicate(run.initial_state, mesh8)
    state = state.replace(step=state.step + 7, rng=jax.random.PRNGKey(42))
    checkpoints = checkpointing.Checkpointer(str(tmp_path), every_steps=1, keep=2)
    checkpoints.save(7, state, config=settings.to_dict())
    checkpoints.wait()
    target = checkpointing.replicated_target(mesh_lib.replicate(run.initial_state, mesh1), mesh1)
    restored = checkpoints.restore(7, target)
    checkpoints.close()
    leaves = jax.tree.leaves(restored)
    assert all(leaf.sharding.mesh.devices.size == 1 for leaf in leaves)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))


def test_sigterm_requests_a_checkpoint_and_a_stop(tmp_path):
    checkpoints = checkpointing.Checkpointer(str(tmp_path), every_steps=100, keep=1)
    with checkpointing.PreemptionGuard(checkpoints) as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop(2)
    checkpoints.close()


def test_batch_that_splits_a_location_across_devices_is_refused():
    settings = tiny_settings(batch_size=8)  # 8 items on 8 devices: one item per device
    with pytest.raises(ValueError, match="batch_size"):
        train.setup(settings, NUM_LOCATIONS, mesh=mesh_lib.data_mesh())


def test_bad_training_values_name_their_key():
    config = tiny_config()
    config.train.milestones = (1, 5)
    with pytest.raises(SettingsError, match=r"config\.train\.milestones"):
        config_lib.validate(config)
    config = tiny_config()
    config.method.name = "simclr"
    with pytest.raises(SettingsError, match=r"config\.method\.name"):
        config_lib.validate(config)
    config = tiny_config()
    config.model.compute_dtype = "float16"
    with pytest.raises(SettingsError, match=r"config\.model\.compute_dtype"):
        config_lib.validate(config)
