"""One pretraining step, written for one device with named-axis collectives, run by `jax.shard_map`.

The mesh is 1-D, ``('data',)``, spanning every device of every host. The state is replicated; the
batch is split along its rows (each device holds whole locations: rows 2l, 2l+1 never straddle two
devices). Per device, in the official order:

1. EMA of the key encoder and heads from the query side (parameters only), before any forward pass.
2. The views of this device's items, augmented on the device (`augment.make_views`).
3. Key forwards, no gradient, one per key view (each view is its own BatchNorm batch, as in the
   official loop over ``img_k[i]``); key head s on view v gives ``z_k[s, v]``. Keys are
   all-gathered: every query sees the negatives of the whole global batch.
4. CACo only: the change statistics from the KEY encoder's subspace-1 embeddings of the query views
   and of the k1 views, folded into the running per-item values (every device applies the whole
   batch).
5. The query forward and the method's objective over this device's query rows; gradients.
   `shard_map` sums the gradients of replicated parameters over devices, so each device
   differentiates its local mean loss divided by the device count: the sum is the gradient of the
   global mean, exactly.
6. SGD on the query side; the gathered keys enqueued in global batch order.

BatchNorm modes (``config.train.bn_mode``, one of `methods.BN_MODES`):
  per_device: statistics of each device's rows (the official single-GPU run is this on one device);
    the running statistics are averaged over devices after the step so that the state stays
    replicated.
  sync: statistics over the global batch (``bn_axis_name='data'``); N devices compute exactly what
    one device computes on the same global batch.
  shuffle: MoCo's shuffle-BN (``batch_shuffle_ddp`` / ``batch_unshuffle_ddp``) for the key encoder:
    each key view's global batch is permuted by one permutation shared by all devices (a fresh one
    per view and step), device d encodes rows ``order[d * n:(d + 1) * n]`` with its own BatchNorm
    statistics, and the features are unpermuted, so a query and its positive key rarely share
    BatchNorm statistics. The query encoder is per device. As in per_device mode the key encoder's
    running statistics are the mean of the devices' (MoCo's DDP keeps rank 0's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from caco_jax.methods import BN_MODES, Method, MethodSettings
from caco_jax.pretrain import change as change_lib
from caco_jax.pretrain import objectives
from caco_jax.pretrain import queue as queue_lib
from caco_jax.pretrain.change import ChangeSettings
from caco_jax.pretrain.state import Model, TrainState, ema_update
from caco_jax.runtime.mesh import AXIS, gather


def _local_rows(x, n):
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(AXIS) * n, n, axis=0)


def _encode_plain(encoder, images, shuffle_key):
    del shuffle_key
    return encoder(images)


def _encode_shuffled(encoder, images, shuffle_key):
    """MoCo's batch_shuffle_ddp / batch_unshuffle_ddp: BatchNorm sees a random batch slice."""
    n = images.shape[0]
    everyone = gather(images)
    order = jax.random.permutation(shuffle_key, everyone.shape[0])
    features = encoder(_local_rows(everyone[order], n))
    restored = gather(features)[jnp.argsort(order)]
    return _local_rows(restored, n)


def bn_axis(bn_mode: str) -> str | None:
    """The `bn_axis_name` of both encoders: the data axis for ``sync``, else per device."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    return AXIS if bn_mode == "sync" else None


def _replicated_mean(tree):
    """Per-device values (running BatchNorm statistics) -> their mean, the same on every device."""
    return jax.tree.map(lambda x: jax.lax.pmean(x, AXIS), tree)


def key_forwards(model: Model, key_params, key_stats, views, shuffle_key, bn_mode: str):
    """The key encoder and heads on each view of ``views`` [V, n, h, w, c] (this device's rows).

    Each view is its own BatchNorm batch, as in the official loop over ``img_k[i]``; the views run
    as one scanned program (one copy of the encoder in the compiled step). In shuffle mode view v is
    permuted with ``jax.random.split(shuffle_key, V)[v]``. Returns the embeddings [V, S, n, D]
    (no gradient) and the key encoder's running statistics after the V forwards, averaged over the
    devices.
    """
    encode = _encode_shuffled if bn_mode == "shuffle" else _encode_plain

    def forward(stats, inputs):
        images, view_key = inputs
        key_model = model(key_params, stats)
        key_model.train()
        embeddings = key_model.heads(encode(key_model.encoder, images, view_key))
        return nnx.to_pure_dict(nnx.state(key_model, nnx.BatchStat)), embeddings

    per_device_stats = jax.lax.pcast(key_stats, AXIS, to="varying")
    view_keys = jax.random.split(shuffle_key, views.shape[0])
    stats, embeddings = jax.lax.scan(forward, per_device_stats, (views, view_keys))
    return jax.lax.stop_gradient(embeddings), _replicated_mean(stats)


def make_per_device_step(
    model: Model,
    method: Method,
    optimizer: optax.GradientTransformation,
    learning_rate: optax.Schedule,
    make_views: Callable,
    *,
    contrast: MethodSettings,
    change: ChangeSettings,
    bn_mode: str,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The step for one device's rows: ``contrast`` gives the temperature and key momentum,
    ``change`` the change estimate (read when the method tracks change), ``bn_mode`` how BatchNorm
    batches are formed (`methods.BN_MODES`).

    ``make_views(key, images, item_ids) -> [1 + S, n, h, w, c]`` (q, k0, ...).
    """
    bn_axis(bn_mode)  # checks the mode

    def step(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict]:
        num_devices = jax.lax.axis_size(AXIS)
        item_ids = batch["item_id"]
        n = item_ids.shape[0]
        step_key = jax.random.fold_in(state.rng, state.step)
        views_key, shuffle_key = jax.random.split(step_key)
        # Augmentation randomness is a function of (seed, step, item), not of the device layout.
        views = make_views(views_key, batch["images"], item_ids)
        query_views, key_views = views[0], views[1:]

        key_params = ema_update(state.key_params, state.query_params, contrast.key_momentum)
        # CACo also embeds the query views with the key encoder (for the change statistics).
        num_keys = key_views.shape[0]
        key_inputs = (
            jnp.concatenate([key_views, query_views[None]]) if method.tracks_change else key_views
        )
        key_embeddings, key_stats = key_forwards(
            model, key_params, state.key_stats, key_inputs, shuffle_key, bn_mode
        )  # [views, S, n, D]
        z_k = key_embeddings[:num_keys].transpose(1, 0, 2, 3)  # z_k[s, v]: key head s on view v
        z_k_global = gather(z_k.transpose(2, 0, 1, 3)).transpose(1, 2, 0, 3)  # [S, S, N, D]
        item_ids_global = gather(item_ids)

        change_state = state.change
        labels = None
        if method.tracks_change:
            statistics = change_lib.change_statistics(
                key_embeddings[num_keys, 1], z_k[1, 1], change.epsilon
            )
            running = change_lib.update_running_change(
                change_state["running"],
                item_ids_global,
                gather(statistics),
                beta=change.beta,
                use_ema=change.use_ema,
            )
            change_state = {**change_state, "running": running}
            labels = change_state["labels"][item_ids]

        def loss_fn(query_params):
            query_model = model(query_params, state.query_stats)
            query_model.train()
            z_q = query_model(query_views)  # [S, n, D]
            loss, metrics = objectives.LOSSES[method.queue](
                z_q,
                z_k_global,
                state.queue["keys"],
                labels,
                contrast.temperature,
                jax.lax.axis_index(AXIS) * n,
            )
            stats = nnx.to_pure_dict(nnx.state(query_model, nnx.BatchStat))
            return loss / num_devices, (loss, metrics, stats)

        grads, (loss, metrics, query_stats) = jax.grad(loss_fn, has_aux=True)(state.query_params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.query_params)
        query_params = optax.apply_updates(state.query_params, updates)

        keys, pointer = queue_lib.QUEUES[method.queue].enqueue(
            state.queue["keys"],
            state.queue["pointer"],
            queue_lib.keys_to_enqueue(z_k_global),
            gather(batch["window"]),
        )
        loss = jax.lax.pmean(loss, AXIS)
        metrics = {name: jax.lax.pmean(value, AXIS) for name, value in metrics.items()}
        metrics["loss"] = loss
        metrics["learning_rate"] = learning_rate(state.step)
        changed = jnp.zeros((n,), bool) if labels is None else labels
        metrics["changed_fraction"] = jax.lax.pmean(jnp.mean(changed.astype(jnp.float32)), AXIS)
        new_state = state.replace(
            step=state.step + 1,
            query_params=query_params,
            query_stats=_replicated_mean(query_stats),
            key_params=key_params,
            key_stats=key_stats,
            opt_state=opt_state,
            queue={"keys": keys, "pointer": pointer},
            change=change_state,
            # The parameters too: a finite loss can still be followed by an update to Inf.
            all_finite=state.all_finite
            & jnp.isfinite(loss)
            & jnp.isfinite(optax.global_norm(query_params)),
        )
        return new_state, metrics

    return step


def make_train_step(mesh: jax.sharding.Mesh, per_device_step: Callable) -> Callable:
    """jit(shard_map(step)): replicated state in and out, the batch split along its rows."""
    sharded = jax.shard_map(
        per_device_step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P())
    )
    return jax.jit(sharded, donate_argnums=(0,))
