"""DynamicEarthNet semantic segmentation: the CACo paper's segmentation table, whose code its
authors never released. Every choice the paper leaves open is listed in docs/dynamicearthnet.md.

The paper: 55 training and 10 evaluation locations of DynamicEarthNet (the official train and val
splits), one Planet image per labelled month, a U-Net whose encoder is the pretrained ResNet on a
single image (its stage maps used directly), Dice loss, the encoder frozen or fine-tuned, mIoU.

Here: the month's first-day image, red/green/blue, surface reflectance x 255 truncated to uint8 like
the CACo archive (`data.layout.to_archive_uint8`), then the encoder export's input normalisation
(`data.normalization`); native 3 m pixels. The encoder's skip maps feed SeCo's U-Net decoder
(`models.unet.UNetDecoder`, as for OSCD) with one logit per class. Six classes: snow and ice and
unlabelled pixels are ignored in the loss and the metric, as in DynamicEarthNet's own loader and
benchmark. Training: per epoch every training image once, a random `tile_size` crop of it with a
random flip and rot90, batch 32 (last partial batch dropped), multi-class soft Dice, Adam with L2
weight decay, lr x`lr_decay` per epoch (OSCD's optimiser); in fine-tuning mode the encoder trains
too, at `finetune_learning_rate`, its BatchNorm statistics fixed (as for BigEarthNet). Evaluation:
every validation image predicted whole, stitched from non-overlapping tiles; IoU per class from the
confusion matrix of all validation pixels, mIoU over the classes with a non-empty union
(DynamicEarthNet's `jaccard_index.py`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from caco_jax.data import layout
from caco_jax.data.normalization import Normalization
from caco_jax.evaluators import common, fit, metrics
from caco_jax.evaluators.datasets import dynamicearthnet as dynamicearthnet_builder
from caco_jax.evaluators.tiling import flip_rotate, random_crops, stitch, tile
from caco_jax.models import unet
from caco_jax.runtime import inference, progress
from caco_jax.runtime import mesh as mesh_lib

# The six classes evaluated (DynamicEarthNet's loader and benchmark: `num_classes=6`, the seventh,
# snow and ice, mapped to the ignore label), as short names for the table.
CLASS_NAMES = ("impervious", "agriculture", "forest", "wetlands", "soil", "water")
NUM_CLASSES = len(CLASS_NAMES)
IGNORE = 255  # target value of snow and ice and of unlabelled pixels
DICE_EPSILON = 1e-7


@dataclasses.dataclass(frozen=True)
class DynamicEarthNetSettings(fit.DecoderSettings):
    """`config.dynamicearthnet`: OSCD's decoder protocol on 256 px crops, frozen or fine-tuned."""

    SECTION = "dynamicearthnet"
    tile_size: int = 256
    finetune: bool = False  # also train the encoder
    finetune_learning_rate: float = 1e-5  # the encoder's learning rate when fine-tuning (SeCo's)

    def validate(self) -> None:
        super().validate()
        self.require(self.finetune_learning_rate > 0, "finetune_learning_rate", "must be > 0")


@dataclasses.dataclass
class Scenes:
    """One split in memory: the encoder-ready uint8 images and their targets."""

    names: list[str]  # "<cube> <YYYY-MM>"
    images: np.ndarray  # uint8 [N, H, W, 3] red, green, blue reflectance x 255
    targets: np.ndarray  # uint8 [N, H, W]: class 0-5, IGNORE

    @property
    def locations(self) -> list[str]:
        return sorted({name.split()[0] for name in self.names})


def targets_from_labels(label: np.ndarray) -> np.ndarray:
    """The builder's 7-class label map -> the 6 evaluated classes, snow and ice and unlabelled
    pixels -> IGNORE."""
    return np.where(label < NUM_CLASSES, label, IGNORE).astype(np.uint8)


def load_dynamicearthnet(shared: common.EvalSettings) -> dict[str, Scenes]:
    """{"train", "validation"} from TFDS `dynamic_earthnet/rgb`, built from `config.eval.manual_dir`
    first when it is not prepared yet."""
    data_dir = shared.records_dir()
    builder = common.prepared(
        dynamicearthnet_builder.DynamicEarthNet(
            config="rgb", data_dir=data_dir, file_format="array_record"
        ),
        shared,
        "the download (planet.*.zip, labels.zip, dynnet_training_splits/)",
    )
    scenes = {}
    for split in ("train", "validation"):
        source = builder.as_data_source(split)
        if len(source) == 0:
            raise ValueError(f"DynamicEarthNet: the {split} split under {data_dir} is empty")
        first = source[0]["label"].shape
        names = []
        images = np.empty((len(source), *first, 3), np.uint8)
        targets = np.empty((len(source), *first), np.uint8)
        for i in progress.trange(len(source), desc=f"DynamicEarthNet {split}", leave=False):
            example = source[i]
            names.append(
                f"{common.read_text(example['location'])} {common.read_text(example['month'])}"
            )
            if example["label"].shape != first:
                raise ValueError(
                    f"DynamicEarthNet {names[-1]}: {example['label'].shape} px, the other images "
                    f"of {split} are {first}"
                )
            images[i] = layout.to_archive_uint8(example["image"])
            targets[i] = targets_from_labels(example["label"])
        scenes[split] = Scenes(names, images, targets)
    return scenes


def check_rgb(encoder) -> Normalization:
    """The encoder row's input; Planet gives red, green and blue only, so the encoder must take
    (B4, B3, B2)."""
    if not encoder.input.is_rgb:
        raise ValueError(
            f"DynamicEarthNet: the encoder {encoder.source} takes bands {encoder.input.bands}; "
            f"Planet imagery has red, green, blue only, i.e. {layout.RGB_BANDS}"
        )
    return encoder.input


def soft_dice_loss(logits, targets, num_classes: int = NUM_CLASSES):
    """Multi-class soft Dice over the whole batch: per class c, over the pixels whose target is a
    class (IGNORE pixels count nowhere), D_c = 2 sum(p_c y_c) / (sum(p_c) + sum(y_c)) with p the
    softmax and y the one-hot target; loss = 1 - the mean of D_c over the classes present in the
    batch's targets (an absent class has no overlap to reward; predicting it still costs through
    the other classes' D). A batch with no valid pixel gives 1 and no gradient."""
    valid = (targets < num_classes)[..., None].astype(jnp.float32)
    probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) * valid
    one_hot = jax.nn.one_hot(targets, num_classes, dtype=jnp.float32) * valid
    axes = tuple(range(logits.ndim - 1))
    intersection = jnp.sum(probabilities * one_hot, axis=axes)
    support = jnp.sum(one_hot, axis=axes)
    dice = (
        2.0 * intersection / jnp.maximum(jnp.sum(probabilities, axis=axes) + support, DICE_EPSILON)
    )
    present = support > 0
    return 1.0 - jnp.sum(jnp.where(present, dice, 0.0)) / jnp.maximum(jnp.sum(present), 1)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What the compiled steps depend on besides arrays; hashable, so every encoder row of one
    architecture and input reuses one compilation."""

    encoder_graph: nnx.GraphDef
    train_graph: nnx.GraphDef  # the decoder in training mode (BatchNorm batch statistics, dropout)
    eval_graph: nnx.GraphDef
    normalization: Normalization
    learning_rates: tuple[
        tuple[str, float], ...
    ]  # ("decoder", lr) and, fine-tuning, ("encoder", lr)
    weight_decay: float
    lr_decay: float
    steps_per_epoch: int

    def optimizer(self) -> optax.GradientTransformation:
        """OSCD's optimiser for each trained part: torch's Adam with L2 weight decay added to the
        gradient, lr x lr_decay per epoch."""

        def adam(learning_rate):
            return fit.adam_with_l2(
                learning_rate,
                weight_decay=self.weight_decay,
                lr_decay=self.lr_decay,
                steps_per_epoch=self.steps_per_epoch,
            )

        parts = dict(self.learning_rates)
        return optax.multi_transform(
            {part: adam(rate) for part, rate in parts.items()}, {part: part for part in parts}
        )

    def skip_maps(self, encoder_params, encoder_stats, images):
        model = nnx.merge(self.encoder_graph, encoder_params, encoder_stats)
        return unet.skip_features(model, self.normalization(images, xp=jnp))


@functools.partial(jax.jit, static_argnums=0)
def _train_step(
    protocol: Protocol, trainable, frozen, batch_stats, opt_state, images, targets, key
):
    """One step on `trainable` = {"decoder": params} (+ "encoder" when fine-tuning); `frozen` =
    {"params", "stats"} of the encoder, whose statistics never change."""

    def loss_fn(trainable):
        # Frozen mode differentiates the decoder only: no gradient reaches the encoder.
        encoder_params = trainable.get("encoder", frozen["params"])
        skips = protocol.skip_maps(encoder_params, frozen["stats"], images)
        # Fresh Variables for the statistics: BatchNorm updates them inside this trace.
        decoder = nnx.merge(
            protocol.train_graph, trainable["decoder"], jax.tree.map(jnp.asarray, batch_stats)
        )
        logits = decoder(skips, rngs=nnx.Rngs(dropout=key))
        return soft_dice_loss(logits, targets), nnx.state(decoder, nnx.BatchStat)

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = protocol.optimizer().update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), batch_stats, opt_state, loss


@functools.partial(jax.jit, static_argnums=0)
def _predict(
    protocol: Protocol, encoder_params, encoder_stats, decoder_params, batch_stats, images
):
    """Class index [N, H, W] of each pixel."""
    skips = protocol.skip_maps(encoder_params, encoder_stats, images)
    logits = nnx.merge(protocol.eval_graph, decoder_params, batch_stats)(skips)
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)


def train_and_evaluate(
    encoder, normalization: Normalization, scenes, settings: DynamicEarthNetSettings, seed: int
) -> dict:
    """Trains a fresh decoder (and, in fine-tuning mode, the encoder) on the training images and
    reports the validation IoUs."""
    size = settings.tile_size
    mesh = mesh_lib.data_mesh()
    batch_size = inference.global_batch_size(settings.batch_size, mesh)
    train = scenes["train"]
    steps_per_epoch = train.images.shape[0] // batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"DynamicEarthNet: {train.images.shape[0]} training images, fewer than one batch of "
            f"{batch_size}"
        )

    model = encoder.model
    model.eval()  # BatchNorm keeps the pretrained statistics in both modes
    encoder_graph, encoder_params, encoder_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    decoder = unet.UNetDecoder(unet.skip_channels(model), NUM_CLASSES, rngs=nnx.Rngs(seed))
    decoder.train()
    train_graph, decoder_params, batch_stats = nnx.split(decoder, nnx.Param, nnx.BatchStat)
    decoder.eval()

    trainable = {"decoder": decoder_params}
    learning_rates = [("decoder", settings.learning_rate)]
    if settings.finetune:
        trainable["encoder"] = encoder_params
        learning_rates.append(("encoder", settings.finetune_learning_rate))
    protocol = Protocol(
        encoder_graph=encoder_graph,
        train_graph=train_graph,
        eval_graph=nnx.graphdef(decoder),
        normalization=normalization,
        learning_rates=tuple(learning_rates),
        weight_decay=settings.weight_decay,
        lr_decay=settings.lr_decay,
        steps_per_epoch=steps_per_epoch,
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec(mesh_lib.AXIS))
    trainable, frozen, batch_stats = jax.device_put(
        (trainable, {"params": encoder_params, "stats": encoder_stats}, batch_stats), replicated
    )
    opt_state = protocol.optimizer().init(trainable)

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    mode = "finetune" if settings.finetune else "frozen"
    epochs = progress.trange(settings.epochs, desc=f"{encoder.name} {mode}", leave=False)
    for epoch in epochs:
        order = rng.permutation(train.images.shape[0])[: steps_per_epoch * batch_size]
        for step, batch in enumerate(order.reshape(steps_per_epoch, batch_size)):
            crops = random_crops((train.images, train.targets), batch, size, rng)
            images, targets = jax.device_put(tuple(flip_rotate(crops, rng)), batch_sharding)
            step_key = jax.random.fold_in(key, epoch * steps_per_epoch + step)
            trainable, batch_stats, opt_state, loss = _train_step(
                protocol, trainable, frozen, batch_stats, opt_state, images, targets, step_key
            )
        epochs.set_postfix(loss=f"{float(loss):.4f}")

    validation = scenes["validation"]
    encoder_params = trainable.get("encoder", frozen["params"])
    grid = tile(validation.images[0], size)[1]
    tiles = np.concatenate([tile(image, size)[0] for image in validation.images])
    classes = []
    for start in progress.trange(0, tiles.shape[0], batch_size, desc="predict", leave=False):
        stop = min(start + batch_size, tiles.shape[0])
        batch = jax.device_put(inference.pad_batch(tiles[start:stop], batch_size), batch_sharding)
        predicted = _predict(
            protocol, encoder_params, frozen["stats"], trainable["decoder"], batch_stats, batch
        )
        classes.append(np.asarray(predicted)[: stop - start])
    per_image = np.concatenate(classes).reshape(len(validation.names), -1, size, size)
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for predicted, target in zip(per_image, validation.targets, strict=True):
        confusion += metrics.confusion_matrix(
            stitch(predicted, grid, target.shape), target, NUM_CLASSES
        )
    iou = metrics.intersection_over_union(confusion)
    return {
        "miou": iou["miou"],
        **{f"iou_{name}": value for name, value in zip(CLASS_NAMES, iou["iou"], strict=True)},
        "confusion": confusion.tolist(),
        "final_loss": float(loss),
    }


def run_task(settings, workdir) -> dict:
    """Task `eval_dynamicearthnet`: frozen (default) or fine-tuned segmentation for every encoder
    row; the metrics go to `<checkpoint>_eval_dynamicearthnet_<mode>.json`."""
    protocol, shared, seed = settings.dynamicearthnet, settings.eval, settings.seed
    encoders = common.encoders(shared, seed, workdir)
    inputs = common.check_inputs(encoders, check_rgb)  # before any work
    scenes = load_dynamicearthnet(shared)
    rows = []
    for encoder, normalization in zip(encoders, inputs, strict=True):
        result = train_and_evaluate(encoder, normalization, scenes, protocol, seed)
        rows.append(
            {
                "encoder": encoder.name,
                "source": encoder.source,
                **result,
                "input": normalization.to_json(),
            }
        )
    mode = "finetune" if protocol.finetune else "frozen"
    extra = {
        "mode": mode,
        "classes": list(CLASS_NAMES),
        "ignored": ["snow and ice", "unlabelled"],
        "planet_to_uint8": "surface reflectance x 255, clipped to [0, 255], truncated",
        **{
            f"{split}_{what}": value
            for split, data in scenes.items()
            for what, value in (("locations", data.locations), ("images", len(data.names)))
        },
        "tile_size": protocol.tile_size,
        "epochs": protocol.epochs,
        "batch_size": protocol.batch_size,
        "learning_rate": protocol.learning_rate,
        "finetune_learning_rate": protocol.finetune_learning_rate if protocol.finetune else None,
    }
    columns = ("miou", *(f"iou_{name}" for name in CLASS_NAMES))
    return common.report(shared, workdir, f"eval_dynamicearthnet_{mode}", rows, columns, extra)
