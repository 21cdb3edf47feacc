"""Export -> torchvision-layout PyTorch state dict (.pth, .safetensors) -> export: the round trip
is exact and the PyTorch model computes the JAX encoder's features."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from torch_resnet import random_torch_resnet  # noqa: E402

from caco_jax.data.normalization import EXPORT_KEY, Normalization  # noqa: E402
from caco_jax.models import (  # noqa: E402
    convert,
    export,
    torch_export,
)


@pytest.fixture(scope="module")
def encoder_export(tmp_path_factory):
    """An export of a ResNet-18 with random weights and non-trivial BatchNorm statistics."""
    folder = tmp_path_factory.mktemp("export")
    torch_state = random_torch_resnet(18, seed=5).state_dict()
    state, _ = convert.torchvision_names({k: v.numpy() for k, v in torch_state.items()})
    model = convert.build(18, 3, state)
    metadata = {EXPORT_KEY: Normalization.rgb().to_json(), "image_size": 64, "method": "caco"}
    return export.save_encoder(folder / "encoder", model, metadata), model


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip_and_torch_outputs_equal_jax(tmp_path, encoder_export, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    directory, model = encoder_export
    written = torch_export.write(directory, os.path.join(tmp_path, "encoder" + suffix))
    with open(written["normalization"]) as f:
        sidecar = json.load(f)
    assert written["normalization"] == os.path.join(tmp_path, "encoder.json")
    assert Normalization.from_json(sidecar[EXPORT_KEY]) == Normalization.rgb()
    assert (sidecar["image_size"], sidecar["depth"], sidecar["method"]) == (64, 18, "caco")

    # PyTorch -> JAX gives back exactly the exported weights and statistics.
    back, _ = convert.convert(written["weights"])
    jax.tree.map(np.testing.assert_array_equal, nnx.state(back), nnx.state(model))

    # A torchvision-layout model without its classifier loads the file strictly.
    torch_model = random_torch_resnet(18, seed=99)
    torch_model.fc = torch.nn.Identity()
    if suffix == ".pth":
        state = torch.load(written["weights"], weights_only=True)
    else:
        from safetensors.torch import load_file

        state = load_file(written["weights"])
    torch_model.load_state_dict(state, strict=True)
    images = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        theirs = torch_model.stages(torch.from_numpy(images).permute(0, 3, 1, 2))[0].numpy()
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images)))
    difference = np.abs(ours - theirs).max()
    print(f"{suffix}: PyTorch vs JAX pooled features, max abs difference {difference:.2e}")
    assert difference < 1e-4


def test_existing_output_and_unknown_format_are_errors(tmp_path, encoder_export):
    directory, _ = encoder_export
    with pytest.raises(ValueError, match=r"\.pth.*\.safetensors"):
        torch_export.write(directory, os.path.join(tmp_path, "encoder.bin"))
    target = os.path.join(tmp_path, "encoder.pth")
    torch_export.write(directory, target)
    with pytest.raises(FileExistsError, match=r"encoder\.pth already exists"):
        torch_export.write(directory, target)
