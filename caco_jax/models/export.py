"""Export and import of a pretrained encoder alone, for evaluators that need no training state.

An export is one Orbax checkpoint directory with two items: ``state`` = {"params", "batch_stats"}
as plain nested dicts of float32 arrays (keyed like the NNX state: ``layer1/0/conv1/kernel``), and
``metadata``, a JSON dict holding what rebuilds the encoder (``arch``, ``depth``, ``in_channels``)
and whatever the caller adds (source, step, method, ...). Orbax writes into a temporary directory
and renames it when complete, so a crash never leaves a half-written export under the final name.
"""

import json

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from caco_jax import storage
from caco_jax.models.resnet import ResNet

ARCH = "resnet"
BUILD_KEYS = ("arch", "depth", "in_channels")


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
    build = {"arch": ARCH, "depth": model.depth, "in_channels": model.in_channels}
    for key, value in build.items():
        if key in metadata and metadata[key] != value:
            raise ValueError(
                f"save_encoder: metadata[{key!r}] = {metadata[key]!r} contradicts the model "
                f"({value!r})"
            )
    record = {**metadata, **build}
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
    metadata = _checkpointer().restore(
        directory, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
    )["metadata"]
    missing = [key for key in BUILD_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"load_encoder: {directory}/metadata lacks {missing}")
    if metadata["arch"] != ARCH:
        raise ValueError(f"load_encoder: {directory} holds arch {metadata['arch']!r}, not {ARCH!r}")
    return metadata


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
    except ValueError as error:
        raise ValueError(
            f"load_encoder: {directory} does not match a ResNet-{metadata['depth']} "
            f"with {metadata['in_channels']} input channels: {error}"
        ) from error
    graphdef, params, batch_stats = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)
    nnx.replace_by_pure_dict(params, restored["params"])
    nnx.replace_by_pure_dict(batch_stats, restored["batch_stats"])
    model = nnx.merge(graphdef, params, batch_stats)
    model.eval()
    return model, metadata
