"""Encoders, projection heads and encoder export: torchvision parity, BatchNorm modes, precision."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from caco_jax.models import resnet
from caco_jax.models.export import load_encoder, save_encoder
from caco_jax.models.heads import ProjectionHead, SubspaceHeads
from caco_jax.models.resnet import BatchNorm, ResNet

# torchvision's resnet{depth}() parameter counts minus its fc layer (512 * expansion * 1000 + 1000);
# ResNet-10 is ResNet-18 less the second block of each stage (2 x (9c^2 + 2c), c = 64 ... 512).
TORCHVISION_PARAMS_WITHOUT_FC = {
    10: 11_689_512 - 513_000 - 6_270_720,
    18: 11_689_512 - 513_000,
    34: 21_797_672 - 513_000,
    50: 25_557_032 - 2_049_000,
    101: 44_549_160 - 2_049_000,
    152: 60_192_808 - 2_049_000,
}


def count(state):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))


@nnx.jit
def forward(model, images):
    """Pooled features and stage outputs; every test shares this one jitted function."""
    return model(images, return_stages=True)


@nnx.jit
def apply(module, x):
    return module(x)


@functools.cache
def resnet18(dtype=jnp.float32):
    return ResNet(18, rngs=nnx.Rngs(0), dtype=dtype)


# One input shape for every ResNet-18 test so that they share compilations. 40 px: stage sizes
# 10, 5, 3, 2 exercise torch's padding arithmetic on odd sizes too.
BATCH_SHAPE = (8, 40, 40, 3)


def images(shape=BATCH_SHAPE, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("depth", sorted(TORCHVISION_PARAMS_WITHOUT_FC))
def test_parameter_count_equals_torchvision_without_fc(depth):
    model = nnx.eval_shape(lambda: ResNet(depth, rngs=nnx.Rngs(0)))
    assert count(nnx.state(model, nnx.Param)) == TORCHVISION_PARAMS_WITHOUT_FC[depth]
    # torch keeps running_mean and running_var per BatchNorm channel; BN has 2 params per channel.
    assert count(nnx.state(model, nnx.BatchStat)) == count(
        nnx.state(model, lambda path, _: path[-1] in ("scale", "bias"))
    )


def test_torchvision_arch_names_the_builder_or_what_differs():
    assert resnet.torchvision_arch(50) == "torchvision.models.resnet50()"
    assert resnet.torchvision_arch(10) == (
        "torchvision.models.resnet.ResNet(BasicBlock, [1, 1, 1, 1])"
    )
    assert resnet.torchvision_arch(18, in_channels=12) == (
        "torchvision.models.resnet18(), its conv1 replaced by "
        "torch.nn.Conv2d(12, 64, 7, 2, 3, bias=False)"
    )
    assert resnet.torchvision_arch(18, width=8).startswith("none in torchvision: a ResNet-18 of")


def test_resnet18_output_and_stage_shapes():
    model = resnet18()
    model.eval()
    pooled, stages = forward(model, images())
    assert model.feature_dim == 512
    assert pooled.shape == (8, 512) and pooled.dtype == jnp.float32
    assert [s.shape for s in stages] == [
        (8, 10, 10, 64),
        (8, 5, 5, 128),
        (8, 3, 3, 256),
        (8, 2, 2, 512),
    ]
    np.testing.assert_allclose(pooled, stages[-1].mean(axis=(1, 2)), rtol=1e-6, atol=1e-6)
    assert nnx.eval_shape(lambda m, x: m(x), model, images()).shape == (8, 512)


def test_resnet50_output_and_stage_shapes():
    model = nnx.eval_shape(lambda: ResNet(50, rngs=nnx.Rngs(0), in_channels=13))
    x = jax.ShapeDtypeStruct((2, 64, 64, 13), jnp.float32)
    pooled, stages = nnx.eval_shape(lambda m, x: m(x, return_stages=True), model, x)
    assert model.feature_dim == 2048 and model.stage_dims == (256, 512, 1024, 2048)
    assert pooled.shape == (2, 2048)
    assert [s.shape for s in stages] == [
        (2, 16, 16, 256),
        (2, 8, 8, 512),
        (2, 4, 4, 1024),
        (2, 2, 2, 2048),
    ]
    # torchvision v1.5: the stride of a bottleneck is on its 3x3 convolution, not the first 1x1.
    block = model.layer2[0]
    assert block.conv1.strides == (1, 1) and block.conv2.strides == (2, 2)
    assert block.downsample[0].strides == (2, 2)
    assert model.layer1[0].downsample is not None  # 64 -> 256 channels at stride 1


def test_wrong_input_and_depth_are_rejected():
    with pytest.raises(ValueError, match="3 channels"):
        resnet18()(jnp.zeros((1, 32, 32, 4)))
    with pytest.raises(ValueError, match="depth"):
        ResNet(20, rngs=nnx.Rngs(0))


def test_initialisation_is_torchvision_s():
    model = resnet18()
    # kaiming_normal_(mode="fan_out"): std = sqrt(2 / (out_channels * kh * kw)), not truncated.
    kernel = np.asarray(model.layer4[1].conv2.kernel[...])
    fan_out = 512 * 3 * 3
    assert abs(kernel.std() / math.sqrt(2 / fan_out) - 1) < 0.02
    assert np.abs(kernel).max() > 3.5 * math.sqrt(2 / fan_out)  # a truncated normal stops at 2 std
    # Every BatchNorm starts at gamma 1, beta 0 (zero_init_residual=False), mean 0, var 1.
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "scale":
            np.testing.assert_array_equal(leaf[...], 1.0, err_msg=str(path))
        elif path[-1] == "bias":
            np.testing.assert_array_equal(leaf[...], 0.0, err_msg=str(path))
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
        np.testing.assert_array_equal(leaf[...], 0.0 if path[-1] == "mean" else 1.0)


def test_batchnorm_matches_torch_semantics():
    x = np.asarray(images((4, 3, 5, 6), seed=1)) * 3.0 + 2.0
    bn = BatchNorm(6)
    y = apply(bn, jnp.asarray(x))
    flat = x.reshape(-1, 6).astype(np.float64)
    mean, var = flat.mean(0), flat.var(0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
    # torch: running = 0.9 running + 0.1 batch, with the unbiased variance.
    np.testing.assert_allclose(bn.mean[...], 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)

    bn.eval()
    stats = (np.asarray(bn.mean[...]), np.asarray(bn.var[...]))
    y_eval = apply(bn, jnp.asarray(x))
    np.testing.assert_allclose(y_eval, (x - stats[0]) / np.sqrt(stats[1] + 1e-5), rtol=1e-5)
    np.testing.assert_array_equal(bn.mean[...], stats[0])  # eval mode leaves the statistics alone
    np.testing.assert_array_equal(bn.var[...], stats[1])
    bn(jnp.zeros((1, 1, 1, 6)))  # one value per channel is fine with running statistics
    bn.train()
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn(jnp.zeros((1, 1, 1, 6)))


def test_batchnorm_gradients_flow_through_the_batch_statistics():
    bn = BatchNorm(3)
    x = images((4, 2, 2, 3), seed=9)
    weights = images((4, 2, 2, 3), seed=10)

    def loss(bn, x):
        return jnp.sum(bn(x) * weights)

    grad_bn, grad_x = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(bn, x)
    # The output is invariant to a per-channel shift of the input, so those gradients sum to 0.
    np.testing.assert_allclose(grad_x.sum(axis=(0, 1, 2)), 0.0, atol=1e-5)
    x_hat = (x - x.mean((0, 1, 2))) / jnp.sqrt(x.var((0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(grad_bn.scale[...], (x_hat * weights).sum((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(grad_bn.bias[...], weights.sum((0, 1, 2)), rtol=1e-5)
    assert np.abs(np.asarray(bn.mean[...])).max() > 0  # the running statistics still moved


def test_train_mode_uses_batch_statistics_eval_mode_running_ones():
    model = ResNet(18, rngs=nnx.Rngs(0))
    x = images(seed=2)
    other_companions = x.at[4:].set(images(seed=3)[4:] * 2.0)
    model.train()
    pooled, _ = forward(model, x)
    pooled_other, _ = forward(model, other_companions)
    # In training the first four rows see different batch statistics.
    assert not np.allclose(pooled[:4], pooled_other[:4], atol=1e-3)
    running_mean = np.asarray(model.bn1.mean[...])
    assert np.abs(running_mean).max() > 0  # statistics moved
    model.eval()
    pooled, _ = forward(model, x)
    pooled_other, _ = forward(model, other_companions)
    np.testing.assert_allclose(pooled[:4], pooled_other[:4], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(model.bn1.mean[...], running_mean)


def test_bfloat16_compute_is_close_to_float32():
    model32 = resnet18()
    model16 = resnet18(jnp.bfloat16)
    model32.eval()
    model16.eval()
    params = nnx.state(model16, nnx.Param)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    x = images(seed=4)
    p32, _ = forward(model32, x)
    p16, s16 = forward(model16, x)
    assert s16[0].dtype == jnp.bfloat16 and p16.dtype == jnp.float32
    relative = float(jnp.max(jnp.abs(p16 - p32)) / jnp.max(jnp.abs(p32)))
    print(f"bf16 vs f32 ResNet-18 pooled features: max relative difference {relative:.4f}")
    assert relative < 0.05
    assert np.corrcoef(np.ravel(p16), np.ravel(p32))[0, 1] > 0.999


def test_synchronised_batchnorm_equals_batchnorm_over_the_global_batch():
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py sets 8 CPU devices"
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    synced = ResNet(18, rngs=nnx.Rngs(0), bn_axis_name="data")
    reference = ResNet(18, rngs=nnx.Rngs(0))
    x = images(seed=5)

    graphdef, state = nnx.split(synced)

    @jax.jit
    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P())
    )
    def sharded_forward(state, x):
        model = nnx.merge(graphdef, state)
        return model(x), nnx.state(model)

    pooled, new_state = sharded_forward(state, x)
    nnx.update(synced, new_state)
    expected, _ = forward(reference, x)
    np.testing.assert_allclose(pooled, expected, rtol=2e-4, atol=2e-4)
    for ours, theirs in zip(
        jax.tree.leaves(nnx.state(synced, nnx.BatchStat)),
        jax.tree.leaves(nnx.state(reference, nnx.BatchStat)),
        strict=True,
    ):
        np.testing.assert_allclose(ours, theirs, rtol=2e-4, atol=2e-5)


def test_projection_head_init_and_shapes():
    head = ProjectionHead(64, 16, rngs=nnx.Rngs(0))
    assert head.hidden.kernel.shape == (64, 64) and head.output.kernel.shape == (64, 16)
    # torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
    bound = 1 / math.sqrt(64)
    for leaf in (head.hidden.kernel, head.hidden.bias, head.output.kernel):
        values = np.asarray(leaf[...])
        assert np.abs(values).max() <= bound
        assert np.abs(values).max() > 0.9 * bound
    assert head(jnp.ones((5, 64))).shape == (5, 16)


def test_subspace_heads_are_independent_and_normalised():
    heads = SubspaceHeads(32, 3, 8, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    features = images((4, 2, 32), seed=6)  # [views, N, d]
    z = heads(features)
    assert z.shape == (3, 4, 2, 8) and z.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)
    assert not np.allclose(z[0], z[1], atol=1e-2)  # each subspace has its own head
    single = heads.heads[2](features[1]).astype(jnp.float32)
    np.testing.assert_allclose(
        z[2, 1], single / jnp.linalg.norm(single, axis=-1, keepdims=True), atol=1e-6
    )


def test_export_round_trip(tmp_path):
    model = ResNet(18, rngs=nnx.Rngs(1))
    x = images(seed=7)
    model.train()
    forward(model, x)  # move the BatchNorm statistics away from their initial values
    model.eval()
    expected, _ = forward(model, x)
    directory = save_encoder(tmp_path / "encoder", model, {"source": "test", "step": 7})

    loaded, metadata = load_encoder(directory)
    assert metadata == {
        "source": "test",
        "step": 7,
        "arch": "resnet",
        "depth": 18,
        "width": 64,
        "in_channels": 3,
    }
    np.testing.assert_array_equal(forward(loaded, x)[0], expected)
    assert loaded.bn1.use_running_average  # evaluators get a frozen-statistics encoder

    # Restores onto another placement than it was saved from (here: replicated over 8 devices).
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated, _ = load_encoder(directory, sharding=NamedSharding(mesh, P()))
    assert replicated.conv1.kernel[...].sharding.num_devices == 8
    np.testing.assert_array_equal(replicated.bn1.var[...], model.bn1.var[...])

    with pytest.raises(FileExistsError, match="already exists"):
        save_encoder(directory, model, {})
    with pytest.raises(ValueError, match="contradicts"):
        save_encoder(tmp_path / "other", model, {"depth": 50})
    (tmp_path / "encoder.incoming").mkdir()  # left by a crash during an earlier swap
    multispectral = ResNet(18, rngs=nnx.Rngs(2), in_channels=13)
    save_encoder(directory, multispectral, {"step": 8}, overwrite=True)
    reloaded, metadata = load_encoder(directory)
    assert metadata["step"] == 8 and reloaded.in_channels == 13
    for ours, theirs in zip(
        jax.tree.leaves(nnx.state(reloaded)), jax.tree.leaves(nnx.state(multispectral)), strict=True
    ):
        np.testing.assert_array_equal(ours, theirs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder"]  # no temporary leftovers
    with pytest.raises(FileNotFoundError, match="not a complete encoder export"):
        load_encoder(tmp_path / "missing")
    (directory / "metadata").rmtree()
    with pytest.raises(FileNotFoundError, match="not a complete encoder export"):
        load_encoder(directory)


def torch_resnet18_forward(torch, state, x, training):
    """torchvision's ResNet-18 forward written with torch.nn.functional on converted NNX weights."""
    F = torch.nn.functional

    def tensor(leaf):
        return torch.from_numpy(np.array(leaf, dtype=np.float32))

    def conv(params, x, stride, padding):
        weight = tensor(params["kernel"]).permute(3, 2, 0, 1)  # HWIO -> OIHW
        return F.conv2d(x, weight, stride=stride, padding=padding)

    def bn(params, stats, x):
        return F.batch_norm(
            x, stats["mean"], stats["var"], tensor(params["scale"]), tensor(params["bias"]),
            training=training, momentum=0.1, eps=1e-5,
        )  # fmt: skip

    params, stats = state
    x = F.relu(bn(params["bn1"], stats["bn1"], conv(params["conv1"], x, 2, 3)))
    x = F.max_pool2d(x, 3, 2, 1)
    for stage in range(1, 5):
        for index in range(2):
            p, s = params[f"layer{stage}"][index], stats[f"layer{stage}"][index]
            stride = 2 if stage > 1 and index == 0 else 1
            y = F.relu(bn(p["bn1"], s["bn1"], conv(p["conv1"], x, stride, 1)))
            y = bn(p["bn2"], s["bn2"], conv(p["conv2"], y, 1, 1))
            if "downsample" in p:
                x = bn(
                    p["downsample"][1], s["downsample"][1], conv(p["downsample"][0], x, stride, 0)
                )
            x = F.relu(y + x)
    return x.mean(dim=(2, 3))


def test_matches_torch_functional_resnet18_in_train_and_eval_mode():
    torch = pytest.importorskip("torch")
    model = ResNet(18, rngs=nnx.Rngs(3))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    stats = jax.tree.map(
        lambda v: torch.from_numpy(np.array(v, np.float32)),
        nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
    )
    x = images(seed=8)
    x_torch = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)
    for training in (True, False):
        model.train() if training else model.eval()
        ours, _ = forward(model, x)
        with torch.no_grad():
            theirs = torch_resnet18_forward(torch, (params, stats), x_torch, training)
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-4)
        # torch updated its running statistics in place during the training pass; ours must agree.
        ours_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        for a, b in zip(jax.tree.leaves(ours_stats), jax.tree.leaves(stats), strict=True):
            np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-5)
