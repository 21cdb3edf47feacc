"""Linear heads on a frozen encoder, trained the way SeCo's and CACo's probes train them: the
engine of the EuroSAT, BigEarthNet and land-cover evaluations.

The protocol (`HeadSettings`, SeCo's `main_eurosat.py`): Linear(d, classes), optionally after
Dropout, Adam lr 1e-3, batch 32 (last partial batch dropped), 100 epochs, lr x0.1 at epochs 60 and
80. Two ways to train it:

- on cached features (`train_linear_head`): the encoder in eval mode, its features computed once;
  whole epochs compiled as one `lax.scan`, so 100 epochs take seconds.
- with the encoder in training mode (`train_head_with_encoder_in_train_mode`): as Lightning ran the
  official EuroSAT probe, the "frozen" encoder normalises each batch with its own BatchNorm
  statistics while the head trains, its running statistics drifting to the training images. Every
  epoch runs the encoder.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from caco_jax.evaluators import metrics
from caco_jax.runtime import progress
from caco_jax.settings import Section


@dataclasses.dataclass(frozen=True)
class HeadSettings(Section):
    """How a linear head trains; the defaults are SeCo's linear protocol (EuroSAT's). The
    evaluations' sections (`config.eurosat`, `config.bigearthnet`, `config.land_cover`) extend
    it."""

    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3  # Adam
    milestones: tuple[int, ...] = (60, 80)  # epochs at which the learning rate is x0.1
    dropout: float = 0.0  # on the features, before the linear layer (BigEarthNet: 0.2)
    validate_every: int = 0  # epochs between evaluations (the last always); 0 = the last only

    def validate(self) -> None:
        self.require(self.epochs >= 1, "epochs", "must be >= 1")
        self.require(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.require(self.learning_rate > 0, "learning_rate", "must be > 0")
        self.require(
            all(0 < m < self.epochs for m in self.milestones)
            and list(self.milestones) == sorted(set(self.milestones)),
            "milestones",
            f"must be increasing epochs in (0, epochs={self.epochs})",
        )
        self.require(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")
        self.require(self.validate_every >= 0, "validate_every", "must be >= 0 (0 = the last only)")


def softmax_cross_entropy(logits, labels):
    """torch's CrossEntropyLoss: the mean over the batch of -log softmax at the label."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def multilabel_soft_margin(logits, targets):
    """torch's MultiLabelSoftMarginLoss: per-class binary cross-entropy on logits, averaged over
    classes and batch."""
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
    after_epoch: Callable[[int, dict], None] | None = None,
) -> dict:
    """Trains Dropout(p) + Linear(d, num_outputs) with Adam on cached features; returns params.
    `after_epoch(epoch, params)` is called after each epoch (counted from 1)."""
    count = features.shape[0]
    steps_per_epoch = count // settings.batch_size
    settings.require(
        steps_per_epoch > 0,
        "batch_size",
        f"{settings.batch_size} is more than the {count} training examples of the {description}",
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
        if after_epoch is not None:
            after_epoch(epoch + 1, params)
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
    after_epoch: Callable[[int, dict], None] | None = None,
) -> dict:
    """CACo's `main_eurosat.py` as Lightning ran it: the "frozen" encoder stays in training mode,
    so the head trains on features normalised with each batch's own BatchNorm statistics while the
    running statistics drift to the training images (torch's momentum 0.1). Leaves `model` in eval
    mode with the drifted statistics (what the official validation used); returns the head.
    `after_epoch(epoch, head)` is called after each epoch (counted from 1) with `model` in eval
    mode holding that epoch's statistics, as Lightning validated."""
    count = images.shape[0]
    steps_per_epoch = count // settings.batch_size
    settings.require(
        steps_per_epoch > 0,
        "batch_size",
        f"{settings.batch_size} is more than the {count} training examples of the {description}",
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
        if after_epoch is not None:
            nnx.update(model, batch_stats)
            model.eval()
            after_epoch(epoch + 1, head)
    nnx.update(model, batch_stats)
    model.eval()
    return jax.device_get(head)
