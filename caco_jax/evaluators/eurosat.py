"""EuroSAT linear probe (task `eval_eurosat`): the paper's protocol, SeCo's `main_eurosat.py`
reused by CACo's `src/main_eurosat.py`.

64x64 RGB scaled to [0, 1] without mean/std, Linear(d, 10), Adam lr 1e-3, batch 32 (last partial
batch dropped), 100 epochs, lr x0.1 at epochs 60 and 80 (`heads.HeadSettings`), top-1 on SeCo's
validation split. Two probes (`config.eurosat.probe`):

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
from caco_jax.evaluators import common, heads, metrics
from caco_jax.evaluators.datasets import eurosat as eurosat_builder
from caco_jax.evaluators.datasets import split_lists
from caco_jax.runtime import inference, progress

EUROSAT_CLASSES = 10
PROBES = ("official", "cached")


@dataclasses.dataclass(frozen=True)
class EurosatSettings(heads.HeadSettings):
    """`config.eurosat`: the probe's training (SeCo's linear protocol) and which probe."""

    SECTION = "eurosat"
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


def run_task(settings, workdir) -> dict:
    """Task `eval_eurosat`: the paper's EuroSAT linear probe for every encoder row."""
    protocol, shared, seed = settings.eurosat, settings.eval, settings.seed
    datasets = {}
    rows = []
    encoders = common.encoders(shared, seed, workdir)
    common.check_inputs(encoders, lambda e: eurosat_input(e.input, eurosat_config_name(e.input)))
    for encoder in encoders:
        config_name = eurosat_config_name(encoder.input)
        preprocess = eurosat_input(encoder.input, config_name)  # checks the bands first
        if config_name not in datasets:
            datasets[config_name] = load_eurosat(shared, seed, config_name)
        data = datasets[config_name]

        def load(indices, subset, images=data.images):
            return images[subset[indices]]

        if protocol.probe == "official":
            head = heads.train_head_with_encoder_in_train_mode(
                encoder.model,
                data.images[data.train],
                data.labels[data.train],
                preprocess=preprocess,
                num_classes=EUROSAT_CLASSES,
                settings=protocol,
                seed=seed,
                description=f"{encoder.name} probe",
            )
        elif protocol.update_bn_stats:
            common.refresh_batch_stats(
                encoder.model,
                lambda i, data=data: load(i, data.train),
                data.train.size,
                preprocess=preprocess,
                batch_size=protocol.batch_size,
                seed=seed,
            )
        features = {
            name: inference.extract_features(
                encoder.model,
                lambda i, subset=subset: load(i, subset),
                subset.size,
                preprocess=preprocess,
                batch_size=shared.extract_batch_size,
                description=f"{encoder.name} {name}",
            )
            for name, subset in (("train", data.train), ("val", data.val))
        }
        train = (features["train"], data.labels[data.train])
        val = (features["val"], data.labels[data.val])
        if protocol.probe == "official":
            result = {
                "top1": metrics.top1_accuracy(np.asarray(heads.linear(head, val[0])), val[1]),
                "train_top1": metrics.top1_accuracy(
                    np.asarray(heads.linear(head, train[0])), train[1]
                ),
            }
        else:
            result = heads.probe_top1(
                train,
                val,
                num_classes=EUROSAT_CLASSES,
                settings=protocol,
                seed=seed,
                description=f"{encoder.name} probe",
            )
        rows.append(
            {
                "encoder": encoder.name,
                "source": encoder.source,
                "dataset": f"eurosat_download/{config_name}",
                "bands": list(encoder.input.bands),
                **result,
            }
        )
    first = next(iter(datasets.values()))
    extra = {
        "probe": protocol.probe,
        "split": first.split,
        "seeded_split": first.seeded_split,
        "train_examples": int(first.train.size),
        "val_examples": int(first.val.size),
        "settings": protocol.to_dict(),
        "update_bn_stats": bool(protocol.update_bn_stats),
    }
    return common.report(shared, workdir, "eval_eurosat", rows, ("top1", "train_top1"), extra)
