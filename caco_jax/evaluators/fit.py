"""The fitting loop of the evaluations that train a head through the encoder: BigEarthNet
fine-tuning, OSCD change detection and DynamicEarthNet segmentation, as SeCo's Lightning loops
ran them.

A `Fit` says everything the compiled steps depend on besides arrays: the encoder's and the head's
graphs in training and in eval mode, the input recipe, how a batch goes through encoder and head,
the loss and the optimiser. It is hashable and is the static argument of `train_step` and
`predict_step`, so every encoder row of one architecture and protocol reuses one compilation. The
encoder's BatchNorm runs in training mode while the head trains when the protocol says so
(`encoder_bn="train"`: SeCo's OSCD and segmentation code only leave the encoder out of the
optimiser, and Lightning puts the whole model in training mode), and the encoder is trained only
when the optimiser has a learning rate for it.

`train` runs the epochs over host batches on every device (the batch split over the 1-D mesh, the
state replicated) and calls back after each epoch; `predict` runs the eval-mode graphs over any
number of examples (tiles of whole scenes, `tiling.TiledScenes`, or images), padded to full
batches so that one shape compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from caco_jax.runtime import inference, progress
from caco_jax.runtime import mesh as mesh_lib
from caco_jax.settings import Section

ENCODER_BN = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class DecoderSettings(Section):
    """How a U-Net decoder trains on the encoder's maps: SeCo's OSCD protocol (`main_oscd.py`:
    Adam with L2 weight decay, lr x `lr_decay` per epoch, batch 32, 100 epochs, validation after
    every epoch). `config.oscd` and `config.dynamicearthnet` extend it."""

    epochs: int = 100
    batch_size: int = (
        32  # training batches, and the evaluation batches the official metric averages
    )
    learning_rate: float = 1e-3  # Adam
    weight_decay: float = 1e-4  # L2 term of torch's Adam
    lr_decay: float = 0.95  # learning rate x this per epoch
    tile_size: int = 96  # training tiles and prediction tiles, px
    # The encoder's BatchNorm while the decoder trains: "train" (SeCo's code: the encoder is only
    # left out of the optimiser, and Lightning trains in training mode) or "eval" (statistics kept).
    encoder_bn: str = "train"
    validate_every: int = 1  # epochs between evaluations (the last always); 0 = the last only

    def validate(self) -> None:
        self.require(self.epochs >= 1, "epochs", "must be >= 1")
        self.require(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.require(self.learning_rate > 0, "learning_rate", "must be > 0")
        self.require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self.require(0.0 < self.lr_decay <= 1.0, "lr_decay", "in (0, 1]")
        self.require(
            self.tile_size >= 32 and self.tile_size % 32 == 0,
            "tile_size",
            "must be a multiple of 32 (the decoder undoes the encoder's 5 halvings)",
        )
        self.require(self.encoder_bn in ENCODER_BN, "encoder_bn", f"one of {ENCODER_BN}")
        self.require(self.validate_every >= 0, "validate_every", "must be >= 0 (0 = the last only)")


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """torch's Adam for each trained part ("encoder", "head") at its learning rate: with
    `weight_decay` the L2 term added to the gradient before the moments (torch's
    Adam(weight_decay=...)); the learning rate x `lr_decay` per epoch (ExponentialLR) and x0.1 at
    each of `milestones` (MultiStepLR), both stepped once per epoch."""

    learning_rates: tuple[tuple[str, float], ...]
    steps_per_epoch: int
    weight_decay: float = 0.0
    lr_decay: float = 1.0
    milestones: tuple[int, ...] = ()

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(part for part, _ in self.learning_rates)

    def schedule(self, learning_rate: float) -> optax.Schedule:
        milestones = jnp.asarray(self.milestones, jnp.int32)

        def rate(step):
            epoch = step // self.steps_per_epoch
            return learning_rate * self.lr_decay**epoch * 0.1 ** jnp.sum(epoch >= milestones)

        return rate

    def build(self) -> optax.GradientTransformation:
        def adam(learning_rate):
            return optax.chain(
                optax.add_decayed_weights(self.weight_decay),
                optax.scale_by_adam(),
                optax.scale_by_learning_rate(self.schedule(learning_rate)),
            )

        rates = dict(self.learning_rates)
        return optax.multi_transform(
            {part: adam(rate) for part, rate in rates.items()}, {part: part for part in rates}
        )


@dataclasses.dataclass(frozen=True)
class Fit:
    """What the compiled steps depend on besides arrays (hashable: see the module docstring)."""

    encoder_graph: nnx.GraphDef  # the encoder while the head trains (BatchNorm train or eval)
    encoder_eval_graph: nnx.GraphDef
    head_graph: nnx.GraphDef  # the head in training mode (BatchNorm batch statistics, dropout)
    head_eval_graph: nnx.GraphDef
    preprocess: Callable  # raw images -> the encoder's input, on the device
    forward: Callable  # forward(encoder, head, images: list, rngs) -> logits
    loss: Callable  # loss(logits, targets) -> scalar
    output: Callable  # logits -> what `predict` returns (probabilities, classes)
    optimizer: Optimizer


def start(
    encoder,
    head,
    *,
    encoder_bn: str,
    preprocess: Callable,
    forward: Callable,
    loss: Callable,
    output: Callable,
    optimizer: Optimizer,
) -> tuple[Fit, dict]:
    """The `Fit` of `encoder` (a ResNet) and `head` (an nnx module), and the state it starts from:
    {"params", "stats"} of both parts and the optimiser state of the trained parts."""
    head.train()
    head_graph, head_params, head_stats = nnx.split(head, nnx.Param, nnx.BatchStat)
    head.eval()
    if encoder_bn == "train":
        encoder.train()
    encoder_graph, encoder_params, encoder_stats = nnx.split(encoder, nnx.Param, nnx.BatchStat)
    encoder.eval()
    fit = Fit(
        encoder_graph=encoder_graph,
        encoder_eval_graph=nnx.graphdef(encoder),
        head_graph=head_graph,
        head_eval_graph=nnx.graphdef(head),
        preprocess=preprocess,
        forward=forward,
        loss=loss,
        output=output,
        optimizer=optimizer,
    )
    params = {"encoder": encoder_params, "head": head_params}
    state = {
        "params": params,
        "stats": {"encoder": encoder_stats, "head": head_stats},
        "opt": optimizer.build().init({part: params[part] for part in optimizer.parts}),
    }
    return fit, state


@functools.partial(jax.jit, static_argnums=0)
def train_step(fit: Fit, state: dict, images: tuple, targets, key):
    """One optimiser step on the trained parts; the BatchNorm statistics of both parts move as
    their graphs' modes say. Returns (state, loss)."""
    trained = {part: state["params"][part] for part in fit.optimizer.parts}

    def loss_fn(trained):
        params = {**state["params"], **trained}
        # Fresh Variables for the statistics: BatchNorm updates them inside this trace.
        encoder = nnx.merge(
            fit.encoder_graph,
            params["encoder"],
            jax.tree.map(jnp.asarray, state["stats"]["encoder"]),
        )
        head = nnx.merge(
            fit.head_graph, params["head"], jax.tree.map(jnp.asarray, state["stats"]["head"])
        )
        logits = fit.forward(
            encoder, head, [fit.preprocess(x) for x in images], nnx.Rngs(dropout=key)
        )
        stats = {
            "encoder": nnx.state(encoder, nnx.BatchStat),
            "head": nnx.state(head, nnx.BatchStat),
        }
        return fit.loss(logits, targets), stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    updates, opt_state = fit.optimizer.build().update(grads, state["opt"], trained)
    params = {**state["params"], **optax.apply_updates(trained, updates)}
    return {"params": params, "stats": stats, "opt": opt_state}, loss


@functools.partial(jax.jit, static_argnums=0)
def predict_step(fit: Fit, state: dict, images: tuple):
    """`fit.output` of the eval-mode encoder and head on one batch."""
    encoder = nnx.merge(
        fit.encoder_eval_graph, state["params"]["encoder"], state["stats"]["encoder"]
    )
    head = nnx.merge(fit.head_eval_graph, state["params"]["head"], state["stats"]["head"])
    return fit.output(fit.forward(encoder, head, [fit.preprocess(x) for x in images], None))


def train(
    fit: Fit,
    state: dict,
    batches: Callable[[int, np.random.Generator], Iterable[tuple[tuple, np.ndarray]]],
    *,
    epochs: int,
    seed: int,
    after_epoch: Callable[[int, dict], None] | None = None,
    description: str = "fit",
) -> tuple[dict, float]:
    """`epochs` epochs of `train_step` over `batches(epoch, rng)` (host arrays: a tuple of image
    arrays and the targets, each a global batch), replicated state, batches split over the
    devices; `after_epoch(epoch, state)` after each (epochs counted from 1). Returns the final
    state and the last step's loss."""
    mesh = mesh_lib.data_mesh()
    rows = NamedSharding(mesh, PartitionSpec(mesh_lib.AXIS))
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    step = 0
    loss = float("nan")
    bar = progress.trange(epochs, desc=description, leave=False)
    for epoch in bar:
        for images, targets in batches(epoch, rng):
            images, targets = jax.device_put((tuple(images), targets), rows)
            state, loss = train_step(fit, state, images, targets, jax.random.fold_in(key, step))
            step += 1
        loss = float(loss)
        bar.set_postfix(loss=f"{loss:.4f}")
        if after_epoch is not None:
            after_epoch(epoch + 1, state)
    return state, loss


def predict(
    fit: Fit,
    state: dict,
    load: Callable[[np.ndarray], tuple],
    count: int,
    *,
    batch_size: int,
    description: str = "predict",
) -> np.ndarray:
    """`predict_step` over examples 0..count-1, `load(indices)` giving their host image arrays (a
    tuple), in batches of `batch_size` rounded up to the devices, the last one padded."""
    mesh = mesh_lib.data_mesh()
    rows = NamedSharding(mesh, PartitionSpec(mesh_lib.AXIS))
    size = inference.global_batch_size(batch_size, mesh)
    outputs = []
    for start in progress.trange(0, count, size, desc=description, leave=False):
        indices = np.arange(start, min(start + size, count))
        images = tuple(inference.pad_batch(x, size) for x in load(indices))
        batch = predict_step(fit, state, jax.device_put(images, rows))
        outputs.append(np.asarray(batch)[: indices.size])
    return np.concatenate(outputs)


def steps_per_epoch(count: int, batch_size: int, what: str) -> int:
    """Full batches per epoch (the last partial one dropped, as the official loaders did); none is
    an error naming `what`."""
    steps = count // batch_size
    if steps == 0:
        raise ValueError(f"{what}: {count} training examples, fewer than one batch of {batch_size}")
    return steps


def shuffled_batches(count: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """[steps, batch_size] indices: a permutation of `count` cut into full batches."""
    steps = count // batch_size
    return rng.permutation(count)[: steps * batch_size].reshape(steps, batch_size)
