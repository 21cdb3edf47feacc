"""The dm-pix-free hue rotation (caco_jax/hsv.py) equals dm-pix's, which training uses."""

import dm_pix
import jax.numpy as jnp
import numpy as np
import pytest

from caco_jax import hsv


def sample_images():
    """uint8 levels in [0, 1] (ties between channels are common), grey, black and white pixels."""
    rng = np.random.default_rng(0)
    image = np.round(rng.uniform(0, 1, (32, 32, 3)) * 255) / 255
    image[0, :8] = rng.uniform(0, 1, (8, 1))  # grey: no hue
    image[1, :4], image[1, 4:8] = 0.0, 1.0
    image[2, :8, 0] = image[2, :8, 1]  # red = green
    image[3, :8, 1] = image[3, :8, 2]  # green = blue
    return jnp.asarray(image, jnp.float32)


@pytest.mark.parametrize("delta", [0.0, 0.1, -0.1, 0.25, -0.49, 0.5])
def test_hue_rotation_equals_dm_pix(delta):
    image = sample_images()
    np.testing.assert_allclose(
        hsv.adjust_hue(image, delta), dm_pix.adjust_hue(image, delta), rtol=0, atol=2e-6
    )


def test_round_trip_and_known_colours():
    image = sample_images()
    planes = hsv.rgb_to_hsv(image[..., 0], image[..., 1], image[..., 2])
    np.testing.assert_allclose(jnp.stack(hsv.hsv_to_rgb(*planes), -1), image, atol=2e-6)
    # Pure red, green, blue sit at 0, 1/3 and 2/3 of a turn; a third of a turn maps red to green.
    primaries = jnp.eye(3, dtype=jnp.float32)
    hue, saturation, value = hsv.rgb_to_hsv(primaries[:, 0], primaries[:, 1], primaries[:, 2])
    np.testing.assert_allclose(hue, [0.0, 1 / 3, 2 / 3], atol=1e-7)
    np.testing.assert_allclose((saturation, value), np.ones((2, 3)))
    np.testing.assert_allclose(hsv.adjust_hue(primaries, 1 / 3), np.eye(3)[[1, 2, 0]], atol=1e-6)
