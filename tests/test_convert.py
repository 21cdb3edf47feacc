"""PyTorch -> JAX weight conversion: a torchvision-layout ResNet written with plain torch modules
(no torchvision; tests/torch_resnet.py), random weights and BatchNorm statistics, converted; the
JAX model must give the same pooled features and stage maps."""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
nn = torch.nn

from torch_resnet import random_torch_resnet, sequential_state_dict  # noqa: E402

from caco_jax import config as config_lib  # noqa: E402
from caco_jax.data.normalization import Normalization  # noqa: E402
from caco_jax.models import convert, export  # noqa: E402


@pytest.mark.parametrize(
    ("depth", "layout"),
    [(18, "torchvision"), (50, "sequential"), (18, "lightning"), (10, "torchvision")],
)
def test_converted_resnet_matches_torch(tmp_path, depth, layout):
    model = random_torch_resnet(depth, seed=depth)
    if layout == "torchvision":
        state = model.state_dict()
    elif layout == "sequential":
        state = sequential_state_dict(model)
        assert "5.0.downsample.1.running_mean" in state
    else:  # a Lightning checkpoint of pretraining: query and key encoders, heads, queue
        encoder = sequential_state_dict(model)
        state = {"state_dict": {
            **{f"encoder_q.{k}": v for k, v in encoder.items()},
            **{f"encoder_k.{k}": v.clone() for k, v in encoder.items()},
            "heads_q.0.weight": torch.zeros(3, 3),
            "queue": torch.zeros(128, 16),
        }}  # fmt: skip
    path = os.path.join(tmp_path, "weights.pth")
    torch.save(state, path)

    converted, notes = convert.convert(path)
    assert converted.depth == depth
    if layout != "sequential":
        assert notes  # the classifier or the key encoder was dropped, and said so

    images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        torch_pooled, torch_stages = model.stages(torch.from_numpy(images).permute(0, 3, 1, 2))
    pooled, stages = nnx.jit(lambda m, x: m(x, return_stages=True))(converted, jnp.asarray(images))
    differences = [np.abs(np.asarray(pooled) - torch_pooled.numpy()).max()]
    for ours, theirs in zip(stages, torch_stages, strict=True):
        differences.append(np.abs(np.asarray(ours) - theirs.permute(0, 2, 3, 1).numpy()).max())
    print(f"ResNet-{depth} {layout}: max abs difference {max(differences):.2e} (float32)")
    assert max(differences) < 1e-4


def test_missing_and_unknown_keys_are_listed(tmp_path):
    state = random_torch_resnet(18, seed=0).state_dict()
    del state["layer2.1.bn2.running_var"]
    state["layer2.1.extra.weight"] = torch.zeros(1)
    path = os.path.join(tmp_path, "broken.pth")
    torch.save(state, path)
    with pytest.raises(
        convert.ConversionError, match=r"layer2\.1\.bn2\.running_var.*layer2\.1\.extra\.weight"
    ):
        convert.convert(path)


def test_wrong_shape_and_wrong_depth_are_errors(tmp_path):
    state = random_torch_resnet(18, seed=0).state_dict()
    path = os.path.join(tmp_path, "r18.pth")
    torch.save(state, path)
    with pytest.raises(convert.ConversionError, match="holds a ResNet-18"):
        convert.convert(path, depth=50)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, path)
    with pytest.raises(convert.ConversionError, match=r"layer1\.0\.conv1\.weight.*shape"):
        convert.convert(path)


def test_pickled_objects_need_allow_pickle(tmp_path):
    state = {
        "state_dict": random_torch_resnet(18, seed=0).state_dict(),
        "hparams": argparse.Namespace(lr=1),
    }
    path = os.path.join(tmp_path, "seco.ckpt")
    torch.save(state, path)
    with pytest.raises(convert.ConversionError, match="allow_pickle"):
        convert.convert(path)
    model, _ = convert.convert(path, allow_pickle=True)
    assert model.depth == 18


def test_convert_task_writes_an_export_the_evaluators_load(tmp_path):
    path = os.path.join(tmp_path, "r18.pth")
    torch.save(random_torch_resnet(18, seed=1).state_dict(), path)
    config = config_lib.for_tasks("convert_weights")
    config.convert.source = path
    config_lib.validate(config)
    result = convert.run_task(config_lib.resolve(config), str(tmp_path))
    model, metadata = export.load_encoder(result["export"])
    assert result["export"] == os.path.join(tmp_path, "encoder")
    assert metadata["depth"] == 18 and metadata["source"] == path
    assert export.input_normalization(metadata) == Normalization.rgb()
    assert metadata["image_size"] == 224
    reference, _ = convert.convert(path)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), nnx.state(reference))
