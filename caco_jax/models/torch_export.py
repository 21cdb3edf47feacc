"""Encoder export -> a torchvision-layout PyTorch state dict, and a JSON of its input beside it.

The state dict has torchvision's ResNet names (`conv1.weight`, `bn1.running_mean`,
`layer1.0.conv1.weight`, ..., `num_batches_tracked` included) and no classifier, so

    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load("encoder.pth"))

gives the encoder's pooled features. `.pth` files need torch; `.safetensors` files are written with
the `safetensors` package alone. `<name>.json` beside the weights records the input the encoder
expects (`input` = `Normalization.to_json()`, `image_size`), every step from raw Sentinel-2 values
to that input (`recipe`, `data.sentinel2`), and how to rebuild it (`arch`, `depth`), copied from
the export's metadata. `caco_jax/models/convert.py` reads both formats back.
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx, traverse_util

from caco_jax.data import sentinel2
from caco_jax.data.normalization import EXPORT_KEY
from caco_jax.models import convert, export, registry, resnet
from caco_jax.runtime import extras

FORMATS = (".pth", ".safetensors")


def torch_state_dict(model: resnet.ResNet) -> dict[str, np.ndarray]:
    """torchvision-named float32 arrays (conv kernels HWIO -> OIHW) plus int64
    `num_batches_tracked` counters (torchvision's strict loading expects them; 0 here)."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
    state = {}
    for path, value in flat.items():
        value = np.asarray(value, np.float32)
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        state[convert.torch_name(path)] = np.ascontiguousarray(value)
        if path[-1] == "mean":
            module = ".".join(str(part) for part in path[:-1])
            state[f"{module}.num_batches_tracked"] = np.zeros((), np.int64)
    return state


def write(export_dir: str, output: str, *, overwrite: bool = False) -> dict:
    """Writes the export at ``export_dir`` as ``output`` (`.pth` or `.safetensors`) and the JSON of
    its input beside it; returns both paths."""
    output = os.path.abspath(output)
    stem, suffix = os.path.splitext(output)
    if suffix not in FORMATS:
        raise ValueError(f"{output}: a PyTorch export must end in one of {FORMATS}")
    sidecar = stem + ".json"
    for path in (output, sidecar):
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} already exists (set overwrite to replace it)")
    model, metadata = export.load_encoder(export_dir)
    state = torch_state_dict(model)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    staging = f"{stem}.incoming{suffix}"
    if suffix == ".safetensors":
        extras.require("safetensors.numpy", "torch").save_file(state, staging)
    else:
        torch = extras.require("torch", "torch")

        torch.save({key: torch.from_numpy(value.copy()) for key, value in state.items()}, staging)
    normalization = export.input_normalization(metadata)
    image_size = metadata.get(export.IMAGE_SIZE_KEY) or registry.OFFICIAL_IMAGE_SIZE
    record = {
        "arch": resnet.torchvision_arch(model.depth, model.width, model.in_channels),
        "depth": model.depth,
        "in_channels": model.in_channels,
        "classifier": "none: set model.fc = torch.nn.Identity() before load_state_dict",
        EXPORT_KEY: normalization.to_json(),
        export.IMAGE_SIZE_KEY: image_size,
        # Every step from raw Sentinel-2 values to the input, with the numbers of `input`.
        "recipe": sentinel2.recipe(normalization, image_size),
        "source_export": os.path.abspath(export_dir),
        **{k: metadata[k] for k in ("method", "pretrained_name", "url") if k in metadata},
    }
    with open(sidecar, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(staging, output)
    return {"weights": output, "normalization": sidecar}
