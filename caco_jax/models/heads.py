"""Projection heads: one MLP per embedding subspace, as in SeCo/CACo's ``heads_q`` / ``heads_k``."""

import math

import jax
import jax.numpy as jnp
from flax import nnx


def torch_linear(in_features, out_features, *, dtype, rngs):
    """A Linear layer initialised as ``torch.nn.Linear``'s default (the official heads use it).

    torch draws the weight from kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    and the bias from the same range.
    """
    bound = 1.0 / math.sqrt(in_features)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def l2_normalize(x, eps=1e-12):
    """``torch.nn.functional.normalize`` over the last axis, in (at least) float32."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


class ProjectionHead(nnx.Module):
    """Linear(d, d) - ReLU - Linear(d, out), no normalisation layers."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.hidden = torch_linear(in_features, in_features, dtype=dtype, rngs=rngs)
        self.output = torch_linear(in_features, out_features, dtype=dtype, rngs=rngs)

    def __call__(self, features):
        return self.output(nnx.relu(self.hidden(features)))


class SubspaceHeads(nnx.Module):
    """One ``ProjectionHead`` per embedding subspace, all applied to the same features.

    ``heads(features)`` maps features [..., d] to L2-normalised float32 embeddings [S, ..., out],
    so a stack of views [V, N, d] gives [S, V, N, out] in one call.
    """

    def __init__(
        self,
        in_features: int,
        num_subspaces: int,
        out_features: int = 128,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        if num_subspaces < 1:
            raise ValueError(f"SubspaceHeads needs num_subspaces >= 1, got {num_subspaces!r}")
        self.heads = nnx.List(
            [
                ProjectionHead(in_features, out_features, rngs=rngs, dtype=dtype)
                for _ in range(num_subspaces)
            ]
        )

    def __call__(self, features):
        return jnp.stack([l2_normalize(head(features)) for head in self.heads])


class LinearClassifier(nnx.Module):
    """Dropout(p) on the features, then Linear(d, classes) (pl_bolts' `SSLEvaluator` without a
    hidden layer, SeCo's BigEarthNet head). `rngs` (stream `dropout`) is needed in training mode
    only."""

    def __init__(self, in_features: int, num_classes: int, *, dropout: float, rngs: nnx.Rngs):
        self.dropout = nnx.Dropout(dropout)
        self.linear = torch_linear(in_features, num_classes, dtype=jnp.float32, rngs=rngs)

    def __call__(self, features, *, rngs: nnx.Rngs | None = None):
        return self.linear(self.dropout(features, rngs=rngs))
