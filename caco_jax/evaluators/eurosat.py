"""EuroSAT linear probe (task `eval_eurosat`): the paper's protocol, SeCo's `main_eurosat.py`
reused by CACo's `src/main_eurosat.py`.

64x64 RGB scaled to [0, 1] without mean/std, Linear(d, 10), Adam lr 1e-3, batch 32 (last partial
batch dropped), 100 epochs, lr x0.1 at epochs 60 and 80 (`heads.HeadSettings`), validated after
every epoch on SeCo's validation split. The reported top-1 is the official one: the accuracy of
each batch of 32 validation images in the list's order (the last partial batch dropped) averaged
over the batches; the pooled top-1 of every validation image stands beside it, and the last and
the best epoch are both reported. Two probes (`config.eurosat.probe`):

- "official" (default): as Lightning ran the official code, the "frozen" encoder stays in training
  mode while the head trains (per-batch BatchNorm statistics, running statistics drifting to
  EuroSAT); validation uses the drifted running statistics. Every epoch runs the encoder.
- "cached": the encoder in eval mode, its features computed once; the head trains on the cache,
  so 100 epochs take seconds (`update_bn_stats` first refreshes the BatchNorm statistics on the
  training images, approaching the official probe's drift).

Encoders of other bands read the 13-band download (`eurosat_input`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from caco_jax.data import layout
from caco_jax.data.normalization import Normalization
from caco_jax.evaluators import common, heads, metrics, protocol
from caco_jax.evaluators.datasets import eurosat as eurosat_builder
from caco_jax.evaluators.datasets import split_lists
from caco_jax.runtime import inference, progress

EUROSAT_CLASSES = 10
PROBES = ("official", "cached")


@dataclasses.dataclass(frozen=True)
class EurosatSettings(heads.HeadSettings):
    """`config.eurosat`: the probe's training (SeCo's linear protocol) and which probe."""

    SECTION = "eurosat"
    validate_every: int = 1  # Lightning validated CACo's probe after every epoch
    # "official" trains the head with the encoder in train mode (per-batch BatchNorm statistics,
    # running ones drifting to EuroSAT, as Lightning ran CACo's main_eurosat.py); "cached" trains
    # on features cached once in eval mode (fast).
    probe: str = "official"
    update_bn_stats: bool = False  # cached probe: refresh BN statistics on the train set first

    def validate(self) -> None:
        super().validate()
        self.require(self.probe in PROBES, "probe", f"one of {PROBES}")
        self.require(
            self.probe == "cached" or not self.update_bn_stats,
            "update_bn_stats",
            "refreshes the statistics for probe='cached' only (the official probe drifts them)",
        )


@dataclasses.dataclass
class EuroSat:
    """One EuroSAT download's images and SeCo's split of them."""

    config_name: str  # "rgb" (uint8 JPEG pixels) or "all_bands" (uint16 L1C, 13 bands)
    names: list[str]  # `<Class>_<n>` of each image
    images: np.ndarray  # [N, 64, 64, bands]
    labels: np.ndarray  # [N]
    train: np.ndarray  # indices
    val: np.ndarray
    split: str  # where the split came from
    seeded_split: bool


def eurosat_config_name(norm: Normalization) -> str:
    """The EuroSAT download an encoder reads: the RGB JPEGs for an RGB encoder (the paper's
    protocol), the 13-band GeoTIFFs otherwise."""
    return "rgb" if norm.is_rgb else "all_bands"


def load_eurosat(settings: common.EvalSettings, seed: int, config_name: str) -> EuroSat:
    """Every image of the download, split with SeCo's `eurosat-train.txt` / `eurosat-val.txt` from
    `config.eval.manual_dir` (or a flagged seeded split)."""
    downloads = " or ".join(eurosat_builder.DOWNLOADS[config_name])
    builder = common.prepared(
        eurosat_builder.EurosatDownload(
            config=config_name, data_dir=settings.records_dir(), file_format="array_record"
        ),
        settings,
        downloads,
    )
    source = builder.as_data_source("train")
    example = source[0]
    images = np.empty((len(source), *example["image"].shape), example["image"].dtype)
    labels = np.empty((len(source),), np.int64)
    names = []
    for i in progress.trange(len(source), desc=f"eurosat {config_name}", leave=False):
        example = source[i]
        images[i] = example["image"]
        labels[i] = example["label"]
        names.append(common.read_text(example["name"]))
    if settings.seeded_split:
        train, val = split_lists.seeded_split(len(names), seed, "EuroSAT")
        split = f"seeded (seed {seed})"
        return EuroSat(config_name, names, images, labels, train, val, split, True)
    paths = split_lists.locate(
        settings.manual_dir, split_lists.EUROSAT_SPLITS, download=settings.download_lists
    )
    index = {name: i for i, name in enumerate(names)}
    train, val = (
        split_lists.indices(paths[file], index, "EuroSAT") for file in split_lists.EUROSAT_SPLITS
    )
    split = f"SeCo's {', '.join(split_lists.EUROSAT_SPLITS)} in {settings.manual_dir}"
    return EuroSat(config_name, names, images, labels, train, val, split, False)


@functools.cache
def eurosat_input(norm: Normalization, config_name: str):
    """The encoder's input from EuroSAT pixels. RGB JPEGs: SeCo's EuroSAT recipe, [0, 1] without
    mean/std. Multispectral GeoTIFFs (no official recipe): the encoder's bands by name, the L1C
    values brought to the archive's scale, then the export's normalisation."""
    if config_name == "rgb":
        layout.channel_indices("EuroSAT RGB", eurosat_builder.RGB_BANDS, norm.bands)
        return common.as_unit_float
    channels = np.asarray(
        layout.channel_indices("EuroSAT MS", eurosat_builder.MS_BANDS, norm.bands)
    )

    def preprocess(images):
        return norm(layout.to_archive_uint8(images[..., channels], jnp), jnp)

    return preprocess


def scores(logits: np.ndarray, labels: np.ndarray, batch_size: int) -> dict:
    """The official top-1 (the mean of per-batch accuracies over the validation list's batches of
    `batch_size`, last partial batch dropped, as Lightning logged CACo's `val/acc`) and the pooled
    top-1 of every validation image."""
    official = metrics.batch_mean(
        lambda logits, labels: {"top1": metrics.top1_accuracy(logits, labels)},
        (logits, labels),
        batch_size,
    )
    return {**official, "pooled_top1": metrics.top1_accuracy(logits, labels)}


class EuroSatEvaluation(protocol.Evaluation):
    """The EuroSAT linear probe for every encoder row (`protocol.run`)."""

    task = "eval_eurosat"
    columns = ("top1", "pooled_top1", "best_top1", "best_epoch", "train_top1")

    def dataset_key(self, encoder) -> str:
        config_name = eurosat_config_name(encoder.input)
        eurosat_input(encoder.input, config_name)  # the encoder's bands are in the download
        return config_name

    def load(self, key: str) -> EuroSat:
        return load_eurosat(self.settings.eval, self.settings.seed, key)

    def evaluate(self, encoder, data: EuroSat) -> dict:
        settings, shared, seed = self.settings.eurosat, self.settings.eval, self.settings.seed
        preprocess = eurosat_input(encoder.input, data.config_name)
        labels = {"train": data.labels[data.train], "val": data.labels[data.val]}

        def features(subset: str) -> np.ndarray:
            indices = data.train if subset == "train" else data.val
            return inference.extract_features(
                encoder.model,
                lambda i: data.images[indices[i]],
                indices.size,
                preprocess=preprocess,
                batch_size=shared.extract_batch_size,
                description=f"{encoder.name} {subset}",
            )

        history = []

        def validate(epoch, head, val_features=None):
            if protocol.is_validation_epoch(epoch, settings.validate_every, settings.epochs):
                # The official probe's encoder drifts: its validation features change every epoch.
                val_features = features("val") if val_features is None else val_features
                logits = np.asarray(heads.linear(head, val_features))
                history.append(
                    {"epoch": epoch, **scores(logits, labels["val"], settings.batch_size)}
                )

        if settings.probe == "official":
            head = heads.train_head_with_encoder_in_train_mode(
                encoder.model,
                data.images[data.train],
                labels["train"],
                preprocess=preprocess,
                num_classes=EUROSAT_CLASSES,
                settings=settings,
                seed=seed,
                description=f"{encoder.name} probe",
                after_epoch=validate,
            )
            train_features = features("train")
        else:
            if settings.update_bn_stats:
                common.refresh_batch_stats(
                    encoder.model,
                    lambda i: data.images[data.train[i]],
                    data.train.size,
                    preprocess=preprocess,
                    batch_size=settings.batch_size,
                    seed=seed,
                )
            train_features, val_features = features("train"), features("val")
            head = heads.train_linear_head(
                train_features,
                labels["train"],
                num_outputs=EUROSAT_CLASSES,
                loss_fn=heads.softmax_cross_entropy,
                settings=settings,
                seed=seed,
                description=f"{encoder.name} probe",
                after_epoch=lambda epoch, head: validate(epoch, head, val_features),
            )
        train_logits = np.asarray(heads.linear(head, train_features))
        return {
            "dataset": f"eurosat_download/{data.config_name}",
            "bands": list(encoder.input.bands),
            **protocol.best_and_last(history, "top1"),
            "train_top1": metrics.top1_accuracy(train_logits, labels["train"]),
        }

    def describe(self, data: EuroSat) -> dict:
        settings = self.settings.eurosat
        return {
            "metric": (
                f"top1: per batch of {settings.batch_size} validation images in the list's order "
                "(last partial batch dropped), averaged over the batches (CACo's main_eurosat.py); "
                "pooled_top1: over every validation image"
            ),
            "probe": settings.probe,
            "split": data.split,
            "seeded_split": data.seeded_split,
            "train_examples": int(data.train.size),
            "val_examples": int(data.val.size),
            "settings": settings.to_dict(),
            "update_bn_stats": bool(settings.update_bn_stats),
        }


def run_task(settings, workdir) -> dict:
    """Task `eval_eurosat`: the paper's EuroSAT linear probe for every encoder row."""
    return protocol.run(EuroSatEvaluation(settings), workdir)
