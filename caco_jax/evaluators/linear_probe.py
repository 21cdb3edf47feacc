"""Linear probes on a frozen encoder: EuroSAT (the paper's protocol) and the demo's synthetic land
cover.

The encoder is frozen and in eval mode, so its features are computed once and cached; the linear
head then
trains on the cached features with whole epochs compiled as one `lax.scan`, so the paper's 100
epochs take
seconds. Protocol (SeCo's `main_eurosat.py`, reused by CACo): 64x64 RGB scaled to [0, 1] without
mean/std,
Linear(d, 10), Adam lr 1e-3, batch 32 (last partial batch dropped), 100 epochs, lr x0.1 at epochs
60 and 80,
top-1 on SeCo's validation split.
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

from caco_jax.data.normalization import Normalization
from caco_jax.evaluators import common, metrics

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
    progress = tqdm.trange(settings.epochs, desc=description, leave=False)
    for epoch in progress:
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
        progress.set_postfix(loss=f"{float(loss):.4f}")
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
# EuroSAT.


def load_eurosat(config) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """(images uint8 [N, 64, 64, 3], labels [N], train indices, val indices, split description).

    Reads TFDS `eurosat/rgb` (one `train` split of 27,000 images, `filename` like `Forest_12.jpg`)
    and
    splits it with SeCo's `eurosat-train.txt` / `eurosat-val.txt` when `config.eval.split_dir`
    holds them.
    """
    builder = common.open_tfds(config.eval.data_dir, "eurosat", "rgb")
    source = builder.as_data_source("train")
    images = np.empty((len(source), 64, 64, 3), np.uint8)
    labels = np.empty((len(source),), np.int64)
    names = []
    for i in tqdm.trange(len(source), desc="eurosat", leave=False):
        example = source[i]
        if example["image"].shape != (64, 64, 3):
            raise ValueError(
                f"eurosat/rgb example {i}: image shape {example['image'].shape}, not (64, 64, 3)"
            )
        images[i] = example["image"]
        labels[i] = example["label"]
        names.append(os.path.splitext(common.read_text(example["filename"]))[0])
    train, val, description = _eurosat_split(config, names)
    return images, labels, train, val, description


def _eurosat_split(config, names: list[str]):
    split_dir = config.eval.split_dir
    files = (
        [os.path.join(split_dir, f"eurosat-{s}.txt") for s in ("train", "val")] if split_dir else []
    )
    if files and all(os.path.exists(f) for f in files):
        index = {name: i for i, name in enumerate(names)}
        splits = []
        for path in files:
            listed = [os.path.splitext(name)[0] for name in common.read_split_list(path)]
            missing = [name for name in listed if name not in index]
            if missing:
                raise ValueError(
                    f"{path}: {len(missing)} listed images are not in eurosat/rgb, "
                    f"e.g. {missing[:5]}"
                )
            splits.append(np.array(sorted(index[name] for name in listed), np.int64))
        return splits[0], splits[1], f"SeCo split files in {split_dir}"
    reason = (
        f"config.eval.split_dir={split_dir!r} lacks eurosat-train.txt/eurosat-val.txt"
        if split_dir
        else "config.eval.split_dir is not set"
    )
    # SeCo's split: 16,200 train and 5,400 val of 27,000 (60 % / 20 %); the rest is its unused test
    # set.
    train, rest = common.seeded_split(len(names), 0.6, config.eval.seed, reason)
    val = rest[: round(len(names) * 0.2)]
    return train, val, f"seeded split (seed {config.eval.seed})"


def eurosat_task(config, workdir: str) -> dict:
    """Task `eval_eurosat`: the paper's EuroSAT linear probe for every encoder row."""
    images, labels, train, val, split_description = load_eurosat(config)
    settings = HeadSettings.from_config(config.eval)
    rows = []
    for encoder in common.encoders(config, workdir):

        def load(indices, subset):
            return images[subset[indices]]

        if config.eval.update_bn_stats:
            common.refresh_batch_stats(
                encoder.model,
                lambda i: load(i, train),
                train.size,
                preprocess=common.as_unit_float,
                batch_size=settings.batch_size,
                seed=config.eval.seed,
            )
        features = {
            name: common.extract_features(
                encoder.model,
                lambda i, subset=subset: load(i, subset),
                subset.size,
                preprocess=common.as_unit_float,
                batch_size=config.eval.extract_batch_size,
                description=f"{encoder.name} {name}",
            )
            for name, subset in (("train", train), ("val", val))
        }
        result = probe_top1(
            (features["train"], labels[train]),
            (features["val"], labels[val]),
            num_classes=EUROSAT_CLASSES,
            settings=settings,
            seed=config.eval.seed,
            description=f"{encoder.name} probe",
        )
        rows.append({"encoder": encoder.name, "source": encoder.source, **result})
    extra = {
        "split": split_description,
        "train_examples": int(train.size),
        "val_examples": int(val.size),
        "settings": dataclasses.asdict(settings),
        "update_bn_stats": bool(config.eval.update_bn_stats),
    }
    return common.report(config, workdir, "eval_eurosat", rows, ("top1", "train_top1"), extra)


# --------------------------------------------------------------------------------------------------
# The demo: land cover of the synthetic archive's locations.


def load_synthetic_land_cover(config, workdir: str):
    """(images uint8 [M, 264, 264, 3], labels [M], location index [M]): the early-window
    acquisitions of every location of the prepared synthetic records, labelled with the
    location's dominant land cover (the synthetic ground truth describes the early window; changed
    locations may differ later)."""
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
    for i in tqdm.trange(len(source), desc="land cover", leave=False):
        arrays = records.location_arrays(source[i])
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
    in
    halves (seeded), so the demo shows whether pretraining beats a random encoder."""
    from caco_jax.data import synthetic

    images, labels, locations = load_synthetic_land_cover(config, workdir)
    num_locations = int(locations.max()) + 1
    # The synthetic archive has no fixed split: seeded halves of its locations.
    order = np.random.default_rng(config.eval.seed).permutation(num_locations)
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
            seed=config.eval.seed,
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
