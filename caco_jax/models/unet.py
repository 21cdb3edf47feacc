"""SeCo's U-Net decoder (`models/segmentation.py`), used by CACo for OSCD change detection and here
also for DynamicEarthNet semantic segmentation.

The encoder's maps at five depths (the stem convolution before its BatchNorm, stride 2, and the four
ResNet stages, strides 4 to 32) are the skip inputs: for change detection the absolute difference of
the two dates' maps (`feature_differences`), for segmentation one image's maps (`skip_features`).
From the deepest, each decoder level upsamples x2 (nearest), reduces channels with a 3x3 conv,
concatenates the next skip, fuses with a bias-free 3x3 conv, BatchNorm, ReLU and channel dropout
(0.3); a last x2 upsampling and a 1x1 conv give the logits of every input pixel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from caco_jax.models.resnet import BatchNorm, ResNet

# torch's default Conv2d initialisation (kaiming_uniform with a=sqrt(5)): uniform in
# +-1/sqrt(fan_in).
torch_conv_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_conv(in_channels, out_channels, kernel_size, *, use_bias, rngs):
    fan_in = in_channels * kernel_size * kernel_size
    bound = 1.0 / fan_in**0.5
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(kernel_size, kernel_size),
        padding=kernel_size // 2,
        use_bias=use_bias,
        kernel_init=torch_conv_init,
        bias_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
        rngs=rngs,
    )


def skip_features(encoder: ResNet, images) -> list[jax.Array]:
    """[stem conv (stride 2), c2, c3, c4, c5] of the encoder, the official
    `feature_indices=(0, 4, 5, 6, 7)` of `nn.Sequential(conv1, bn1, relu, maxpool, layer1..layer4)`,
    by the ResNet's submodule names; the stem output is taken before BatchNorm, as index 0 of the
    official Sequential is."""
    stem = encoder.conv1(images)
    x = nnx.relu(encoder.bn1(stem))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features = [stem.astype(jnp.float32)]
    for layer in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4):
        for block in layer:
            x = block(x)
        features.append(x.astype(jnp.float32))
    return features


def feature_differences(encoder: ResNet, images_1, images_2) -> list[jax.Array]:
    """|f(x1) - f(x2)| at each skip depth; the frozen encoder receives no gradient.

    The dates go through the encoder one after the other, as SeCo's `SegmentationEncoder` did: in
    training mode each date's batch is normalised with its own BatchNorm statistics, and the
    running statistics are updated once per date."""
    first = skip_features(encoder, images_1)
    second = skip_features(encoder, images_2)
    return [jax.lax.stop_gradient(jnp.abs(a - b)) for a, b in zip(first, second, strict=True)]


def upsample2(x):
    """Nearest-neighbour x2 upsampling of NHWC maps."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class UNetDecoder(nnx.Module):
    """The decoder over `skip_channels` = (stem, c2, c3, c4, c5) widths, e.g. (64, 64, 128, 256,
    512), with `num_outputs` logits per pixel."""

    def __init__(
        self, skip_channels, num_outputs: int, *, rngs: nnx.Rngs, dropout_rate: float = 0.3
    ):
        levels = len(skip_channels) - 1
        self.reduce = nnx.List(
            [
                _torch_conv(skip_channels[i + 1], skip_channels[i], 3, use_bias=True, rngs=rngs)
                for i in range(levels)
            ]
        )
        self.fuse = nnx.List(
            [
                _torch_conv(2 * skip_channels[i], skip_channels[i], 3, use_bias=False, rngs=rngs)
                for i in range(levels)
            ]
        )
        self.norm = nnx.List([BatchNorm(skip_channels[i]) for i in range(levels)])
        # Dropout2d: whole channels, the same mask over height and width.
        self.dropout = nnx.Dropout(dropout_rate, broadcast_dims=(1, 2))
        self.head = _torch_conv(skip_channels[0], num_outputs, 1, use_bias=True, rngs=rngs)

    def __call__(self, skips: list[jax.Array], *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Logits [N, H, W, num_outputs] at twice the resolution of the first skip; `rngs` (stream
        `dropout`) is needed in training mode only."""
        x = skips[-1]
        for i in reversed(range(len(skips) - 1)):
            x = self.reduce[i](upsample2(x))
            skip = skips[i]
            if skip.shape[1] != x.shape[1]:
                skip = upsample2(skip)
            x = self.fuse[i](jnp.concatenate([x, skip], axis=-1))
            x = self.dropout(nnx.relu(self.norm[i](x)), rngs=rngs)
        return self.head(upsample2(x))


class ChangeDecoder(UNetDecoder):
    """OSCD's decoder: one change logit per pixel, [N, H, W]."""

    def __init__(self, skip_channels, *, rngs: nnx.Rngs, dropout_rate: float = 0.3):
        super().__init__(skip_channels, 1, rngs=rngs, dropout_rate=dropout_rate)

    def __call__(self, skips: list[jax.Array], *, rngs: nnx.Rngs | None = None) -> jax.Array:
        return super().__call__(skips, rngs=rngs)[..., 0]


def skip_channels(encoder: ResNet) -> tuple[int, ...]:
    return (encoder.conv1.out_features, *encoder.stage_dims)
