"""Linear probes on a frozen encoder: EuroSAT (the paper's protocol) and the demo's synthetic land
cover.

Protocol (SeCo's `main_eurosat.py`, reused by CACo's `src/main_eurosat.py`): 64x64 RGB scaled to
[0, 1] without mean/std, Linear(d, 10), Adam lr 1e-3, batch 32 (last partial batch dropped), 100
epochs, lr x0.1 at epochs 60 and 80, top-1 on SeCo's validation split. Two probes
(`config.eval.probe`):

- "official" (default): as Lightning ran the official code, the "frozen" encoder stays in training
  mode while the head trains (per-batch BatchNorm statistics, running statistics drifting to
  EuroSAT); validation uses the drifted running statistics. Every epoch runs the encoder.
- "cached": the encoder in eval mode, its features computed once; the head trains on the cache with
  whole epochs compiled as one `lax.scan`, so 100 epochs take seconds.
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

from caco_jax import progress
from caco_jax.data.normalization import Normalization
from caco_jax.evaluators import bands, common, eurosat_builder, metrics, split_lists

EUROSAT_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class HeadSettings:
    """How a linear head trains on cached features (defaults: the EuroSAT protocol)."""

    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3
    milestones: tuple[int, ...] = (60, 80)
    dropout: float = 0.0  # on the features, before the linear layer (BigEarthNet uses 0.2)

    @classmethod
    def from_config(cls, eval_config) -> HeadSettings:
        return cls(
            epochs=eval_config.epochs,
            batch_size=eval_config.batch_size,
            learning_rate=eval_config.learning_rate,
            milestones=tuple(eval_config.milestones),
            dropout=eval_config.dropout,
        )


def softmax_cross_entropy(logits, labels):
    """torch's CrossEntropyLoss: the mean over the batch of -log softmax at the label."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def multilabel_soft_margin(logits, targets):
    """torch's MultiLabelSoftMarginLoss: per-class binary cross-entropy on logits, averaged over
    classes
    and batch."""
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean()


def init_linear(key, in_features: int, out_features: int) -> dict:
    """torch's nn.Linear initialisation: weight and bias uniform in +-1/sqrt(in_features)."""
    bound = 1.0 / np.sqrt(in_features)
    weight_key, bias_key = jax.random.split(key)
    return {
        "kernel": jax.random.uniform(
            weight_key, (in_features, out_features), jnp.float32, -bound, bound
        ),
        "bias": jax.random.uniform(bias_key, (out_features,), jnp.float32, -bound, bound),
    }


def linear(params: dict, features):
    return features @ params["kernel"] + params["bias"]


def step_schedule(settings: HeadSettings, steps_per_epoch: int) -> optax.Schedule:
    """torch's MultiStepLR stepped once per epoch, as a schedule over optimiser steps."""
    return optax.piecewise_constant_schedule(
        settings.learning_rate, {m * steps_per_epoch: 0.1 for m in settings.milestones}
    )


def epoch_learning_rate(settings: HeadSettings, epoch: int) -> float:
    """torch's MultiStepLR: the learning rate times 0.1 per milestone reached."""
    return settings.learning_rate * 0.1 ** sum(epoch >= m for m in settings.milestones)


# Adam's moment estimates; the learning rate is applied per epoch (a traced value: no recompiles).
ADAM = optax.scale_by_adam()


@functools.partial(jax.jit, static_argnames=("loss_fn", "batch_size", "dropout", "steps_per_epoch"))
def train_head_epoch(
    params,
    opt_state,
    features,
    targets,
    key,
    learning_rate,
    *,
    loss_fn,
    batch_size: int,
    dropout: float,
    steps_per_epoch: int,
):
    """One epoch over the cached features as a `lax.scan`: a seeded shuffle cut into full batches
    (the last partial batch dropped, as the official loaders did), dropout on the features, Adam
    steps. Returns (params, opt_state, mean loss)."""
    keep = 1.0 - dropout
    order_key, dropout_key = jax.random.split(key)
    batches = jax.random.permutation(order_key, features.shape[0])
    batches = batches[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
    step_keys = jax.random.split(dropout_key, steps_per_epoch)

    def step(carry, batch):
        params, opt_state = carry
        indices, step_key = batch
        x = features[indices]
        x = jnp.where(jax.random.bernoulli(step_key, keep, x.shape), x / keep, 0.0)
        loss, grads = jax.value_and_grad(lambda p: loss_fn(linear(p, x), targets[indices]))(params)
        updates, opt_state = ADAM.update(grads, opt_state)
        params = jax.tree.map(lambda p, u: p - learning_rate * u, params, updates)
        return (params, opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (batches, step_keys))
    return params, opt_state, losses.mean()


def train_linear_head(
    features: np.ndarray,
    targets: np.ndarray,
    *,
    num_outputs: int,
    loss_fn,
    settings: HeadSettings,
    seed: int,
    description: str = "probe",
) -> dict:
    """Trains Dropout(p) + Linear(d, num_outputs) with Adam on cached features; returns params."""
    count = features.shape[0]
    steps_per_epoch = count // settings.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{description}: {count} training examples, fewer than one batch of "
            f"{settings.batch_size}"
        )
    key = jax.random.key(seed)
    init_key, key = jax.random.split(key)
    params = init_linear(init_key, features.shape[1], num_outputs)
    opt_state = ADAM.init(params)
    features = jnp.asarray(features, jnp.float32)
    targets = jnp.asarray(targets)
    epochs = progress.trange(settings.epochs, desc=description, leave=False)
    for epoch in epochs:
        params, opt_state, loss = train_head_epoch(
            params,
            opt_state,
            features,
            targets,
            jax.random.fold_in(key, epoch),
            jnp.float32(epoch_learning_rate(settings, epoch)),
            loss_fn=loss_fn,
            batch_size=settings.batch_size,
            dropout=settings.dropout,
            steps_per_epoch=steps_per_epoch,
        )
        epochs.set_postfix(loss=f"{float(loss):.4f}")
    return jax.device_get(params)


def probe_top1(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    num_classes: int,
    settings: HeadSettings,
    seed: int,
    description: str,
) -> dict:
    """Trains a softmax probe on `train` (features, labels) and reports top-1 on both sets."""
    params = train_linear_head(
        *train,
        num_outputs=num_classes,
        loss_fn=softmax_cross_entropy,
        settings=settings,
        seed=seed,
        description=description,
    )
    return {
        "top1": metrics.top1_accuracy(np.asarray(linear(params, test[0])), test[1]),
        "train_top1": metrics.top1_accuracy(np.asarray(linear(params, train[0])), train[1]),
    }


# --------------------------------------------------------------------------------------------------
# The official probe: the encoder in training mode while the head trains.


def train_mode_features(graphdef, params, batch_stats, images):
    """Pooled features of `images` with the encoder in training mode: each batch normalised with its
    own BatchNorm statistics, the running statistics updated (torch's momentum 0.1). Returns
    (features, updated running statistics). `graphdef` must be split from a model in train mode."""
    module = nnx.merge(graphdef, params, batch_stats)
    features = module(images)
    return jax.lax.stop_gradient(features), nnx.state(module, nnx.BatchStat)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "preprocess", "batch_size", "steps_per_epoch")
)
def official_head_epoch(
    graphdef,
    params,
    batch_stats,
    head,
    opt_state,
    images,
    labels,
    key,
    learning_rate,
    *,
    preprocess,
    batch_size: int,
    steps_per_epoch: int,
):
    """One epoch of the official probe as a `lax.scan`: a seeded shuffle cut into full batches,
    each through the encoder in training mode (no gradient into it), then an Adam step on the head.
    Returns (running statistics, head, opt_state, mean loss)."""
    order = jax.random.permutation(key, images.shape[0])
    batches = order[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)

    def step(carry, indices):
        batch_stats, head, opt_state = carry
        features, batch_stats = train_mode_features(
            graphdef, params, batch_stats, preprocess(images[indices])
        )
        loss, grads = jax.value_and_grad(
            lambda h: softmax_cross_entropy(linear(h, features), labels[indices])
        )(head)
        updates, opt_state = ADAM.update(grads, opt_state)
        head = jax.tree.map(lambda p, u: p - learning_rate * u, head, updates)
        return (batch_stats, head, opt_state), loss

    (batch_stats, head, opt_state), losses = jax.lax.scan(
        step, (batch_stats, head, opt_state), batches
    )
    return batch_stats, head, opt_state, losses.mean()


def train_head_with_encoder_in_train_mode(
    model,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    preprocess,
    num_classes: int,
    settings: HeadSettings,
    seed: int,
    description: str = "probe",
) -> dict:
    """CACo's `main_eurosat.py` as Lightning ran it: the "frozen" encoder stays in training mode,
    so the head trains on features normalised with each batch's own BatchNorm statistics while the
    running statistics drift to the training images (torch's momentum 0.1). Leaves `model` in eval
    mode with the drifted statistics (what the official validation used); returns the head."""
    count = images.shape[0]
    steps_per_epoch = count // settings.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{description}: {count} training examples, fewer than one batch of "
            f"{settings.batch_size}"
        )
    model.train()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    model.eval()
    key = jax.random.key(seed)
    init_key, key = jax.random.split(key)
    head = init_linear(init_key, model.feature_dim, num_classes)
    opt_state = ADAM.init(head)
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    epochs = progress.trange(settings.epochs, desc=description, leave=False)
    for epoch in epochs:
        batch_stats, head, opt_state, loss = official_head_epoch(
            graphdef,
            params,
            batch_stats,
            head,
            opt_state,
            images,
            labels,
            jax.random.fold_in(key, epoch),
            jnp.float32(epoch_learning_rate(settings, epoch)),
            preprocess=preprocess,
            batch_size=settings.batch_size,
            steps_per_epoch=steps_per_epoch,
        )
        epochs.set_postfix(loss=f"{float(loss):.4f}")
    nnx.update(model, batch_stats)
    model.eval()
    return jax.device_get(head)


# --------------------------------------------------------------------------------------------------
# EuroSAT.


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
    return "rgb" if bands.is_rgb(norm) else "all_bands"


def load_eurosat(config, config_name: str) -> EuroSat:
    """Every image of the download, split with SeCo's `eurosat-train.txt` / `eurosat-val.txt` from
    `config.eval.manual_dir` (or a flagged seeded split)."""
    downloads = " or ".join(eurosat_builder.DOWNLOADS[config_name])
    builder = common.prepared(
        eurosat_builder.EurosatDownload(
            config=config_name, data_dir=common.data_dir(config), file_format="array_record"
        ),
        config,
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
    if config.eval.seeded_split:
        train, val = split_lists.seeded_split(len(names), config.seed, "EuroSAT")
        split = f"seeded (seed {config.seed})"
        return EuroSat(config_name, names, images, labels, train, val, split, True)
    paths = split_lists.locate(
        config.eval.manual_dir, split_lists.EUROSAT_SPLITS, download=config.eval.download_lists
    )
    index = {name: i for i, name in enumerate(names)}
    train, val = (
        split_lists.indices(paths[file], index, "EuroSAT") for file in split_lists.EUROSAT_SPLITS
    )
    split = f"SeCo's {', '.join(split_lists.EUROSAT_SPLITS)} in {config.eval.manual_dir}"
    return EuroSat(config_name, names, images, labels, train, val, split, False)


@functools.cache
def eurosat_input(norm: Normalization, config_name: str):
    """The encoder's input from EuroSAT pixels. RGB JPEGs: SeCo's EuroSAT recipe, [0, 1] without
    mean/std. Multispectral GeoTIFFs (no official recipe): the encoder's bands by name, the L1C
    values brought to the archive's scale, then the export's normalisation."""
    if config_name == "rgb":
        bands.channel_indices("EuroSAT RGB", eurosat_builder.RGB_BANDS, norm.bands)
        return common.as_unit_float
    channels = np.asarray(bands.channel_indices("EuroSAT MS", eurosat_builder.MS_BANDS, norm.bands))

    def preprocess(images):
        return norm(bands.to_archive_scale(images[..., channels], jnp), jnp)

    return preprocess


def eurosat_task(config, workdir: str) -> dict:
    """Task `eval_eurosat`: the paper's EuroSAT linear probe for every encoder row."""
    settings = HeadSettings.from_config(config.eval)
    datasets = {}
    rows = []
    for encoder in common.encoders(config, workdir):
        config_name = eurosat_config_name(encoder.input)
        preprocess = eurosat_input(encoder.input, config_name)  # checks the bands first
        if config_name not in datasets:
            datasets[config_name] = load_eurosat(config, config_name)
        data = datasets[config_name]

        def load(indices, subset, images=data.images):
            return images[subset[indices]]

        if config.eval.probe == "official":
            head = train_head_with_encoder_in_train_mode(
                encoder.model,
                data.images[data.train],
                data.labels[data.train],
                preprocess=preprocess,
                num_classes=EUROSAT_CLASSES,
                settings=settings,
                seed=config.seed,
                description=f"{encoder.name} probe",
            )
        elif config.eval.update_bn_stats:
            common.refresh_batch_stats(
                encoder.model,
                lambda i, data=data: load(i, data.train),
                data.train.size,
                preprocess=preprocess,
                batch_size=settings.batch_size,
                seed=config.seed,
            )
        features = {
            name: common.extract_features(
                encoder.model,
                lambda i, subset=subset: load(i, subset),
                subset.size,
                preprocess=preprocess,
                batch_size=config.eval.extract_batch_size,
                description=f"{encoder.name} {name}",
            )
            for name, subset in (("train", data.train), ("val", data.val))
        }
        train = (features["train"], data.labels[data.train])
        val = (features["val"], data.labels[data.val])
        if config.eval.probe == "official":
            result = {
                "top1": metrics.top1_accuracy(np.asarray(linear(head, val[0])), val[1]),
                "train_top1": metrics.top1_accuracy(np.asarray(linear(head, train[0])), train[1]),
            }
        else:
            result = probe_top1(
                train,
                val,
                num_classes=EUROSAT_CLASSES,
                settings=settings,
                seed=config.seed,
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
        "probe": config.eval.probe,
        "split": first.split,
        "seeded_split": first.seeded_split,
        "train_examples": int(first.train.size),
        "val_examples": int(first.val.size),
        "settings": dataclasses.asdict(settings),
        "update_bn_stats": bool(config.eval.update_bn_stats),
    }
    return common.report(config, workdir, "eval_eurosat", rows, ("top1", "train_top1"), extra)


# --------------------------------------------------------------------------------------------------
# The demo: land cover of the synthetic archive's locations.


def load_synthetic_land_cover(config, workdir: str):
    """(images uint8 [M, 264, 264, 3], labels [M], location index [M]): the early-window
    acquisitions of every location of the prepared synthetic records, labelled with the location's
    dominant land cover (the synthetic ground truth describes the early window; changed locations
    may differ later)."""
    from caco_jax.data import records, synthetic

    truth_path = synthetic.ground_truth_path(config, workdir)
    if not os.path.exists(truth_path):
        raise FileNotFoundError(f"config.data.archive: no {truth_path} (run the synthesize task)")
    land_cover = {
        row.location_id: row.land_cover for row in synthetic.read_ground_truth(truth_path)
    }
    data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
    source = records.open_records(data_dir, builder_config="rgb", split="train")
    images, labels, locations = [], [], []
    for i in progress.trange(len(source), desc="land cover", leave=False):
        arrays = source[i]
        if arrays["location_id"] not in land_cover:
            raise ValueError(
                f"location {arrays['location_id']!r} of the records is not in {truth_path}"
            )
        early = arrays["pixels"][arrays["window"] == 0]
        images.append(early)
        labels += [land_cover[arrays["location_id"]]] * early.shape[0]
        locations += [i] * early.shape[0]
    return np.concatenate(images), np.asarray(labels), np.asarray(locations)


@functools.cache
def pretraining_input(image_size: int):
    """The pretraining input (`Normalization.rgb`: SeCo's stretch, ImageNet mean/std), resized
    to ``image_size``: the demo probes the encoder on the inputs it was trained on."""
    norm = Normalization.rgb()

    def preprocess(images):
        x = norm.stretch(images, jnp)
        x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[-1]), "bilinear")
        return norm.standardize(x, jnp)

    return preprocess


def land_cover_task(config, workdir: str) -> dict:
    """Task `linear_probe`: a linear probe of land cover on the synthetic archive, locations split
    in halves (seeded), so the demo shows whether pretraining beats a random encoder."""
    from caco_jax.data import synthetic

    images, labels, locations = load_synthetic_land_cover(config, workdir)
    num_locations = int(locations.max()) + 1
    # The synthetic archive has no fixed split: seeded halves of its locations.
    order = np.random.default_rng(config.seed).permutation(num_locations)
    train_locations = order[: num_locations // 2]
    in_train = np.isin(locations, train_locations)
    train, test = np.flatnonzero(in_train), np.flatnonzero(~in_train)
    num_classes = len(synthetic.LAND_COVER_CLASSES)
    settings = HeadSettings.from_config(config.eval)
    preprocess = pretraining_input(config.eval.image_size)
    rows = []
    for encoder in common.encoders(config, workdir):
        features = [
            common.extract_features(
                encoder.model,
                lambda i, subset=subset: images[subset[i]],
                subset.size,
                preprocess=preprocess,
                batch_size=config.eval.extract_batch_size,
                description=f"{encoder.name} features",
            )
            for subset in (train, test)
        ]
        result = probe_top1(
            (features[0], labels[train]),
            (features[1], labels[test]),
            num_classes=num_classes,
            settings=settings,
            seed=config.seed,
            description=f"{encoder.name} probe",
        )
        rows.append({"encoder": encoder.name, "source": encoder.source, **result})
    extra = {
        "train_images": int(train.size),
        "test_images": int(test.size),
        "classes": num_classes,
        "chance_top1": float(np.max(np.bincount(labels[test])) / test.size),
        "settings": dataclasses.asdict(settings),
    }
    return common.report(config, workdir, "linear_probe", rows, ("top1", "train_top1"), extra)
