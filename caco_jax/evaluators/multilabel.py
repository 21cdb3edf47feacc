"""BigEarthNet multi-label classification (SeCo's `main_bigearthnet.py` protocol, reused by CACo).

TFDS `bigearthnet/rgb` patches (43 CORINE labels) are mapped to the 19-class nomenclature,
cloud/snow
patches are removed when their lists are given, images are resized to 128x128 (bicubic) and scaled
to
[0, 1]. The head is Dropout(0.2) + Linear(d, 19) trained with the multi-label soft-margin loss and
Adam for
100 epochs (lr x0.1 at 60 and 80) on 10 % or 100 % of the training labels; the metric is
micro-averaged AP
on the validation split (macro AP reported beside it, labelled). The frozen mode trains the head on
cached
features; `config.eval.finetune` also trains the encoder (its BatchNorm stays in eval mode, as the
official
`on_train_epoch_start` sets it).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from caco_jax import mesh as mesh_lib
from caco_jax.evaluators import common, linear_probe, metrics

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
CLOUD_AND_SNOW_LISTS = ("patches_with_cloud_and_shadow.csv", "patches_with_seasonal_snow.csv")


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
    was
    drawn with replacement, so it held duplicates)."""
    size = max(1, round(fraction * count))
    return np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False))


@dataclasses.dataclass
class BigEarthNet:
    source: object  # random-access TFDS data source of bigearthnet/rgb `train`
    targets: np.ndarray  # [N, 19] multi-hot
    train: np.ndarray  # indices of the (label-fraction) training patches
    val: np.ndarray
    description: str
    removed_cloud_snow: int

    def images(self, indices) -> np.ndarray:
        return np.stack([self.source[int(i)]["image"] for i in indices])


def load_bigearthnet(config) -> BigEarthNet:
    import tensorflow_datasets as tfds

    builder = common.open_tfds(config.eval.data_dir, "bigearthnet", "rgb")
    mapping = nineteen_class_index(builder.info.features["labels"].feature.names)
    # Names and labels only: skip decoding the images in this pass.
    metadata = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    names, targets = [], []
    for i in tqdm.trange(len(metadata), desc="bigearthnet labels", leave=False):
        example = metadata[i]
        names.append(common.read_text(example["filename"]))
        targets.append(multi_hot(example["labels"], mapping))
    targets = np.stack(targets)
    split_dir = config.eval.split_dir

    bad = set()
    for list_name in CLOUD_AND_SNOW_LISTS:
        path = os.path.join(split_dir, list_name) if split_dir else ""
        if path and os.path.exists(path):
            bad.update(common.read_split_list(path))
    keep = np.array([name not in bad for name in names])
    removed = int((~keep).sum())

    files = (
        [os.path.join(split_dir, f"bigearthnet-{s}.txt") for s in ("train", "val")]
        if split_dir
        else []
    )
    if files and all(os.path.exists(f) for f in files):
        index = {name: i for i, name in enumerate(names)}
        splits = []
        for path in files:
            listed = common.read_split_list(path)
            missing = [name for name in listed if name not in index]
            if missing:
                raise ValueError(
                    f"{path}: {len(missing)} patches not in bigearthnet/rgb, e.g. {missing[:3]}"
                )
            chosen = np.array(sorted(index[name] for name in listed), np.int64)
            splits.append(chosen[keep[chosen]])
        train, val = splits
        description = f"SeCo split files in {split_dir}"
    else:
        reason = "config.eval.split_dir lacks bigearthnet-train.txt/bigearthnet-val.txt"
        train, rest = common.seeded_split(len(names), 0.6, config.eval.seed, reason)
        val = rest[: round(len(names) * 0.2)]
        train, val = train[keep[train]], val[keep[val]]
        description = f"seeded split (seed {config.eval.seed})"
    if config.eval.train_fraction < 1.0:
        train = train[label_subset(train.size, config.eval.train_fraction, config.eval.seed)]
    source = builder.as_data_source("train")
    return BigEarthNet(source, targets, train, val, description, removed)


@functools.cache
def bigearthnet_input(image_size: int):
    """uint8 RGB -> [0, 1], resized bicubically to `image_size` (torchvision's Resize then
    ToTensor)."""

    def preprocess(images):
        x = common.as_unit_float(images)
        return jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[-1]), "bicubic")

    return preprocess


def _ap(targets, scores) -> dict:
    result = metrics.multilabel_average_precision(targets, scores)
    return {"micro_ap": result["micro_ap"], "macro_ap": result["macro_ap"]}


def frozen_probe(encoder, data: BigEarthNet, config) -> dict:
    preprocess = bigearthnet_input(config.eval.image_size)
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
        seed=config.eval.seed,
        description=f"{encoder.name} probe",
    )
    scores = np.asarray(jax.nn.sigmoid(linear_probe.linear(params, features["val"])))
    return _ap(data.targets[data.val], scores)


def finetune(encoder, data: BigEarthNet, config) -> dict:
    """Trains encoder and head together (Adam, `config.eval.finetune_learning_rate`), data-parallel
    over
    every device; the encoder's BatchNorm keeps its statistics (eval mode), as in the official
    code."""
    settings = linear_probe.HeadSettings.from_config(config.eval)
    preprocess = bigearthnet_input(config.eval.image_size)
    mesh = mesh_lib.data_mesh()
    batch_size = common.global_batch_size(settings.batch_size, mesh)
    steps_per_epoch = data.train.size // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"bigearthnet: {data.train.size} training patches, fewer than one batch")
    model = encoder.model
    model.eval()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    key = jax.random.key(config.eval.seed)
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

    rng = np.random.default_rng(config.eval.seed)
    progress = tqdm.trange(settings.epochs, desc=f"{encoder.name} finetune", leave=False)
    for epoch in progress:
        order = rng.permutation(data.train)[: steps_per_epoch * batch_size]
        for step, batch in enumerate(order.reshape(steps_per_epoch, batch_size)):
            images = jax.device_put(data.images(np.sort(batch)), batch_sharding)
            targets = jax.device_put(data.targets[np.sort(batch)], batch_sharding)
            step_key = jax.random.fold_in(key, epoch * steps_per_epoch + step)
            trainable, opt_state, loss = train_step(trainable, opt_state, images, targets, step_key)
        progress.set_postfix(loss=f"{float(loss):.4f}")
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
    data = load_bigearthnet(config)
    evaluate = finetune if config.eval.finetune else frozen_probe
    rows = []
    for encoder in common.encoders(config, workdir):
        rows.append(
            {"encoder": encoder.name, "source": encoder.source, **evaluate(encoder, data, config)}
        )
    extra = {
        "mode": "finetune" if config.eval.finetune else "frozen",
        "train_fraction": config.eval.train_fraction,
        "split": data.description,
        "train_patches": int(data.train.size),
        "val_patches": int(data.val.size),
        "cloud_snow_removed": data.removed_cloud_snow,
        "settings": dataclasses.asdict(linear_probe.HeadSettings.from_config(config.eval)),
    }
    return common.report(config, workdir, "eval_bigearthnet", rows, ("micro_ap", "macro_ap"), extra)
