"""Hue rotation through HSV, for machines without dm-pix.

`augment.adjust_hue` uses dm-pix's ``adjust_hue`` wherever dm-pix is installed (it is a core
dependency, so every training run does). This module is the same operation written from the
textbook hexcone model, used only where dm-pix cannot be imported (a benchmark machine that has
just JAX, Flax and Optax: ``benchmarks/device_check.py``). The two agree to float32 rounding
(tests/test_hsv.py) and cost the same kind of elementwise work.
"""

from __future__ import annotations

import jax.numpy as jnp


def rgb_to_hsv(red, green, blue):
    """Planes in [0, 1] -> hue (turns, [0, 1)), saturation, value."""
    value = jnp.maximum(jnp.maximum(red, green), blue)
    chroma = value - jnp.minimum(jnp.minimum(red, green), blue)
    grey = chroma == 0
    safe_chroma = jnp.where(grey, 1.0, chroma)
    # The sector is set by the largest channel (red wins ties, then green).
    sixths = jnp.where(
        value == red,
        (green - blue) / safe_chroma,
        jnp.where(
            value == green, (blue - red) / safe_chroma + 2.0, (red - green) / safe_chroma + 4.0
        ),
    )
    hue = jnp.where(grey, 0.0, (sixths / 6.0) % 1.0)
    saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0), 0.0)
    return hue, saturation, value


def hsv_to_rgb(hue, saturation, value):
    """Hue (turns), saturation, value -> red, green, blue planes."""

    def channel(offset):
        # Distance of the hue from this channel's own sixth, as a trapezoid in [0, 1].
        k = (offset + hue * 6.0) % 6.0
        return value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

    return channel(5.0), channel(3.0), channel(1.0)


def adjust_hue(image, delta):
    """Rotates the hue of an RGB image ``[..., 3]`` by ``delta`` turns: ``(h + delta) % 1``."""
    hue, saturation, value = rgb_to_hsv(image[..., 0], image[..., 1], image[..., 2])
    return jnp.stack(hsv_to_rgb((hue + delta) % 1.0, saturation, value), axis=-1)
