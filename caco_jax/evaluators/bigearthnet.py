"""BigEarthNet multi-label classification (SeCo's `main_bigearthnet.py` protocol, reused by CACo).

Patches of the downloaded BigEarthNet-S2 v1.0 (`datasets.bigearthnet`; 43 CORINE labels) are mapped
to the 19-class nomenclature, split with SeCo's lists, and the cloud/shadow and seasonal-snow
patches are removed. Input: SeCo's per-band stretch (mean +- 2 std to uint8) to [0, 1], resized to
128x128 (bicubic). The head is Dropout(0.2) + Linear(d, 19) trained with the multi-label
soft-margin loss and Adam for 100 epochs (lr x0.1 at 60 and 80), batch 1024 at lr 1e-3 (SeCo's
README command), on 10 % or 100 % of the training labels, validated every 10th epoch
(`check_val_every_n_epoch=10`). The metric is the official micro AP: scikit-learn's micro AP of
each validation batch of 1024 patches in the list's order, the last partial batch dropped,
averaged over the batches; the pooled micro and macro AP of every validation patch stand beside
it, and the last and the best validated epoch are both reported. The frozen mode trains the head on
cached features (the official `on_train_epoch_start` puts the encoder in eval mode, so they are
what it sees); `config.bigearthnet.finetune` also trains the encoder (BatchNorm still in eval
mode) through `fit`.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from caco_jax.data import layout
from caco_jax.data.normalization import Normalization
from caco_jax.evaluators import common, fit, heads, metrics, protocol
from caco_jax.evaluators.datasets import bigearthnet as bigearthnet_builder
from caco_jax.evaluators.datasets import split_lists
from caco_jax.models.heads import LinearClassifier
from caco_jax.runtime import inference, progress
from caco_jax.runtime import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class BigEarthNetSettings(heads.HeadSettings):
    """`config.bigearthnet`: SeCo's main_bigearthnet.py and its README command (batch 1024,
    Dropout 0.2, 128 px), frozen or fine-tuned, on a fraction of the training labels."""

    SECTION = "bigearthnet"
    batch_size: int = 1024
    dropout: float = 0.2
    validate_every: int = 10  # main_bigearthnet.py: check_val_every_n_epoch=10
    image_size: int = 128
    train_fraction: float = 1.0  # of the training labels: the paper reports 0.1 and 1.0
    finetune: bool = False  # also train the encoder
    finetune_learning_rate: float = 1e-5  # the encoder's learning rate when fine-tuning (SeCo's)

    def validate(self) -> None:
        super().validate()
        self.require(
            self.image_size >= 32, "image_size", "must be >= 32 (a ResNet divides it by 32)"
        )
        self.require(0.0 < self.train_fraction <= 1.0, "train_fraction", "in (0, 1]")
        self.require(self.finetune_learning_rate > 0, "finetune_learning_rate", "must be > 0")


# The 19-class nomenclature of Sumbul et al. (BigEarthNet-19), in its published order.
CLASSES_19 = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland/shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)

# The 43 original labels merged into a 19-class group; labels named like a 19-class group map to
# it; the remaining eleven (airports, burnt areas, ...) have no 19-class counterpart: dropped.
MERGED_LABELS = {
    "Continuous urban fabric": "Urban fabric",
    "Discontinuous urban fabric": "Urban fabric",
    "Non-irrigated arable land": "Arable land",
    "Permanently irrigated land": "Arable land",
    "Rice fields": "Arable land",
    "Vineyards": "Permanent crops",
    "Fruit trees and berry plantations": "Permanent crops",
    "Olive groves": "Permanent crops",
    "Annual crops associated with permanent crops": "Permanent crops",
    "Natural grassland": "Natural grassland and sparsely vegetated areas",
    "Sparsely vegetated areas": "Natural grassland and sparsely vegetated areas",
    "Moors and heathland": "Moors, heathland and sclerophyllous vegetation",
    "Sclerophyllous vegetation": "Moors, heathland and sclerophyllous vegetation",
    "Inland marshes": "Inland wetlands",
    "Peatbogs": "Inland wetlands",
    "Salt marshes": "Coastal wetlands",
    "Salines": "Coastal wetlands",
    "Water bodies": "Inland waters",
    "Water courses": "Inland waters",
    "Coastal lagoons": "Marine waters",
    "Estuaries": "Marine waters",
    "Sea and ocean": "Marine waters",
}
UNMAPPED_LABELS = frozenset(
    {
        "Airports",
        "Burnt areas",
        "Bare rock",
        "Construction sites",
        "Dump sites",
        "Green urban areas",
        "Intertidal flats",
        "Mineral extraction sites",
        "Port areas",
        "Road and rail networks and associated land",
        "Sport and leisure facilities",
    }
)
# SeCo's per-band mean and std of the BigEarthNet L2A values (datasets/bigearthnet_dataset.py
# BAND_STATS): its input is each band stretched linearly from mean - 2 std .. mean + 2 std to uint8.
BAND_MEAN = {
    "B01": 340.76769064, "B02": 429.9430203, "B03": 614.21682446, "B04": 590.23569706,
    "B05": 950.68368468, "B06": 1792.46290469, "B07": 2075.46795189, "B08": 2218.94553375,
    "B8A": 2266.46036911, "B09": 2246.0605464, "B11": 1594.42694882, "B12": 1009.32729131,
}  # fmt: skip
BAND_STD = {
    "B01": 554.81258967, "B02": 572.41639287, "B03": 582.87945694, "B04": 675.88746967,
    "B05": 729.89827633, "B06": 1096.01480586, "B07": 1273.45393088, "B08": 1365.45589904,
    "B8A": 1356.13789355, "B09": 1302.3292881, "B11": 1079.19066363, "B12": 818.86747235,
}  # fmt: skip


def nineteen_class_index(label_names) -> np.ndarray:
    """For each of the 43 label names, its 19-class index, or -1 when it has none."""
    index = []
    for name in label_names:
        group = MERGED_LABELS.get(name, name)
        if group in CLASSES_19:
            index.append(CLASSES_19.index(group))
        elif name in UNMAPPED_LABELS:
            index.append(-1)
        else:
            raise ValueError(f"bigearthnet: unknown label name {name!r}")
    return np.asarray(index, np.int64)


def multi_hot(label_ids, mapping: np.ndarray) -> np.ndarray:
    """19-class multi-hot float32 vector of one patch's 43-class label ids."""
    target = np.zeros(len(CLASSES_19), np.float32)
    groups = mapping[np.asarray(label_ids, np.int64)]
    target[groups[groups >= 0]] = 1.0
    return target


def label_subset(count: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded subset of `round(fraction * count)` distinct training indices (the official subset
    was drawn with replacement, so it held duplicates)."""
    size = max(1, round(fraction * count))
    return np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False))


@dataclasses.dataclass
class BigEarthNet:
    config_name: str  # "rgb" or "all_bands" records of `bigearthnet_builder`
    source: object  # random-access data source of its `train` split (every patch)
    targets: np.ndarray  # [N, 19] multi-hot
    train: np.ndarray  # indices of the (label-fraction) training patches
    val: np.ndarray
    split: str
    seeded_split: bool
    removed_cloud_snow: int

    def images(self, indices) -> np.ndarray:
        return np.stack([self.source[int(i)]["image"] for i in indices])


def bigearthnet_config_name(norm: Normalization) -> str:
    return "rgb" if norm.is_rgb else "all_bands"


def load_bigearthnet(
    shared: common.EvalSettings, protocol: BigEarthNetSettings, seed: int, config_name: str
) -> BigEarthNet:
    """The patches of the download, split with SeCo's lists and without the cloud/shadow and
    seasonal-snow patches, all read from `config.eval.manual_dir`."""
    import tensorflow_datasets as tfds

    builder = common.prepared(
        bigearthnet_builder.BigearthnetDownload(
            config=config_name,
            data_dir=shared.records_dir(),
            file_format="array_record",
            num_workers=shared.prepare_workers,
        ),
        shared,
        " or ".join(bigearthnet_builder.DOWNLOADS),
    )
    mapping = nineteen_class_index(bigearthnet_builder.LABELS)
    # Names and labels only: skip decoding the images in this pass.
    metadata = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    names, targets = [], []
    for i in progress.trange(len(metadata), desc="bigearthnet labels", leave=False):
        example = metadata[i]
        names.append(common.read_text(example["name"]))
        targets.append(multi_hot(example["labels"], mapping))
    targets = np.stack(targets)
    index = {name: i for i, name in enumerate(names)}
    manual_dir = shared.manual_dir
    excluded_lists = split_lists.BIGEARTHNET_EXCLUDED
    if shared.seeded_split:
        train, val = split_lists.seeded_split(len(names), seed, "BigEarthNet")
        split = f"seeded (seed {seed})"
        # The cloud and snow lists are still applied when they are there.
        present = [f for f in excluded_lists if os.path.exists(os.path.join(manual_dir, f))]
        paths = split_lists.locate(manual_dir, present, download=False)
    else:
        paths = split_lists.locate(
            manual_dir,
            split_lists.BIGEARTHNET_SPLITS + excluded_lists,
            download=shared.download_lists,
        )
        train, val = (
            split_lists.indices(paths[f], index, "BigEarthNet")
            for f in split_lists.BIGEARTHNET_SPLITS
        )
        split = f"SeCo's {', '.join(split_lists.BIGEARTHNET_SPLITS)} in {manual_dir}"
    excluded = np.zeros(len(names), bool)
    for file in excluded_lists:
        if file in paths:
            excluded[split_lists.indices(paths[file], index, "BigEarthNet")] = True
    removed = int(excluded[train].sum() + excluded[val].sum())
    train, val = train[~excluded[train]], val[~excluded[val]]
    if protocol.train_fraction < 1.0:
        train = train[label_subset(train.size, protocol.train_fraction, seed)]
    source = builder.as_data_source("train")
    return BigEarthNet(
        config_name, source, targets, train, val, split, shared.seeded_split, removed
    )


def seco_stretch(band_names) -> Normalization:
    """SeCo's BigEarthNet input as a `Normalization`: each band stretched from mean - 2 std to
    mean + 2 std, no standardisation."""
    mean = np.array([BAND_MEAN[b] for b in band_names])
    std = np.array([BAND_STD[b] for b in band_names])
    return Normalization(
        bands=tuple(band_names),
        low=tuple((mean - 2 * std).tolist()),
        high=tuple((mean + 2 * std).tolist()),
        mean=(0.0,) * len(band_names),
        std=(1.0,) * len(band_names),
    )


@functools.cache
def bigearthnet_input(norm: Normalization, config_name: str, image_size: int):
    """The encoder's bands by name from the patch, SeCo's per-band stretch to [0, 1], resized
    bicubically to `image_size` (torchvision's Resize then ToTensor)."""
    stored = (
        bigearthnet_builder.RGB_BANDS if config_name == "rgb" else bigearthnet_builder.ALL_BANDS
    )
    channels = np.asarray(layout.channel_indices("BigEarthNet", stored, norm.bands))
    stretch = seco_stretch([stored[c] for c in channels])

    def preprocess(images):
        x = stretch.stretch(images[..., channels], jnp)
        return jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[-1]), "bicubic")

    return preprocess


def scores(targets: np.ndarray, probabilities: np.ndarray, batch_size: int) -> dict:
    """The official micro AP (scikit-learn's micro AP of each validation batch of `batch_size` in
    the list's order, the last partial batch dropped, averaged over the batches, as SeCo's
    `ssl_finetuner.py` logged `acc/val`) and the pooled micro and macro AP of every validation
    patch."""
    official = metrics.batch_mean(
        lambda t, p: {"micro_ap": metrics.micro_average_precision(t, p)},
        (targets, probabilities),
        batch_size,
    )
    return {
        **official,
        "pooled_micro_ap": metrics.micro_average_precision(targets, probabilities),
        "pooled_macro_ap": metrics.macro_average_precision(targets, probabilities),
    }


def frozen_probe(encoder, data: BigEarthNet, settings) -> dict:
    """The head on cached eval-mode features (the official `on_train_epoch_start` puts the encoder
    in eval mode and no gradient reaches it, so these are the features it trains on)."""
    protocol_settings = settings.bigearthnet
    preprocess = bigearthnet_input(encoder.input, data.config_name, protocol_settings.image_size)
    features = {
        name: inference.extract_features(
            encoder.model,
            lambda i, subset=subset: data.images(subset[i]),
            subset.size,
            preprocess=preprocess,
            batch_size=settings.eval.extract_batch_size,
            description=f"{encoder.name} {name}",
        )
        for name, subset in (("train", data.train), ("val", data.val))
    }
    targets = data.targets[data.val]
    history = []

    def validate(epoch, params):
        if protocol.is_validation_epoch(
            epoch, protocol_settings.validate_every, protocol_settings.epochs
        ):
            probabilities = np.asarray(jax.nn.sigmoid(heads.linear(params, features["val"])))
            history.append(
                {"epoch": epoch, **scores(targets, probabilities, protocol_settings.batch_size)}
            )

    heads.train_linear_head(
        features["train"],
        data.targets[data.train],
        num_outputs=len(CLASSES_19),
        loss_fn=heads.multilabel_soft_margin,
        settings=protocol_settings,
        seed=settings.seed,
        description=f"{encoder.name} probe",
        after_epoch=validate,
    )
    return protocol.best_and_last(history, "micro_ap")


def classify_forward(encoder, head, images, rngs):
    return head(encoder(images[0]), rngs=rngs)


def finetune(encoder, data: BigEarthNet, settings) -> dict:
    """Trains encoder and head together (`fit`: Adam at `config.bigearthnet.finetune_learning_rate`
    for both, x0.1 at the milestones), data-parallel over every device; the encoder's BatchNorm
    keeps its statistics (eval mode, the official `on_train_epoch_start`)."""
    protocol_settings, seed = settings.bigearthnet, settings.seed
    batch_size = inference.global_batch_size(protocol_settings.batch_size, mesh_lib.data_mesh())
    steps = fit.steps_per_epoch(data.train.size, batch_size, "BigEarthNet")
    rate = protocol_settings.finetune_learning_rate
    head = LinearClassifier(
        encoder.model.feature_dim,
        len(CLASSES_19),
        dropout=protocol_settings.dropout,
        rngs=nnx.Rngs(seed),
    )
    classify_fit, state = fit.start(
        encoder.model,
        head,
        encoder_bn="eval",
        preprocess=bigearthnet_input(encoder.input, data.config_name, protocol_settings.image_size),
        forward=classify_forward,
        loss=heads.multilabel_soft_margin,
        output=jax.nn.sigmoid,
        optimizer=fit.Optimizer(
            (("encoder", rate), ("head", rate)), steps, milestones=protocol_settings.milestones
        ),
    )

    def batches(epoch, rng):
        for batch in fit.shuffled_batches(data.train.size, batch_size, rng):
            indices = data.train[np.sort(batch)]
            yield (data.images(indices),), data.targets[indices]

    targets = data.targets[data.val]
    history = []

    def validate(epoch, state):
        if protocol.is_validation_epoch(
            epoch, protocol_settings.validate_every, protocol_settings.epochs
        ):
            probabilities = fit.predict(
                classify_fit,
                state,
                lambda i: (data.images(data.val[i]),),
                data.val.size,
                batch_size=settings.eval.extract_batch_size,
            )
            history.append(
                {"epoch": epoch, **scores(targets, probabilities, protocol_settings.batch_size)}
            )

    fit.train(
        classify_fit,
        state,
        batches,
        epochs=protocol_settings.epochs,
        seed=seed,
        after_epoch=validate,
        description=f"{encoder.name} finetune",
    )
    return protocol.best_and_last(history, "micro_ap")


class BigEarthNetEvaluation(protocol.Evaluation):
    """BigEarthNet-19, frozen probe or fine-tuning, for every encoder row (`protocol.run`)."""

    task = "eval_bigearthnet"
    columns = ("micro_ap", "pooled_micro_ap", "pooled_macro_ap", "best_micro_ap", "best_epoch")

    def dataset_key(self, encoder) -> str:
        config_name = bigearthnet_config_name(encoder.input)
        bigearthnet_input(encoder.input, config_name, self.settings.bigearthnet.image_size)
        return config_name

    def load(self, key: str) -> BigEarthNet:
        return load_bigearthnet(
            self.settings.eval, self.settings.bigearthnet, self.settings.seed, key
        )

    def evaluate(self, encoder, data: BigEarthNet) -> dict:
        evaluate = finetune if self.settings.bigearthnet.finetune else frozen_probe
        return {
            "dataset": f"bigearthnet_download/{data.config_name}",
            "bands": list(encoder.input.bands),
            **evaluate(encoder, data, self.settings),
        }

    def describe(self, data: BigEarthNet) -> dict:
        settings = self.settings.bigearthnet
        return {
            "metric": (
                f"micro_ap: scikit-learn's micro AP per batch of {settings.batch_size} validation "
                "patches in the list's order (last partial batch dropped), averaged over the "
                "batches (SeCo's ssl_finetuner.py); pooled_*: over every validation patch"
            ),
            "mode": "finetune" if settings.finetune else "frozen",
            "train_fraction": settings.train_fraction,
            "split": data.split,
            "seeded_split": data.seeded_split,
            "train_patches": int(data.train.size),
            "val_patches": int(data.val.size),
            "cloud_snow_removed": data.removed_cloud_snow,
            "settings": settings.to_dict(),
        }


def run_task(settings, workdir) -> dict:
    """Task `eval_bigearthnet`: frozen probe (default) or full fine-tuning, for every encoder
    row."""
    return protocol.run(BigEarthNetEvaluation(settings), workdir)
