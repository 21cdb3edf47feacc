"""The key side as an exponential moving average of the query side.

Official behaviour (``MocoV2._momentum_update_key_encoder``): at the start of every training step,
before any forward pass, each PARAMETER of the key encoder and key heads becomes ``m * key + (1 - m)
* query`` with m = 0.999; the key side starts as a copy of the query side. Buffers are not averaged:
the key encoder keeps its own BatchNorm running statistics, which its train-mode forward passes
update but nothing in training reads (train-mode BatchNorm normalises with the batch's own
statistics; evaluators use the query encoder). So pass the ``nnx.Param`` state only, e.g.
``nnx.state(model, nnx.Param)``.
"""

from __future__ import annotations

import jax


def ema_update(target, online, momentum: float):
    """Returns ``momentum * target + (1 - momentum) * online`` leaf by leaf, in the target's dtype.

    ``target`` and ``online`` must be pytrees of the same structure (the key and query parameters).
    """

    def average(t, o):
        return (momentum * t + (1.0 - momentum) * o.astype(t.dtype)).astype(t.dtype)

    return jax.tree.map(average, target, jax.lax.stop_gradient(online))
