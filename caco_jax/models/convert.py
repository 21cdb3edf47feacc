"""PyTorch ResNet weights -> this project's ResNet -> an encoder export the evaluators load.

Reads (torch is an optional extra: `pip install 'caco_jax[torch]'`):
- the official CACo / SeCo / MoCo `.pth` query-encoder state dicts, whose keys index
  `nn.Sequential(conv1, bn1, relu, maxpool, layer1..layer4, avgpool, Flatten)`: `0.weight`,
  `1.running_mean`, `4.0.conv1.weight`, `5.0.downsample.1.running_var`, ...;
- plain torchvision ResNet state dicts (`conv1.weight`, `layer1.0.conv1.weight`, ...; the classifier
  `fc.*` is dropped with a note), e.g. the supervised ImageNet weights for the baseline rows;
- Lightning `.ckpt` files of SeCo/CACo pretraining (`state_dict` with `encoder_q.` keys; the key
  encoder, heads and queues are dropped with a note);
- `.safetensors` files of any of these layouts.
Files are opened with `torch.load(weights_only=True)`; a checkpoint that pickles other objects
(SeCo's hyper-parameters) is refused unless `allow_pickle` says the file is trusted.

The export records the official RGB input normalisation (see `write_export`).
Conv weights go from torch's OIHW to flax's HWIO; BatchNorm weight/bias/running_mean/running_var
become scale/bias/mean/var; `num_batches_tracked` is ignored. Keys the model lacks, or model weights
the file lacks, are an error listing them.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from caco_jax.data.normalization import EXPORT_KEY, Normalization
from caco_jax.models import export, registry
from caco_jax.models.resnet import ARCHITECTURES, ResNet
from caco_jax.runtime import errors, extras, storage
from caco_jax.runtime.workdir import Workdir
from caco_jax.settings import Section, SettingsError

# Index in the official nn.Sequential -> torchvision name (2 relu, 3 maxpool, 8 avgpool hold no
# weights).
SEQUENTIAL_NAMES = {
    "0": "conv1",
    "1": "bn1",
    "4": "layer1",
    "5": "layer2",
    "6": "layer3",
    "7": "layer4",
}
# Flax leaf name -> torch parameter name.
TORCH_LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
ENCODER_PREFIXES = ("encoder_q.", "model.encoder_q.", "module.encoder_q.", "module.")


@dataclasses.dataclass(frozen=True)
class ConvertSettings(Section):
    """`config.convert`: official PyTorch weights -> an encoder export (task convert_weights)."""

    SECTION = "convert"
    source: str = ""  # .pth / .ckpt file: CACo/SeCo/MoCo query encoder or torchvision ResNet
    output: str = ""  # export folder; "" = <workdir>/encoder
    depth: int = 0  # 0 = inferred from the keys; else checked against them
    allow_pickle: bool = False  # True: also read what torch.load(weights_only=True) refuses
    overwrite: bool = False  # replace an existing export

    def validate(self) -> None:
        self.require(
            self.depth in (0, 18, 34, 50, 101, 152), "depth", "0 (infer) or a ResNet depth"
        )


class ConversionError(errors.UserError, ValueError):
    """A state dict that does not describe a supported ResNet; the message lists the culprits."""


def load_state_dict(path: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The tensors of a `.pth` / `.ckpt` / `.safetensors` file as float32 NumPy arrays, keyed as
    stored (a Lightning checkpoint's `state_dict` is unwrapped)."""
    import pickle

    source = storage.path(path)
    if not source.is_file():
        raise FileNotFoundError(f"config.convert.source: no file {path}")
    data = source.read_bytes()  # through bytes: the path may be a bucket URL
    if path.endswith(".safetensors"):
        load = extras.require("safetensors.numpy", "torch").load
        return {key: value.astype(np.float32) for key, value in load(data).items()}

    torch = extras.require("torch", "torch")

    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as error:
        if not allow_pickle:
            raise ConversionError(
                f"{path} cannot be read with torch.load(weights_only=True) "
                f"({str(error).splitlines()[0]}); "
                "if you trust the file, set config.convert.allow_pickle=True"
            ) from error
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ConversionError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return {
        key: value.detach().to(torch.float32).numpy()
        for key, value in loaded.items()
        if isinstance(value, torch.Tensor)
    }


def key_layout(state: dict) -> str:
    """How a state dict's keys are laid out: "sequential" (the official CACo/SeCo/MoCo `.pth`
    query encoders, `0.weight`, `4.0.conv1.weight`), "lightning" (a pretraining checkpoint's
    `encoder_q.` keys), "torchvision" (`conv1.weight`) or "unknown"."""
    if any(key.startswith(ENCODER_PREFIXES) for key in state):
        return "lightning"
    if "0.weight" in state and any(key.startswith("4.0.") for key in state):
        return "sequential"
    if "conv1.weight" in state:
        return "torchvision"
    return "unknown"


def torchvision_names(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Keys renamed to torchvision's (`layer1.0.conv1.weight`), plus notes on what was dropped."""
    notes = []
    for prefix in ENCODER_PREFIXES:
        if any(key.startswith(prefix) for key in state):
            dropped = sorted({key.split(".")[0] for key in state if not key.startswith(prefix)})
            if dropped:
                notes.append(f"kept the {prefix!r} weights, dropped: {', '.join(dropped)}")
            state = {
                key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)
            }
            break
    renamed = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head.isdigit():
            if head not in SEQUENTIAL_NAMES:
                raise ConversionError(
                    f"state dict key {key!r}: nn.Sequential index {head} holds no ResNet weights"
                )
            key = f"{SEQUENTIAL_NAMES[head]}.{rest}"
        if key.endswith("num_batches_tracked"):
            continue
        renamed[key] = value
    classifier = sorted(key for key in renamed if key.startswith("fc."))
    if classifier:
        notes.append(f"dropped the classifier ({', '.join(classifier)})")
        renamed = {key: value for key, value in renamed.items() if not key.startswith("fc.")}
    return renamed, notes


def infer_depth(state: dict[str, np.ndarray]) -> int:
    """The torchvision depth whose block type and blocks per stage match the keys."""
    bottleneck = any(key.endswith("conv3.weight") for key in state)
    blocks = []
    for stage in range(1, 5):
        indices = {
            int(m.group(1)) for key in state if (m := re.match(rf"layer{stage}\.(\d+)\.", key))
        }
        blocks.append(max(indices) + 1 if indices else 0)
    for depth, (block, counts) in ARCHITECTURES.items():
        if (block.expansion == 4) == bottleneck and tuple(blocks) == counts:
            return depth
    raise ConversionError(
        f"no torchvision ResNet has {'bottleneck' if bottleneck else 'basic'} blocks "
        f"{tuple(blocks)} per stage"
    )


def torch_name(path: tuple) -> str:
    """The torchvision name of a flattened NNX state path: ('layer1', 0, 'bn1', 'mean') ->
    'layer1.0.bn1.running_mean'."""
    return ".".join(str(p) for p in path[:-1]) + "." + TORCH_LEAF[path[-1]]


def build(depth: int, in_channels: int, state: dict[str, np.ndarray]) -> ResNet:
    """The ResNet (eval mode) holding torchvision-named weights (params and BatchNorm statistics).

    The model is built abstractly and filled from `state`, so no random initialisation is
    computed."""
    width = state["conv1.weight"].shape[0] if "conv1.weight" in state else 64  # torchvision: 64
    abstract = nnx.eval_shape(
        lambda: ResNet(depth, rngs=nnx.Rngs(0), in_channels=in_channels, width=width)
    )
    graphdef, graph_state = nnx.split(abstract)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(graph_state))
    expected = {torch_name(path): path for path in flat}
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        raise ConversionError(
            f"state dict does not match a ResNet-{depth}: missing {missing or 'none'}; "
            f"unknown {unknown or 'none'}"
        )
    for name, path in expected.items():
        value = state[name]
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if value.shape != flat[path].shape:
            raise ConversionError(
                f"state dict key {name!r}: shape {state[name].shape} "
                f"does not fit {flat[path].shape}"
            )
        flat[path] = jnp.asarray(value, jnp.float32)
    nnx.replace_by_pure_dict(graph_state, traverse_util.unflatten_dict(flat))
    model = nnx.merge(graphdef, graph_state)
    model.eval()
    return model


def convert(path: str, *, depth: int = 0, allow_pickle: bool = False) -> tuple[ResNet, list[str]]:
    """The ResNet (eval mode) holding the weights of a torch file, and notes on what was dropped."""
    state, notes = torchvision_names(load_state_dict(path, allow_pickle=allow_pickle))
    if "conv1.weight" not in state:
        raise ConversionError(
            f"{path}: no stem convolution ('conv1.weight' or '0.weight') among {sorted(state)[:8]}"
        )
    inferred = infer_depth(state)
    if depth and depth != inferred:
        raise ConversionError(f"config.convert.depth={depth}, but {path} holds a ResNet-{inferred}")
    return build(inferred, state["conv1.weight"].shape[1], state), notes


def write_export(
    source: str,
    output: str,
    *,
    depth: int = 0,
    allow_pickle: bool = False,
    overwrite: bool = False,
    metadata: dict | None = None,
) -> tuple[ResNet, list[str]]:
    """Converts the torch file ``source`` and saves it as an encoder export at ``output``.

    The export records the encoder's input: the one the JSON beside ``source`` records
    (``<stem>.json``, written by `torch_export` with every export: its ``input`` normalisation and
    ``image_size``), else for 3-channel weights the official RGB input at 224 px (what the official
    CACo/SeCo/MoCo weights and torchvision's ImageNet weights were trained on); other weights
    without that JSON are refused, since nothing says what their bands are. ``metadata`` (e.g. the
    method) is recorded too.
    """
    model, notes = convert(source, depth=depth, allow_pickle=allow_pickle)
    recorded = _sidecar_input(source)
    if recorded is None and model.in_channels != 3:
        raise ConversionError(
            f"{source}: the stem takes {model.in_channels} channels and no "
            f"{os.path.splitext(source)[0]}.json beside it records their bands and "
            "normalisation (caco_jax's PyTorch export writes one); only RGB weights have a "
            "known input"
        )
    if recorded is not None:
        notes.append(f"input and image size from {os.path.splitext(source)[0]}.json")
    for note in notes:
        logging.info("convert: %s", note)
        print(f"convert: {note}", flush=True)
    record = {
        "source": source,
        "converted_by": "caco_jax.models.convert",
        "notes": notes,
        EXPORT_KEY: Normalization.rgb().to_json(),
        export.IMAGE_SIZE_KEY: registry.OFFICIAL_IMAGE_SIZE,
        **(recorded or {}),
        **(metadata or {}),
    }
    export.save_encoder(output, model, record, overwrite=overwrite)
    return model, notes


def _sidecar_input(source: str) -> dict | None:
    """{input, image_size, method, ...} from the JSON `torch_export` writes beside its weights."""
    import json

    sidecar = storage.path(os.path.splitext(source)[0] + ".json")
    if not sidecar.exists():
        return None
    try:
        record = json.loads(sidecar.read_text())
        Normalization.from_json(record[EXPORT_KEY])
    except (ValueError, KeyError, TypeError) as error:
        raise ConversionError(f"{sidecar}: not a caco_jax export's JSON ({error})") from None
    keys = (EXPORT_KEY, export.IMAGE_SIZE_KEY, "method", "pretrained_name")
    return {key: record[key] for key in keys if record.get(key) is not None}


def check_task(settings) -> None:
    """Before any work: the convert_weights task needs a file to convert."""
    if not settings.convert.source:
        raise SettingsError(
            "config.convert.source: the convert_weights task needs a .pth/.ckpt file"
        )


def run_task(settings, workdir) -> dict:
    """Task `convert_weights`: `config.convert.source` -> an encoder export (default
    `<workdir>/encoder`)."""
    c = settings.convert
    source = os.fspath(storage.path(c.source))
    output = os.fspath(storage.path(c.output or Workdir.of(workdir).encoder))
    made = _source_fingerprint(source)
    if not c.overwrite and made is not None:
        try:
            written = export.read_metadata(output)
        except (OSError, ValueError):
            written = {}
        if written.get("source") == source and written.get("source_fingerprint") == made:
            print(f"convert: {output} was converted from {source} already (kept)", flush=True)
            return {
                "export": output,
                "depth": int(written["depth"]),
                "in_channels": int(written["in_channels"]),
                "notes": written.get("notes", []),
                "kept": True,
            }
    model, notes = write_export(
        source,
        output,
        depth=c.depth,
        allow_pickle=c.allow_pickle,
        overwrite=c.overwrite,
        metadata={"source_fingerprint": made} if made is not None else None,
    )
    return {
        "export": output,
        "depth": model.depth,
        "in_channels": model.in_channels,
        "notes": notes,
        "kept": False,
    }


def _source_fingerprint(source: str) -> list | None:
    """[size, modification time in whole seconds] of a local weights file; None for a URL."""
    if storage.is_url(source) or not os.path.isfile(source):
        return None
    status = os.stat(source)
    return [status.st_size, int(status.st_mtime)]
