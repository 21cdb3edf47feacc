"""BigEarthNet multi-label classification (SeCo's `main_bigearthnet.py` protocol, reused by CACo).

Patches of the downloaded BigEarthNet-S2 v1.0 (`datasets.bigearthnet`; 43 CORINE labels) are mapped
to the 19-class nomenclature, split with SeCo's lists, and the cloud/shadow and seasonal-snow
patches are removed. Input: SeCo's per-band stretch (mean +- 2 std to uint8) to [0, 1], resized to
128x128 (bicubic). The head is Dropout(0.2) + Linear(d, 19) trained with the multi-label
soft-margin loss and Adam for 100 epochs (lr x0.1 at 60 and 80), batch 1024 at lr 1e-3 (SeCo's
README command), on 10 % or 100 % of the training labels; the metric is micro-averaged AP on the
validation split (macro AP reported beside it, labelled). The frozen mode trains the head on cached
features (the official `on_train_epoch_start` puts the encoder in eval mode, so they are what it
sees); `config.bigearthnet.finetune` also trains the encoder (BatchNorm still in eval mode).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from caco_jax.data import layout
from caco_jax.data.normalization import Normalization
from caco_jax.evaluators import common, heads, metrics
from caco_jax.evaluators.datasets import bigearthnet as bigearthnet_builder
from caco_jax.evaluators.datasets import split_lists
from caco_jax.runtime import inference, progress
from caco_jax.runtime import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class BigEarthNetSettings(heads.HeadSettings):
    """`config.bigearthnet`: SeCo's main_bigearthnet.py and its README command (batch 1024,
    Dropout 0.2, 128 px), frozen or fine-tuned, on a fraction of the training labels."""

    SECTION = "bigearthnet"
    batch_size: int = 1024
    dropout: float = 0.2
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


def _ap(targets, scores) -> dict:
    result = metrics.multilabel_average_precision(targets, scores)
    return {"micro_ap": result["micro_ap"], "macro_ap": result["macro_ap"]}


def frozen_probe(encoder, data: BigEarthNet, settings) -> dict:
    protocol = settings.bigearthnet
    preprocess = bigearthnet_input(encoder.input, data.config_name, protocol.image_size)
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
    params = heads.train_linear_head(
        features["train"],
        data.targets[data.train],
        num_outputs=len(CLASSES_19),
        loss_fn=heads.multilabel_soft_margin,
        settings=protocol,
        seed=settings.seed,
        description=f"{encoder.name} probe",
    )
    scores = np.asarray(jax.nn.sigmoid(heads.linear(params, features["val"])))
    return _ap(data.targets[data.val], scores)


def finetune(encoder, data: BigEarthNet, settings) -> dict:
    """Trains encoder and head together (Adam, `config.bigearthnet.finetune_learning_rate`),
    data-parallel over every device; the encoder's BatchNorm keeps its statistics (eval mode), as
    in the official code."""
    protocol, seed = settings.bigearthnet, settings.seed
    preprocess = bigearthnet_input(encoder.input, data.config_name, protocol.image_size)
    mesh = mesh_lib.data_mesh()
    batch_size = inference.global_batch_size(protocol.batch_size, mesh)
    steps_per_epoch = data.train.size // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"bigearthnet: {data.train.size} training patches, fewer than one batch")
    model = encoder.model
    model.eval()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    key = jax.random.key(seed)
    trainable = {
        "encoder": params,
        "head": heads.init_linear(key, model.feature_dim, len(CLASSES_19)),
    }
    schedule = heads.step_schedule(
        protocol.replace(learning_rate=protocol.finetune_learning_rate), steps_per_epoch
    )
    optimizer = optax.adam(schedule)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec(mesh_lib.AXIS))
    trainable, batch_stats = jax.device_put((trainable, batch_stats), replicated)
    opt_state = optimizer.init(trainable)
    keep = 1.0 - protocol.dropout

    @jax.jit
    def train_step(trainable, opt_state, images, targets, step_key):
        def loss_fn(trainable):
            features = nnx.merge(graphdef, trainable["encoder"], batch_stats)(preprocess(images))
            features = jnp.where(
                jax.random.bernoulli(step_key, keep, features.shape), features / keep, 0.0
            )
            return heads.multilabel_soft_margin(heads.linear(trainable["head"], features), targets)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    epochs = progress.trange(protocol.epochs, desc=f"{encoder.name} finetune", leave=False)
    for epoch in epochs:
        order = rng.permutation(data.train)[: steps_per_epoch * batch_size]
        for step, batch in enumerate(order.reshape(steps_per_epoch, batch_size)):
            images = jax.device_put(data.images(np.sort(batch)), batch_sharding)
            targets = jax.device_put(data.targets[np.sort(batch)], batch_sharding)
            step_key = jax.random.fold_in(key, epoch * steps_per_epoch + step)
            trainable, opt_state, loss = train_step(trainable, opt_state, images, targets, step_key)
        epochs.set_postfix(loss=f"{float(loss):.4f}")
    nnx.update(model, jax.device_get(trainable["encoder"]))
    features = inference.extract_features(
        model,
        lambda i: data.images(data.val[i]),
        data.val.size,
        preprocess=preprocess,
        batch_size=settings.eval.extract_batch_size,
        description=f"{encoder.name} val",
    )
    head = jax.device_get(trainable["head"])
    scores = np.asarray(jax.nn.sigmoid(heads.linear(head, features)))
    return _ap(data.targets[data.val], scores)


def run_task(settings, workdir) -> dict:
    """Task `eval_bigearthnet`: frozen probe (default) or full fine-tuning, for every encoder
    row."""
    protocol, shared, seed = settings.bigearthnet, settings.eval, settings.seed
    evaluate = finetune if protocol.finetune else frozen_probe
    datasets = {}
    rows = []
    encoders = common.encoders(shared, seed, workdir)
    common.check_inputs(
        encoders,
        lambda e: bigearthnet_input(e.input, bigearthnet_config_name(e.input), protocol.image_size),
    )
    for encoder in encoders:
        config_name = bigearthnet_config_name(encoder.input)
        bigearthnet_input(encoder.input, config_name, protocol.image_size)  # checks the bands
        if config_name not in datasets:
            datasets[config_name] = load_bigearthnet(shared, protocol, seed, config_name)
        result = evaluate(encoder, datasets[config_name], settings)
        rows.append(
            {
                "encoder": encoder.name,
                "source": encoder.source,
                "dataset": f"bigearthnet_download/{config_name}",
                "bands": list(encoder.input.bands),
                **result,
            }
        )
    data = next(iter(datasets.values()))
    extra = {
        "mode": "finetune" if protocol.finetune else "frozen",
        "train_fraction": protocol.train_fraction,
        "split": data.split,
        "seeded_split": data.seeded_split,
        "train_patches": int(data.train.size),
        "val_patches": int(data.val.size),
        "cloud_snow_removed": data.removed_cloud_snow,
        "settings": protocol.to_dict(),
    }
    return common.report(shared, workdir, "eval_bigearthnet", rows, ("micro_ap", "macro_ap"), extra)
