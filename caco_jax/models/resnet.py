"""torchvision's ResNet-18/34/50/101/152 in Flax NNX, without the classifier, and a ResNet-10.

The layout, padding, initialisation and BatchNorm semantics are torchvision's
(``resnet{depth}()`` with ``zero_init_residual=False``; ResNet v1.5: the stride of a bottleneck sits
on its 3x3 convolution), and so are the submodule names (``conv1, bn1, layer1..layer4``; blocks
``conv1, bn1, conv2, bn2[, conv3, bn3][, downsample]``; ``downsample`` = [1x1 conv, BatchNorm]).
A PyTorch state dict therefore maps onto the NNX state one key at a time
(``layer2.0.downsample.1.running_var`` -> ``layer2/0/downsample/1/var``). Images are NHWC.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu"): an untruncated normal with
# variance 2 / (out_channels * kernel_height * kernel_width).
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class BatchNorm(nnx.Module):
    """``torch.nn.BatchNorm2d`` over the channel axis of NHWC inputs, statistics in float32.

    Differs from ``nnx.BatchNorm`` where torch differs: the running variance is updated with the
    unbiased batch variance, the variance is computed in two passes, and the normalisation runs in
    float32 (the running statistics are never rounded to the compute dtype). ``momentum`` is the
    decay of the running averages (flax's convention): 0.9 here is torch's ``momentum=0.1``.

    With ``axis_name`` set, the batch statistics are averaged over that named mesh axis
    (synchronised BatchNorm inside ``jax.shard_map``); every shard must hold the same number of
    examples.
    """

    def __init__(
        self,
        num_features: int,
        *,
        dtype=jnp.float32,
        axis_name: str | None = None,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
    ):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.use_running_average = False  # torch modules start in training mode
        self.dtype = dtype
        self.axis_name = axis_name
        self.momentum = momentum
        self.epsilon = epsilon

    def _batch_stats(self, x):
        reduce_axes = tuple(range(x.ndim - 1))
        count = math.prod(x.shape[:-1])
        mean = jnp.mean(x, axis=reduce_axes)
        if self.axis_name is not None:
            mean = jax.lax.pmean(mean, self.axis_name)
            count *= jax.lax.axis_size(self.axis_name)
        if count < 2:  # torch refuses this too: the unbiased variance needs two values
            raise ValueError(
                f"BatchNorm in training mode needs more than one value per channel, got input "
                f"shape {x.shape}; use eval mode or a larger batch"
            )
        var = jnp.mean(jnp.square(x - mean), axis=reduce_axes)
        if self.axis_name is not None:
            var = jax.lax.pmean(var, self.axis_name)
        return mean, var, count

    def __call__(self, x):
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float64 stays float64
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            mean, var, count = self._batch_stats(x32)
            unbiased_var = var * (count / (count - 1))
            decay = self.momentum
            self.mean[...] = jax.lax.stop_gradient(decay * self.mean[...] + (1 - decay) * mean)
            self.var[...] = jax.lax.stop_gradient(
                decay * self.var[...] + (1 - decay) * unbiased_var
            )
        scale = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
        shift = self.bias[...] - mean * scale
        return (x32 * scale + shift).astype(self.dtype)


def conv(in_channels, out_channels, kernel_size, stride, *, dtype, rngs):
    """A bias-free convolution padded like torch's ``padding=kernel_size // 2``."""
    pad = kernel_size // 2
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def downsample_or_none(in_channels, out_channels, stride, *, dtype, bn_axis_name, rngs):
    """torchvision's projection shortcut (1x1 conv with the block stride, BatchNorm), if needed."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nnx.List(
        [
            conv(in_channels, out_channels, 1, stride, dtype=dtype, rngs=rngs),
            BatchNorm(out_channels, dtype=dtype, axis_name=bn_axis_name),
        ]
    )


def apply_shortcut(downsample, x):
    """The block input through its projection shortcut, or unchanged when it has none."""
    if downsample is not None:
        for layer in downsample:
            x = layer(x)
    return x


class BasicBlock(nnx.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels, width, stride, *, dtype, bn_axis_name, rngs):
        out_channels = width * self.expansion
        self.conv1 = conv(in_channels, width, 3, stride, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(width, dtype=dtype, axis_name=bn_axis_name)
        self.conv2 = conv(width, out_channels, 3, 1, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(out_channels, dtype=dtype, axis_name=bn_axis_name)
        self.downsample = downsample_or_none(
            in_channels, out_channels, stride, dtype=dtype, bn_axis_name=bn_axis_name, rngs=rngs
        )

    def __call__(self, x):
        shortcut = apply_shortcut(self.downsample, x)
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + shortcut)


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 carrying the stride (torchvision's v1.5), 1x1 expand (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, in_channels, width, stride, *, dtype, bn_axis_name, rngs):
        out_channels = width * self.expansion
        self.conv1 = conv(in_channels, width, 1, 1, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(width, dtype=dtype, axis_name=bn_axis_name)
        self.conv2 = conv(width, width, 3, stride, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(width, dtype=dtype, axis_name=bn_axis_name)
        self.conv3 = conv(width, out_channels, 1, 1, dtype=dtype, rngs=rngs)
        self.bn3 = BatchNorm(out_channels, dtype=dtype, axis_name=bn_axis_name)
        self.downsample = downsample_or_none(
            in_channels, out_channels, stride, dtype=dtype, bn_axis_name=bn_axis_name, rngs=rngs
        )

    def __call__(self, x):
        shortcut = apply_shortcut(self.downsample, x)
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return nnx.relu(y + shortcut)


# depth -> (block, blocks per stage): torchvision's table, and ResNet-10 (one basic block per
# stage; not a torchvision builder, but `torchvision.models.resnet.ResNet(BasicBlock, [1, 1, 1, 1])`
# with the same state-dict keys), the smallest network with every kind of layer of ResNet-18, half
# its layers to compile: for tests whose subject is the step, not the network.
ARCHITECTURES = {
    10: (BasicBlock, (1, 1, 1, 1)),
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
TORCHVISION_DEPTHS = (18, 34, 50, 101, 152)  # with a builder: torchvision.models.resnet{depth}


def torchvision_arch(depth: int, width: int = 64, in_channels: int = 3) -> str:
    """The torchvision call that builds the same network (for export sidecars), or what to change
    in it: torchvision's ResNets are 64 wide and take 3 channels."""
    if width != 64:
        return (
            f"none in torchvision: a ResNet-{depth} of width {width} in torchvision's layout "
            "(torchvision's are 64 wide)"
        )
    block, blocks_per_stage = ARCHITECTURES[depth]
    call = (
        f"torchvision.models.resnet{depth}()"
        if depth in TORCHVISION_DEPTHS
        else f"torchvision.models.resnet.ResNet({block.__name__}, {list(blocks_per_stage)})"
    )
    if in_channels != 3:
        call += f", its conv1 replaced by torch.nn.Conv2d({in_channels}, 64, 7, 2, 3, bias=False)"
    return call


class ResNet(nnx.Module):
    """A torchvision ResNet without its classifier: NHWC images -> global-average-pooled features.

    Args:
      depth: 10, 18, 34, 50, 101 or 152.
      rngs: initialisation randomness.
      dtype: compute dtype (``jnp.bfloat16`` for mixed precision); parameters and BatchNorm
        statistics are always float32.
      bn_axis_name: mesh axis to synchronise BatchNorm statistics over (inside ``jax.shard_map``);
        None computes them per device, as the official single-GPU training did.
      in_channels: channels of the input images (3 for RGB, 12 or 13 for all Sentinel-2 bands).
      width: channels of the stem and the first stage (torchvision: 64); stage s has width x 2^s.
        Smaller widths make tiny networks for tests; pretrained weights are all 64.
    """

    def __init__(
        self,
        depth: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        bn_axis_name: str | None = None,
        in_channels: int = 3,
        width: int = 64,
    ):
        if depth not in ARCHITECTURES:
            raise ValueError(f"ResNet depth must be one of {sorted(ARCHITECTURES)}, got {depth!r}")
        if in_channels < 1:
            raise ValueError(f"ResNet in_channels must be positive, got {in_channels!r}")
        if width < 1:
            raise ValueError(f"ResNet width must be positive, got {width!r}")
        block, blocks_per_stage = ARCHITECTURES[depth]
        self.depth = depth
        self.in_channels = in_channels
        self.width = width
        self.dtype = dtype
        stage_widths = tuple(width * 2**stage for stage in range(4))
        self.feature_dim = stage_widths[-1] * block.expansion
        self.stage_dims = tuple(w * block.expansion for w in stage_widths)

        self.conv1 = nnx.Conv(
            in_channels,
            width,
            kernel_size=(7, 7),
            strides=(2, 2),
            padding=((3, 3), (3, 3)),
            use_bias=False,
            kernel_init=conv_init,
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        self.bn1 = BatchNorm(width, dtype=dtype, axis_name=bn_axis_name)
        channels = width
        stages = []
        for stage, (stage_width, num_blocks) in enumerate(
            zip(stage_widths, blocks_per_stage, strict=True)
        ):
            blocks = []
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(
                    block(
                        channels,
                        stage_width,
                        stride,
                        dtype=dtype,
                        bn_axis_name=bn_axis_name,
                        rngs=rngs,
                    )
                )
                channels = stage_width * block.expansion
            stages.append(nnx.List(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def __call__(self, x, return_stages: bool = False):
        """Pooled float32 features [N, feature_dim]; with ``return_stages`` also the stage outputs.

        The stages [c2, c3, c4, c5] (strides 4, 8, 16, 32; widths ``stage_dims``) are in the
        compute dtype.
        """
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"ResNet expects NHWC images with {self.in_channels} channels, got shape {x.shape}"
            )
        x = nnx.relu(self.bn1(self.conv1(x)))
        # torch pads max pooling with -inf; flax's max_pool pads with its -inf init value too.
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block(x)
            stages.append(x)
        pooled = jnp.mean(x, axis=(1, 2), dtype=jnp.promote_types(x.dtype, jnp.float32))
        if return_stages:
            return pooled, stages
        return pooled
