"""Export and import of a pretrained encoder alone, for evaluators that need no training state.

An export is one Orbax checkpoint directory with two items: ``state`` = {"params", "batch_stats"}
as plain nested dicts of float32 arrays (keyed like the NNX state: ``layer1/0/conv1/kernel``), and
``metadata``, a JSON dict holding what rebuilds the encoder (``arch``, ``depth``, ``in_channels``),
what its input is, and whatever the caller adds (source, step, ...):

  input        `Normalization.to_json()`: bands in channel order, stretch ranges, mean/std
  image_size   the side in pixels of the images the encoder was trained on
  method       the pretraining method (caco, seco, teco, moco, ...)

Orbax writes into a temporary directory and renames it when complete, so a crash never leaves a
half-written export under the final name. `input_normalization(metadata)` parses ``input``; an
RGB export written before ``input`` was recorded gets `Normalization.rgb()` (the official RGB
input) and a warning.
"""

import json
import warnings

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from caco_jax.data.normalization import EXPORT_KEY, Normalization
from caco_jax.models.resnet import ResNet
from caco_jax.runtime import errors, storage

ARCH = "resnet"
BUILD_KEYS = ("arch", "depth", "in_channels")
IMAGE_SIZE_KEY = "image_size"
METHOD_KEY = "method"


class ExportError(errors.UserError, ValueError):
    """An export that is incomplete, damaged or not an encoder of this package; names its folder."""


def _checkpointer():
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def encoder_state(model: ResNet) -> dict:
    """The encoder's parameters and BatchNorm statistics as nested dicts of arrays."""
    return {
        "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
    }


def save_encoder(
    directory, model: ResNet, metadata: dict, *, overwrite: bool = False
) -> epath.Path:
    """Writes ``model``'s params and BatchNorm statistics plus ``metadata`` to ``directory``.

    With ``overwrite``, an existing export is replaced only once the new one is complete: it is
    written to ``<directory>.incoming``, then swapped in by renames (a crash between the two renames
    leaves the new export complete under ``.incoming`` and the old one under ``.retired``). Call
    from every process in a multi-process run.
    """
    directory = storage.path(directory)
    build = {
        "arch": ARCH,
        "depth": model.depth,
        "in_channels": model.in_channels,
        "width": model.width,
    }
    for key, value in build.items():
        if key in metadata and metadata[key] != value:
            raise ValueError(
                f"save_encoder: metadata[{key!r}] = {metadata[key]!r} contradicts the model "
                f"({value!r})"
            )
    record = {**metadata, **build}
    if EXPORT_KEY in record:
        _check_input(record, where="save_encoder: metadata")
    try:
        json.dumps(record)
    except TypeError as error:
        raise ValueError(f"save_encoder: metadata must be JSON-serialisable: {error}") from error
    replacing = directory.exists()
    if replacing and not overwrite:
        raise FileExistsError(f"save_encoder: {directory} already exists (pass overwrite=True)")

    # Replacing: write the new export beside the old one, then swap them by renames. Fixed names
    # (not random ones) so that every process agrees on them.
    staging = directory.parent / f"{directory.name}.incoming"
    retired = directory.parent / f"{directory.name}.retired"
    primary = jax.process_index() == 0
    if replacing and primary:
        for leftover in (staging, retired):  # from a crash in an earlier swap
            if leftover.exists():
                leftover.rmtree()
    _checkpointer().save(
        staging if replacing else directory,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(encoder_state(model)),
            metadata=ocp.args.JsonSave(record),
        ),
    )
    if replacing and primary:
        directory.rename(retired)
        staging.rename(directory)
        retired.rmtree()
    ocp.multihost.sync_global_processes("caco_jax.save_encoder")
    return directory


def read_metadata(directory) -> dict:
    """The metadata JSON of an export, checked for the keys that rebuild the encoder."""
    directory = storage.path(directory)
    if not all((directory / item).exists() for item in ("metadata", "state")) or (
        not ocp.utils.is_checkpoint_finalized(directory)
    ):
        raise FileNotFoundError(
            f"load_encoder: {directory} is not a complete encoder export "
            "(needs the finalised Orbax items 'state' and 'metadata')"
        )
    try:
        metadata = _checkpointer().restore(
            directory, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
        )["metadata"]
    except Exception as error:  # a damaged JSON file, as Orbax reports it
        raise ExportError(
            f"load_encoder: {directory}/metadata does not read "
            f"({_first_line(errors.root_cause(error))}); write the export again"
        ) from error
    if not isinstance(metadata, dict):
        raise ExportError(f"load_encoder: {directory}/metadata is not a JSON object")
    missing = [key for key in BUILD_KEYS if key not in metadata]
    if missing:
        raise ExportError(f"load_encoder: {directory}/metadata lacks {missing}")
    if metadata["arch"] != ARCH:
        raise ExportError(
            f"load_encoder: {directory} holds arch {metadata['arch']!r}, not {ARCH!r}"
        )
    if EXPORT_KEY in metadata:
        _check_input(metadata, where=f"load_encoder: {directory}/metadata")
    return metadata


def input_normalization(metadata: dict) -> Normalization:
    """The input normalisation an export's metadata records.

    An export written before exports recorded it gets `Normalization.rgb()` (the official RGB
    input: SeCo's stretch of B4, B3, B2, ImageNet mean/std) with a warning when its encoder takes
    3 channels; for other channel counts there is no default and it is an error.
    """
    if EXPORT_KEY in metadata:
        return Normalization.from_json(metadata[EXPORT_KEY])
    if int(metadata.get("in_channels", 0)) != 3:
        raise ValueError(
            f"the export records no {EXPORT_KEY!r} normalisation and its encoder takes "
            f"{metadata.get('in_channels')} channels, for which there is no default"
        )
    warnings.warn(
        "the export records no input normalisation (written before exports recorded it); "
        "assuming the official RGB input (SeCo's stretch of B4, B3, B2, ImageNet mean/std)",
        stacklevel=2,
    )
    return Normalization.rgb()


def _check_input(metadata: dict, *, where: str) -> None:
    """The recorded normalisation parses and has one band per input channel of the encoder."""
    try:
        normalization = Normalization.from_json(metadata[EXPORT_KEY])
    except (TypeError, ValueError) as error:
        raise ExportError(f"{where}[{EXPORT_KEY!r}] is not a normalisation: {error}") from None
    if normalization.num_bands != int(metadata["in_channels"]):
        raise ExportError(
            f"{where}[{EXPORT_KEY!r}] has {normalization.num_bands} bands "
            f"{list(normalization.bands)}, but the encoder takes {metadata['in_channels']} channels"
        )
    size = metadata.get(IMAGE_SIZE_KEY)
    if size is not None and not (isinstance(size, int) and size >= 32):
        raise ExportError(f"{where}[{IMAGE_SIZE_KEY!r}] = {size!r}, expected an int >= 32")


def _first_line(error: BaseException, limit: int = 300) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_encoder(
    directory,
    *,
    dtype=jnp.float32,
    bn_axis_name: str | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[ResNet, dict]:
    """Rebuilds the exported ResNet and restores its weights; returns ``(model, metadata)``.

    The model comes back in eval mode (BatchNorm uses the stored statistics; call ``model.train()``
    to fine-tune). Arrays are placed with ``sharding`` (default: the first local device), whatever
    the device count at save time.
    """
    directory = storage.path(directory)
    metadata = read_metadata(directory)
    abstract_model = nnx.eval_shape(
        lambda: ResNet(
            int(metadata["depth"]),
            rngs=nnx.Rngs(0),
            dtype=dtype,
            bn_axis_name=bn_axis_name,
            in_channels=int(metadata["in_channels"]),
            width=int(metadata.get("width", 64)),  # exports before `width` are all 64
        )
    )
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        encoder_state(abstract_model),
    )
    try:
        restored = _checkpointer().restore(
            directory, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )["state"]
    except Exception as error:  # Orbax and TensorStore raise several types; their messages hold
        # the whole tree, so only the innermost cause's first line is kept.
        cause = _first_line(errors.root_cause(error))
        if "shape" in cause.lower() or "structure" in cause.lower():
            raise ExportError(
                f"load_encoder: {directory} does not match a ResNet-{metadata['depth']} with "
                f"{metadata['in_channels']} input channels as its metadata says ({cause})"
            ) from error
        raise ExportError(
            f"load_encoder: {directory} is damaged: its weights do not read ({cause}); write "
            "the export again (pretrain, convert_weights or pretrained) or point at another"
        ) from error
    graphdef, params, batch_stats = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)
    nnx.replace_by_pure_dict(params, restored["params"])
    nnx.replace_by_pure_dict(batch_stats, restored["batch_stats"])
    model = nnx.merge(graphdef, params, batch_stats)
    model.eval()
    return model, metadata
