"""BigEarthNet multi-label classification (SeCo's `main_bigearthnet.py` protocol, reused by CACo).

Patches of the downloaded BigEarthNet-S2 v1.0 (`bigearthnet_builder`; 43 CORINE labels) are mapped
to the 19-class nomenclature, split with SeCo's lists, and the cloud/shadow and seasonal-snow
patches are removed. Input: SeCo's per-band stretch (mean +- 2 std to uint8) to [0, 1], resized to
128x128 (bicubic). The head is Dropout(0.2) + Linear(d, 19) trained with the multi-label
soft-margin loss and Adam for 100 epochs (lr x0.1 at 60 and 80), batch 1024 at lr 1e-3 (SeCo's
README command), on 10 % or 100 % of the training labels; the metric is micro-averaged AP on the
validation split (macro AP reported beside it, labelled). The frozen mode trains the head on cached
features (the official `on_train_epoch_start` puts the encoder in eval mode, so they are what it
sees); `config.eval.finetune` also trains the encoder (BatchNorm still in eval mode).
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

from caco_jax import mesh as mesh_lib
from caco_jax import progress
from caco_jax.data.normalization import Normalization
from caco_jax.evaluators import (
    bands,
    bigearthnet_builder,
    common,
    linear_probe,
    metrics,
    split_lists,
)

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
# it; the
# remaining eleven (airports, burnt areas, ...) have no 19-class counterpart and are dropped.
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
    return "rgb" if bands.is_rgb(norm) else "all_bands"


def load_bigearthnet(config, config_name: str) -> BigEarthNet:
    """The patches of the download, split with SeCo's lists and without the cloud/shadow and
    seasonal-snow patches, all read from `config.eval.manual_dir`."""
    import tensorflow_datasets as tfds

    builder = common.prepared(
        bigearthnet_builder.BigearthnetDownload(
            config=config_name,
            data_dir=common.data_dir(config),
            file_format="array_record",
            num_workers=config.eval.prepare_workers,
        ),
        config,
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
    manual_dir = config.eval.manual_dir
    excluded_lists = split_lists.BIGEARTHNET_EXCLUDED
    if config.eval.seeded_split:
        train, val = split_lists.seeded_split(len(names), config.seed, "BigEarthNet")
        split = f"seeded (seed {config.seed})"
        # The cloud and snow lists are still applied when they are there.
        present = [f for f in excluded_lists if os.path.exists(os.path.join(manual_dir, f))]
        paths = split_lists.locate(manual_dir, present, download=False)
    else:
        paths = split_lists.locate(
            manual_dir,
            split_lists.BIGEARTHNET_SPLITS + excluded_lists,
            download=config.eval.download_lists,
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
    if config.eval.train_fraction < 1.0:
        train = train[label_subset(train.size, config.eval.train_fraction, config.seed)]
    source = builder.as_data_source("train")
    return BigEarthNet(
        config_name, source, targets, train, val, split, config.eval.seeded_split, removed
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
    channels = np.asarray(bands.channel_indices("BigEarthNet", stored, norm.bands))
    stretch = seco_stretch([stored[c] for c in channels])

    def preprocess(images):
        x = stretch.stretch(images[..., channels], jnp)
        return jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[-1]), "bicubic")

    return preprocess


def _ap(targets, scores) -> dict:
    result = metrics.multilabel_average_precision(targets, scores)
    return {"micro_ap": result["micro_ap"], "macro_ap": result["macro_ap"]}


def frozen_probe(encoder, data: BigEarthNet, config) -> dict:
    preprocess = bigearthnet_input(encoder.input, data.config_name, config.eval.image_size)
    features = {
        name: common.extract_features(
            encoder.model,
            lambda i, subset=subset: data.images(subset[i]),
            subset.size,
            preprocess=preprocess,
            batch_size=config.eval.extract_batch_size,
            description=f"{encoder.name} {name}",
        )
        for name, subset in (("train", data.train), ("val", data.val))
    }
    params = linear_probe.train_linear_head(
        features["train"],
        data.targets[data.train],
        num_outputs=len(CLASSES_19),
        loss_fn=linear_probe.multilabel_soft_margin,
        settings=linear_probe.HeadSettings.from_config(config.eval),
        seed=config.seed,
        description=f"{encoder.name} probe",
    )
    scores = np.asarray(jax.nn.sigmoid(linear_probe.linear(params, features["val"])))
    return _ap(data.targets[data.val], scores)


def finetune(encoder, data: BigEarthNet, config) -> dict:
    """Trains encoder and head together (Adam, `config.eval.finetune_learning_rate`), data-parallel
    over every device; the encoder's BatchNorm keeps its statistics (eval mode), as in the official
    code."""
    settings = linear_probe.HeadSettings.from_config(config.eval)
    preprocess = bigearthnet_input(encoder.input, data.config_name, config.eval.image_size)
    mesh = mesh_lib.data_mesh()
    batch_size = common.global_batch_size(settings.batch_size, mesh)
    steps_per_epoch = data.train.size // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"bigearthnet: {data.train.size} training patches, fewer than one batch")
    model = encoder.model
    model.eval()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    key = jax.random.key(config.seed)
    trainable = {
        "encoder": params,
        "head": linear_probe.init_linear(key, model.feature_dim, len(CLASSES_19)),
    }
    schedule = linear_probe.step_schedule(
        dataclasses.replace(settings, learning_rate=config.eval.finetune_learning_rate),
        steps_per_epoch,
    )
    optimizer = optax.adam(schedule)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec(common.DATA_AXIS))
    trainable, batch_stats = jax.device_put((trainable, batch_stats), replicated)
    opt_state = optimizer.init(trainable)
    keep = 1.0 - settings.dropout

    @jax.jit
    def train_step(trainable, opt_state, images, targets, step_key):
        def loss_fn(trainable):
            features = nnx.merge(graphdef, trainable["encoder"], batch_stats)(preprocess(images))
            features = jnp.where(
                jax.random.bernoulli(step_key, keep, features.shape), features / keep, 0.0
            )
            return linear_probe.multilabel_soft_margin(
                linear_probe.linear(trainable["head"], features), targets
            )

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    rng = np.random.default_rng(config.seed)
    epochs = progress.trange(settings.epochs, desc=f"{encoder.name} finetune", leave=False)
    for epoch in epochs:
        order = rng.permutation(data.train)[: steps_per_epoch * batch_size]
        for step, batch in enumerate(order.reshape(steps_per_epoch, batch_size)):
            images = jax.device_put(data.images(np.sort(batch)), batch_sharding)
            targets = jax.device_put(data.targets[np.sort(batch)], batch_sharding)
            step_key = jax.random.fold_in(key, epoch * steps_per_epoch + step)
            trainable, opt_state, loss = train_step(trainable, opt_state, images, targets, step_key)
        epochs.set_postfix(loss=f"{float(loss):.4f}")
    nnx.update(model, jax.device_get(trainable["encoder"]))
    features = common.extract_features(
        model,
        lambda i: data.images(data.val[i]),
        data.val.size,
        preprocess=preprocess,
        batch_size=config.eval.extract_batch_size,
        description=f"{encoder.name} val",
    )
    head = jax.device_get(trainable["head"])
    scores = np.asarray(jax.nn.sigmoid(linear_probe.linear(head, features)))
    return _ap(data.targets[data.val], scores)


def bigearthnet_task(config, workdir: str) -> dict:
    """Task `eval_bigearthnet`: frozen probe (default) or full fine-tuning, for every encoder
    row."""
    evaluate = finetune if config.eval.finetune else frozen_probe
    datasets = {}
    rows = []
    for encoder in common.encoders(config, workdir):
        config_name = bigearthnet_config_name(encoder.input)
        bigearthnet_input(encoder.input, config_name, config.eval.image_size)  # checks the bands
        if config_name not in datasets:
            datasets[config_name] = load_bigearthnet(config, config_name)
        result = evaluate(encoder, datasets[config_name], config)
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
        "mode": "finetune" if config.eval.finetune else "frozen",
        "train_fraction": config.eval.train_fraction,
        "split": data.split,
        "seeded_split": data.seeded_split,
        "train_patches": int(data.train.size),
        "val_patches": int(data.val.size),
        "cloud_snow_removed": data.removed_cloud_snow,
        "settings": dataclasses.asdict(linear_probe.HeadSettings.from_config(config.eval)),
    }
    return common.report(config, workdir, "eval_bigearthnet", rows, ("micro_ap", "macro_ap"), extra)
