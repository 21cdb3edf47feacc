"""DynamicEarthNet semantic segmentation (task `eval_dynamicearthnet`): the CACo paper's
segmentation table, whose code its authors never released. Every choice the paper leaves open is
listed with its reason in docs/dynamicearthnet.md.

The paper: 55 training and 10 evaluation locations of DynamicEarthNet (the official train and val
splits), one Planet image per labelled month, a U-Net whose encoder is the pretrained ResNet on a
single image (its stage maps used directly), Dice loss, the encoder frozen or fine-tuned, mIoU.

Here, by default the protocol of the code the authors built on (SeCo's `segmentation.py`, copied
into CACo, trained as SeCo's `main_oscd.py` trains it): the month's first-day image, red, green,
blue, surface reflectance x 255 truncated to uint8 like the CACo archive
(`data.layout.to_archive_uint8`), then [0, 1] without mean/std (`dynamicearthnet.input="unit"`);
the encoder's BatchNorm in training mode while the decoder trains (`dynamicearthnet.encoder_bn=
"train"`: Lightning trains the whole model in training mode). The options `input="export"` (the
export's own input normalisation) and `encoder_bn="eval"` (the exported statistics kept) are the
protocol of caco_jax before. Native 3 m pixels. The encoder's skip maps feed SeCo's U-Net decoder
(`models.unet.UNetDecoder`, as for OSCD) with one logit per class. Six classes: snow and ice and
unlabelled pixels are ignored in the loss and the metric, as in DynamicEarthNet's own loader and
benchmark. Training (`fit`): per epoch every training image once, a random `tile_size` crop of it
with a random flip and rot90, batch 32 (last partial batch dropped), multi-class soft Dice, Adam
with L2 weight decay, lr x`lr_decay` per epoch (OSCD's optimiser); in fine-tuning mode the encoder
trains too, at `finetune_learning_rate`. Evaluation on the val split (or `split="test"`): every
image cut into non-overlapping tiles and predicted; IoU per class from the confusion matrix of all
its labelled pixels, mIoU over the classes with a non-empty union (DynamicEarthNet's
`jaccard_index.py`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from caco_jax.data import layout
from caco_jax.data.normalization import Normalization
from caco_jax.evaluators import common, fit, metrics, protocol
from caco_jax.evaluators.datasets import dynamicearthnet as dynamicearthnet_builder
from caco_jax.evaluators.tiling import TiledScenes, flip_rotate, random_crops, tile_scenes
from caco_jax.models import unet
from caco_jax.runtime import inference, progress
from caco_jax.runtime import mesh as mesh_lib

# The six classes evaluated (DynamicEarthNet's loader and benchmark: `num_classes=6`, the seventh,
# snow and ice, mapped to the ignore label), as short names for the table.
CLASS_NAMES = ("impervious", "agriculture", "forest", "wetlands", "soil", "water")
NUM_CLASSES = len(CLASS_NAMES)
IGNORE = 255  # target value of snow and ice and of unlabelled pixels
DICE_EPSILON = 1e-7
INPUTS = ("unit", "export")
SPLITS = {"val": "validation", "test": "test"}  # config value -> records split


@dataclasses.dataclass(frozen=True)
class DynamicEarthNetSettings(fit.DecoderSettings):
    """`config.dynamicearthnet`: OSCD's decoder protocol on 256 px crops, frozen or fine-tuned."""

    SECTION = "dynamicearthnet"
    tile_size: int = 256
    validate_every: int = 0  # no official loop: the last epoch only (see docs/dynamicearthnet.md)
    finetune: bool = False  # also train the encoder
    finetune_learning_rate: float = 1e-5  # the encoder's learning rate when fine-tuning (SeCo's)
    # The encoder's input: "unit" = reflectance in [0, 1] without mean/std (SeCo's segmentation
    # input); "export" = the export's own input normalisation.
    input: str = "unit"
    split: str = "val"  # where the mIoU is measured: "val" (the paper's) or "test"
    # The folder of train.txt, val.txt, test.txt; "" = dynnet_training_splits/ or split_info/ in
    # eval.manual_dir.
    split_dir: str = ""

    def validate(self) -> None:
        super().validate()
        self.require(self.finetune_learning_rate > 0, "finetune_learning_rate", "must be > 0")
        self.require(self.input in INPUTS, "input", f"one of {INPUTS}")
        self.require(self.split in SPLITS, "split", f"one of {tuple(SPLITS)}")


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


@dataclasses.dataclass
class DynamicEarthNetData:
    """The training images, and the evaluation split's images as tiles."""

    split: str  # the records' name of the evaluation split: "validation" or "test"
    train: Scenes
    evaluation: Scenes
    tiles: TiledScenes  # of `evaluation`, IGNORE beyond the images' borders


def load_dynamicearthnet(
    shared: common.EvalSettings, settings: DynamicEarthNetSettings
) -> DynamicEarthNetData:
    """The train split and the evaluation split from TFDS `dynamic_earthnet/rgb`, built from
    `config.eval.manual_dir` first when it is not prepared yet."""
    data_dir = shared.records_dir()
    builder = common.prepared(
        dynamicearthnet_builder.DynamicEarthNet(
            config="rgb",
            data_dir=data_dir,
            file_format="array_record",
            split_dir=settings.split_dir,
        ),
        shared,
        "the download (planet.*.zip, labels.zip, the validation/test labels and the split files)",
    )
    scenes = {}
    for split in ("train", SPLITS[settings.split]):
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
    evaluation = scenes[SPLITS[settings.split]]
    tiles = tile_scenes(
        [(image,) for image in evaluation.images], evaluation.targets, settings.tile_size, IGNORE
    )
    return DynamicEarthNetData(SPLITS[settings.split], scenes["train"], evaluation, tiles)


def check_rgb(encoder) -> Normalization:
    """The encoder row's input; Planet gives red, green and blue only, so the encoder must take
    (B4, B3, B2)."""
    if not encoder.input.is_rgb:
        raise ValueError(
            f"DynamicEarthNet: the encoder {encoder.source} takes bands {encoder.input.bands}; "
            f"Planet imagery has red, green, blue only, i.e. {layout.RGB_BANDS}"
        )
    return encoder.input


@functools.cache
def export_input(norm: Normalization):
    """The export's own input normalisation of the uint8 images (`dynamicearthnet.input=export`)."""
    return lambda images: norm(images, jnp)


def encoder_input(norm: Normalization, input_kind: str):
    """What the encoder sees of the uint8 reflectance images."""
    return common.as_unit_float if input_kind == "unit" else export_input(norm)


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


def segment_forward(encoder, decoder, images, rngs):
    """Class logits of one image: the decoder on the encoder's skip maps."""
    return decoder(unet.skip_features(encoder, images[0]), rngs=rngs)


def predicted_classes(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)


def train_and_evaluate(
    encoder, data: DynamicEarthNetData, settings: DynamicEarthNetSettings, seed: int
) -> dict:
    """Trains a fresh decoder (and, in fine-tuning mode, the encoder) on the training images and
    reports the IoUs of the evaluation split."""
    batch_size = inference.global_batch_size(settings.batch_size, mesh_lib.data_mesh())
    train, tiles = data.train, data.tiles
    steps = fit.steps_per_epoch(len(train.images), batch_size, "DynamicEarthNet")
    learning_rates = [("head", settings.learning_rate)]
    if settings.finetune:
        learning_rates.append(("encoder", settings.finetune_learning_rate))
    decoder = unet.UNetDecoder(unet.skip_channels(encoder.model), NUM_CLASSES, rngs=nnx.Rngs(seed))
    segment_fit, state = fit.start(
        encoder.model,
        decoder,
        encoder_bn=settings.encoder_bn,
        preprocess=encoder_input(check_rgb(encoder), settings.input),
        forward=segment_forward,
        loss=soft_dice_loss,
        output=predicted_classes,
        optimizer=fit.Optimizer(
            tuple(learning_rates),
            steps,
            weight_decay=settings.weight_decay,
            lr_decay=settings.lr_decay,
        ),
    )

    def batches(epoch, rng):
        for batch in fit.shuffled_batches(len(train.images), batch_size, rng):
            crops = random_crops((train.images, train.targets), batch, settings.tile_size, rng)
            images, targets = flip_rotate(crops, rng)
            yield (images,), targets

    history, confusions = [], {}

    def validate(epoch, state):
        if not protocol.is_validation_epoch(epoch, settings.validate_every, settings.epochs):
            return
        classes = fit.predict(segment_fit, state, tiles.load, len(tiles), batch_size=batch_size)
        confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
        for start in range(0, len(tiles), batch_size):
            chunk = slice(start, start + batch_size)
            confusion += metrics.confusion_matrix(classes[chunk], tiles.targets[chunk], NUM_CLASSES)
        iou = metrics.intersection_over_union(confusion)
        history.append(
            {
                "epoch": epoch,
                "miou": iou["miou"],
                **{f"iou_{n}": v for n, v in zip(CLASS_NAMES, iou["iou"], strict=True)},
            }
        )
        confusions["last"] = confusion

    mode = "finetune" if settings.finetune else "frozen"
    _, loss = fit.train(
        segment_fit,
        state,
        batches,
        epochs=settings.epochs,
        seed=seed,
        after_epoch=validate,
        description=f"{encoder.name} {mode}",
    )
    return {
        **protocol.best_and_last(history, "miou"),
        "confusion": confusions["last"].tolist(),
        "final_loss": loss,
    }


class DynamicEarthNetEvaluation(protocol.Evaluation):
    """DynamicEarthNet segmentation for every encoder row (`protocol.run`)."""

    columns = ("miou", "best_miou", "best_epoch", *(f"iou_{name}" for name in CLASS_NAMES))

    @property
    def task(self) -> str:
        """`eval_dynamicearthnet_<frozen|finetune>`, `_test` added on the test split."""
        settings = self.settings.dynamicearthnet
        mode = "finetune" if settings.finetune else "frozen"
        return f"eval_dynamicearthnet_{mode}" + ("_test" if settings.split == "test" else "")

    def dataset_key(self, encoder) -> str:
        check_rgb(encoder)
        return "rgb"

    def load(self, key: str) -> DynamicEarthNetData:
        return load_dynamicearthnet(self.settings.eval, self.settings.dynamicearthnet)

    def evaluate(self, encoder, data: DynamicEarthNetData) -> dict:
        settings = self.settings.dynamicearthnet
        result = train_and_evaluate(encoder, data, settings, self.settings.seed)
        return {**result, "input": encoder.input.to_json(), "encoder_input": settings.input}

    def describe(self, data: DynamicEarthNetData) -> dict:
        settings = self.settings.dynamicearthnet
        return {
            "mode": "finetune" if settings.finetune else "frozen",
            "split": settings.split,
            "classes": list(CLASS_NAMES),
            "ignored": ["snow and ice", "unlabelled"],
            "planet_to_uint8": "surface reflectance x 255, clipped to [0, 255], truncated",
            **{
                f"{split}_{what}": value
                for split, scenes in (("train", data.train), (data.split, data.evaluation))
                for what, value in (("locations", scenes.locations), ("images", len(scenes.names)))
            },
            "settings": settings.to_dict(),
        }


def run_task(settings, workdir) -> dict:
    """Task `eval_dynamicearthnet`: frozen (default) or fine-tuned segmentation for every encoder
    row; the metrics go to `<checkpoint>_eval_dynamicearthnet_<mode>.json`."""
    return protocol.run(DynamicEarthNetEvaluation(settings), workdir)
