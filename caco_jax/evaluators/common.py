"""What every evaluator shares: `config.eval` (the encoders to compare and where the datasets
are), the encoder rows with the bands each reads, datasets prepared from the downloads and read
without TensorFlow, and the metrics file and console table (written by `protocol.run`).

Each evaluator compares the same rows: the checkpoint under test (an export written by
`save_encoder`, by pretraining or by `models.convert`), a randomly initialised encoder of the same
architecture and, when `config.eval.imagenet_checkpoint` names one, a supervised ImageNet encoder
converted from a torchvision state dict. Features of a frozen encoder come from
`runtime.inference`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from flax import nnx, traverse_util

from caco_jax.data.normalization import EXPORT_KEY, Normalization
from caco_jax.models import export
from caco_jax.models.resnet import ResNet
from caco_jax.runtime import errors, progress, storage
from caco_jax.runtime.workdir import Workdir
from caco_jax.settings import Section


@dataclasses.dataclass(frozen=True)
class EvalSettings(Section):
    """`config.eval`: what every evaluation shares (the encoder rows, where the datasets are);
    each protocol has its own section (`config.eurosat`, `config.bigearthnet`, ...)."""

    SECTION = "eval"
    checkpoint: str = ""  # encoder export to evaluate; "" = <workdir>/encoder
    random_baseline: bool = True  # also evaluate a randomly initialised encoder (a table row)
    imagenet_checkpoint: str = ""  # export of converted ImageNet weights: adds an "imagenet" row
    data_dir: str = ""  # TFDS data_dir of the prepared records; "" = ~/tensorflow_datasets
    # Datasets as downloaded (docs/evaluation.md): the folder holding the download (zip, tar.gz or
    # extracted) and the published split lists; records are built from it on first use.
    manual_dir: str = ""
    download_lists: bool = False  # fetch missing split lists from their published addresses
    seeded_split: bool = False  # a seeded 60/20 split instead of the lists (flagged in metrics)
    prepare_workers: int = 0  # BigEarthNet: processes decoding GeoTIFFs; 0 = one per core
    extract_batch_size: int = 256  # images per encoder pass when caching features

    def validate(self) -> None:
        self.require(self.prepare_workers >= 0, "prepare_workers", "must be >= 0 (0 = per core)")
        self.require(self.extract_batch_size >= 1, "extract_batch_size", "must be >= 1")

    def records_dir(self) -> str:
        return os.path.expanduser(self.data_dir or "~/tensorflow_datasets")


@dataclasses.dataclass
class Encoder:
    """One row of an evaluation table."""

    name: str  # "checkpoint", "random" or "imagenet"
    model: ResNet
    source: str  # the export directory, or "random init (seed s)"
    input: Normalization  # the bands it reads and their normalisation (RGB for older exports)


def checkpoint_dir(settings: EvalSettings, workdir) -> str:
    """The export under test: `config.eval.checkpoint`, else pretraining's `<workdir>/encoder`."""
    return os.fspath(storage.path(settings.checkpoint or Workdir.of(workdir).encoder))


def encoders(settings: EvalSettings, seed: int, workdir) -> list[Encoder]:
    """The rows to evaluate, in table order, every export loaded and checked (its architecture, and
    its recorded input against its input channels) before any evaluation starts. The random
    encoder copies the checkpoint's architecture and input, and is drawn with ``seed``."""
    directory = checkpoint_dir(settings, workdir)
    model, metadata, norm = _load_export(
        directory,
        "checkpoint",
        "pretrain first, convert official weights with the convert_weights task, or point "
        "--config.eval.checkpoint at an export",
    )
    rows = [Encoder("checkpoint", model, directory, norm)]
    if settings.random_baseline:
        random_model = random_encoder(
            int(metadata["depth"]), int(metadata["in_channels"]), seed, model.width
        )
        rows.append(Encoder("random", random_model, f"random init (seed {seed})", norm))
    if settings.imagenet_checkpoint:
        directory = os.fspath(storage.path(settings.imagenet_checkpoint))
        imagenet_model, _, imagenet_norm = _load_export(
            directory,
            "imagenet_checkpoint",
            "convert torchvision's resnet18-f37072fd.pth with configs/convert.py",
        )
        rows.append(Encoder("imagenet", imagenet_model, directory, imagenet_norm))
    return rows


def _load_export(directory: str, key: str, remedy: str):
    """(model, metadata, input) of the export `config.eval.<key>` names; a missing or inconsistent
    export is an error naming the key."""
    if not storage.path(directory).is_dir():
        raise FileNotFoundError(f"config.eval.{key}: no encoder export at {directory} ({remedy})")
    try:
        model, metadata = export.load_encoder(directory)
        norm = export.input_normalization(metadata)
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"config.eval.{key}: {error}") from error
    if norm.num_bands != model.in_channels:
        raise ValueError(
            f"config.eval.{key}: {directory}: metadata {EXPORT_KEY!r} names {norm.num_bands} "
            f"bands, the encoder takes {model.in_channels} input channels"
        )
    return model, metadata, norm


class EncoderInputError(errors.UserError, ValueError):
    """An encoder row whose input a dataset cannot give; names the row."""


def check_inputs(rows: list[Encoder], check: Callable[[Encoder], object]) -> list:
    """``check(row)`` of every row before any row is evaluated, so that a row whose bands the
    dataset lacks (an ImageNet export of other bands, say) stops the task before the others'
    work rather than after it; the error names the row."""
    checked = []
    for row in rows:
        try:
            checked.append(check(row))
        except ValueError as error:
            raise EncoderInputError(f"the {row.name} encoder ({row.source}): {error}") from None
    return checked


def random_encoder(depth: int, in_channels: int, seed: int, width: int = 64) -> ResNet:
    """A ResNet with torchvision's random initialisation, in eval mode: convolutions normal with
    variance 2 / fan_out (`resnet.conv_init`), BatchNorm scale 1, bias 0, statistics 0 / 1.

    Drawn with NumPy into an abstract model: compiling the initialisers costs far more than drawing.
    """
    abstract = nnx.eval_shape(
        lambda: ResNet(depth, rngs=nnx.Rngs(0), in_channels=in_channels, width=width)
    )
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    fill = {"scale": 1.0, "bias": 0.0, "mean": 0.0, "var": 1.0}

    def draw(path, leaf):
        name = path[-1]
        if name == "kernel":
            height, width, _, out_channels = leaf.shape
            std = np.sqrt(2.0 / (out_channels * height * width))
            return jnp.asarray(rng.normal(0.0, std, leaf.shape), jnp.float32)
        return jnp.full(leaf.shape, fill[name], jnp.float32)

    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(
        state, traverse_util.unflatten_dict({path: draw(path, leaf) for path, leaf in flat.items()})
    )
    model = nnx.merge(graphdef, state)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------------
# Datasets: TFDS records built by caco_jax's own builders from the downloads, read as array_record
# data sources (numpy decoding: no TensorFlow to build or read).


def prepared(builder, settings: EvalSettings, download: str):
    """`builder` with its records under `config.eval.data_dir`, built from `config.eval.manual_dir`
    (which holds `download`) the first time."""
    if not builder.is_prepared():
        if not settings.manual_dir:
            raise FileNotFoundError(
                f"config.eval.manual_dir: {builder.name}/{builder.builder_config.name} is not "
                f"prepared under {builder.data_dir}; point --config.eval.manual_dir at the folder "
                f"holding {download} (see docs/evaluation.md)"
            )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.path.abspath(os.path.expanduser(settings.manual_dir))
            )
        )
    return builder


def read_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def refresh_batch_stats(
    model: ResNet,
    load_batch: Callable[[np.ndarray], np.ndarray],
    count: int,
    *,
    preprocess: Callable[[jax.Array], jax.Array],
    batch_size: int,
    seed: int,
) -> None:
    """One shuffled pass in training mode over `count` examples, updating the BatchNorm running
    statistics in place (batches of `batch_size`, the last partial one dropped, as the official
    loaders did).

    The cached probe's option to approach what the official linear probe did: Lightning kept the
    "frozen" encoder in training mode, so its statistics drifted to the probe's training set. One
    pass gives the drifted statistics that 100 epochs give: with torch's momentum 0.1 the running
    averages forget everything older than ~50 batches.
    """
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    @jax.jit
    def update(params, batch_stats, images):
        module = nnx.merge(graphdef, params, batch_stats)
        module.train()
        module(preprocess(images))
        return nnx.state(module, nnx.BatchStat)

    order = np.random.default_rng(seed).permutation(count)
    for start in progress.trange(
        0, count - batch_size + 1, batch_size, desc="BN stats", leave=False
    ):
        batch_stats = update(
            params, batch_stats, load_batch(np.sort(order[start : start + batch_size]))
        )
    nnx.update(model, batch_stats)
    model.eval()


def as_unit_float(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [0, 1], torchvision's ToTensor: the downstream input of the
    paper."""
    return images.astype(jnp.float32) / 255.0


# --------------------------------------------------------------------------------------------------
# Reporting.


def metrics_path(checkpoint: str, task: str) -> str:
    """`<checkpoint>_<task>.json` beside the export folder (the export itself stays an Orbax
    checkpoint)."""
    return f"{checkpoint.rstrip(os.sep)}_{task}.json"


def write_metrics(path: str, record: dict) -> str:
    """Writes the JSON atomically (temporary file, then rename)."""
    record = {"written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
    target = storage.path(path)
    temporary = target.parent / f"{target.name}.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(record, indent=2, default=_json_default))
    temporary.replace(target)
    return path


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def format_table(title: str, rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain-text table: one row per encoder, metrics as percentages with two decimals."""
    header = ["encoder", *columns]
    body = [
        [row["encoder"], *(_format_cell(row.get(column)) for column in columns)] for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in body
    ]
    return "\n".join(lines)


def _format_cell(value) -> str:
    if isinstance(value, float):
        return f"{100.0 * value:.2f}"
    return "-" if value is None else str(value)
