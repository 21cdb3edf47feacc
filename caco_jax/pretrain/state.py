"""The model, its optimiser and the training state: one immutable pytree holding everything a
resume needs.

Parameters and BatchNorm statistics are kept as pure nested dicts (``nnx.to_pure_dict``), so the
state is a plain pytree that `jax.shard_map`, optax and Orbax handle without knowing about NNX;
`nnx.merge` with the static `Model.graphdef` turns them back into modules inside the step.

The key side is an exponential moving average of the query side (`ema_update`). Official behaviour
(``MocoV2._momentum_update_key_encoder``): at the start of every training step, before any forward
pass, each PARAMETER of the key encoder and key heads becomes ``m * key + (1 - m) * query`` with
m = 0.999; the key side starts as a copy of the query side. Buffers are not averaged: the key
encoder keeps its own BatchNorm running statistics, which its train-mode forward passes update but
nothing in training reads (train-mode BatchNorm normalises with the batch's own statistics;
evaluators use the query encoder).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from caco_jax import methods
from caco_jax.models.heads import SubspaceHeads
from caco_jax.models.resnet import ResNet
from caco_jax.pretrain import change as change_lib
from caco_jax.settings import Section


@dataclasses.dataclass(frozen=True)
class ModelSettings(Section):
    """`config.model`: the encoder and its projection heads."""

    SECTION = "model"
    depth: int = 18  # ResNet-18 or -50 (10: one block per stage, for tests and smoke runs)
    width: int = 64  # channels of the first stage (torchvision: 64); smaller for tiny test networks
    embedding_dim: int = 128  # output width of each projection head
    # "bfloat16": mixed precision, float32 params and statistics; "float64" (with x64 enabled) is
    # for the tests that compare runs bit for bit
    compute_dtype: str = "float32"

    def validate(self) -> None:
        self.require(
            self.depth in (10, 18, 50), "depth", "must be 18 or 50 (or 10, a test network)"
        )
        self.require(self.width >= 1, "width", "must be >= 1")
        self.require(self.embedding_dim >= 1, "embedding_dim", "must be >= 1")
        self.require(
            self.compute_dtype in (*methods.COMPUTE_DTYPES, "float64"),
            "compute_dtype",
            f"one of {methods.COMPUTE_DTYPES}",
        )


class ContrastiveModel(nnx.Module):
    """A ResNet encoder and one projection head per embedding subspace (f_q or f_k of the paper)."""

    def __init__(self, encoder: ResNet, heads: SubspaceHeads):
        self.encoder = encoder
        self.heads = heads

    def __call__(self, images):
        """Images [N, H, W, C] -> L2-normalised embeddings [S, N, out]."""
        return self.heads(self.encoder(images))


@dataclasses.dataclass(frozen=True)
class Model:
    """The static half of a `ContrastiveModel` (its graph), shared by the query and key sides.

    Both sides have the same structure and BatchNorm axis (`step.bn_axis`); they differ only in
    their parameters and statistics, which live in the `TrainState`.
    """

    graphdef: Any
    encoder_graphdef: Any  # the encoder alone, for exports

    def __call__(self, params, stats) -> ContrastiveModel:
        return nnx.merge(self.graphdef, params, stats)

    def encoder(self, params, stats) -> ResNet:
        return nnx.merge(self.encoder_graphdef, params["encoder"], stats["encoder"])


class TrainState(struct.PyTreeNode):
    """Everything that changes during pretraining; every leaf an array, replicated over the mesh."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    rng: jax.Array  # uint32 [2]: the run's root key; per-step keys are folded from it and `step`
    query_params: Any
    query_stats: Any  # BatchNorm running statistics of the query encoder
    key_params: Any  # EMA of query_params
    key_stats: Any  # the key encoder's own BatchNorm statistics
    opt_state: Any
    queue: Any  # the mode's negative queue (see caco_jax/pretrain/queue.py)
    change: Any  # per-item running change statistics and labels (see caco_jax/pretrain/change.py)
    all_finite: jax.Array  # bool scalar: False once any loss was NaN/Inf (checked on the host)


def build_model(
    depth: int,
    num_subspaces: int,
    embedding_dim: int,
    *,
    seed: int,
    compute_dtype: str,
    bn_axis: str | None,
    in_channels: int = 3,
    width: int = 64,
) -> tuple[Model, Any, Any]:
    """The static `Model` and the initial (params, BatchNorm stats) as pure dicts."""
    dtype = jnp.dtype(compute_dtype)

    def make():
        rngs = nnx.Rngs(seed)
        encoder = ResNet(
            depth,
            rngs=rngs,
            dtype=dtype,
            bn_axis_name=bn_axis,
            in_channels=in_channels,
            width=width,
        )
        heads = SubspaceHeads(
            encoder.feature_dim, num_subspaces, embedding_dim, rngs=rngs, dtype=dtype
        )
        return ContrastiveModel(encoder, heads)

    def graphdef(module):
        return nnx.split(module, nnx.Param, nnx.BatchStat)[0]

    abstract = nnx.eval_shape(make)
    model = Model(graphdef(abstract), graphdef(abstract.encoder))

    @jax.jit
    def initial_values():  # one compiled program instead of one dispatch per initialiser
        _, params, stats = nnx.split(make(), nnx.Param, nnx.BatchStat)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

    params, stats = initial_values()
    return model, params, stats


def make_optimizer(
    *,
    learning_rate: optax.Schedule,
    momentum: float,
    weight_decay: float,
) -> optax.GradientTransformation:
    """torch.optim.SGD(momentum, weight_decay): decay added to the gradient before the momentum."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum),
    )


def learning_rate_schedule(
    *, base_learning_rate: float, batch_size: int, steps_per_epoch: int, milestones
) -> optax.Schedule:
    """lr = base x batch/256, multiplied by 0.1 at the first step of each milestone epoch."""
    peak = base_learning_rate * batch_size / 256
    return optax.piecewise_constant_schedule(
        peak, {int(epoch) * steps_per_epoch: 0.1 for epoch in milestones}
    )


def initial_state(rng, params, stats, optimizer, queue, num_change_items: int) -> TrainState:
    """Step 0: the key side a copy of the query side, a fresh optimiser, the initial ``queue``
    (keys, pointer), and per-item change statistics for ``num_change_items`` items, none seen
    and none labelled changed (epoch 0)."""
    keys, pointer = queue
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=rng,
        query_params=params,
        query_stats=stats,
        key_params=jax.tree.map(jnp.copy, params),
        key_stats=jax.tree.map(jnp.copy, stats),
        opt_state=optimizer.init(params),
        queue={"keys": keys, "pointer": pointer},
        change={
            "running": change_lib.init_running_change(num_change_items),
            "labels": jnp.zeros((num_change_items,), bool),
        },
        all_finite=jnp.ones((), bool),
    )


def ema_update(target, online, momentum: float):
    """``momentum * target + (1 - momentum) * online`` leaf by leaf, in the target's dtype: the key
    side's parameters after one step (pass parameters only, not BatchNorm statistics).

    ``target`` and ``online`` must be pytrees of the same structure (the key and query parameters).
    """

    def average(t, o):
        return (momentum * t + (1.0 - momentum) * o.astype(t.dtype)).astype(t.dtype)

    return jax.tree.map(average, target, jax.lax.stop_gradient(online))
