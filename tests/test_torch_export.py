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


def recipe_in_torch(digital_numbers, record):
    """A PyTorch user's input, written from the JSON beside the weights alone (its `recipe` and
    `input`): digital numbers [N, H, W, C] of a processing baseline >= 04.00 product -> NCHW."""
    d = torch.from_numpy(digital_numbers.astype(np.int64))
    u = torch.clamp(d - 1000, 0, 10000) * 255 // 10000  # 1_raw_to_uint8, offset 1000
    normalization = record[EXPORT_KEY]
    low, high = (torch.tensor(normalization[k]) for k in ("stretch_low", "stretch_high"))
    s = torch.floor(torch.clamp((u.float() - low) / (high - low), 0, 1) * 255) / 255  # 2_stretch
    mean, std = torch.tensor(normalization["mean"]), torch.tensor(normalization["std"])
    return ((s - mean) / std).permute(0, 3, 1, 2)  # 4_standardize (images are image_size)


def test_the_json_recipe_gives_torch_users_the_jax_features(tmp_path, encoder_export):
    """Features of raw digital numbers: the JSON's recipe in PyTorch and `embed.Encoder` in JAX
    agree to float precision (the stretch's floor to 1/255 included: without it they would not)."""
    from caco_jax.products import embed

    directory, model = encoder_export
    written = torch_export.write(directory, os.path.join(tmp_path, "encoder.pth"))
    with open(written["normalization"]) as f:
        record = json.load(f)
    assert sorted(record["recipe"]) == [
        "1_raw_to_uint8", "2_stretch", "3_resize", "4_standardize", "bands", "image_size",
    ]  # fmt: skip
    rng = np.random.default_rng(2)
    digital_numbers = rng.integers(900, 4500, (3, 64, 64, 3)).astype(np.uint16)
    torch_model = random_torch_resnet(18, seed=99)
    torch_model.fc = torch.nn.Identity()
    torch_model.load_state_dict(torch.load(written["weights"], weights_only=True))
    with torch.no_grad():
        theirs = torch_model.stages(recipe_in_torch(digital_numbers, record))[0].numpy()
    _, metadata = export.load_encoder(directory)
    ours = embed.Encoder(model, metadata)(digital_numbers, scale="dn", offset=1000)
    assert np.abs(ours - theirs).max() < 1e-4 * np.abs(theirs).max()


def test_an_export_of_any_band_count_round_trips_with_its_json(tmp_path):
    """A 12-band export -> .pth + JSON -> converted back: the same weights, input and image size."""
    from caco_jax.data import layout
    from caco_jax.evaluators import common

    bands = Normalization(
        bands=layout.BANDS, low=(1.0,) * 12, high=(90.0,) * 12, mean=(0.3,) * 12, std=(0.2,) * 12
    )
    model = common.random_encoder(18, 12, seed=3, width=8)
    directory = export.save_encoder(
        tmp_path / "encoder", model, {EXPORT_KEY: bands.to_json(), "image_size": 32}
    )
    written = torch_export.write(directory, os.path.join(tmp_path, "all_bands.pth"))
    convert.write_export(written["weights"], str(tmp_path / "back"))
    back, metadata = export.load_encoder(tmp_path / "back")
    assert export.input_normalization(metadata) == bands and metadata["image_size"] == 32
    jax.tree.map(np.testing.assert_array_equal, nnx.state(back), nnx.state(model))
    os.remove(written["normalization"])  # without its JSON, 12 bands are unknown: refused
    with pytest.raises(convert.ConversionError, match=r"12 channels and no .*all_bands\.json"):
        convert.write_export(written["weights"], str(tmp_path / "again"))
