"""OSCD change detection (task `eval_oscd`): SeCo's `main_oscd.py` with
`datasets/oscd_datamodule.py`, reused by CACo.

The encoder embeds both dates; |f(x1) - f(x2)| at five depths feeds the U-Net decoder of
`models.unet`. The encoder is not trained, but by default its BatchNorm runs in training mode while
the decoder trains, as in SeCo's code (`config.oscd.encoder_bn`). Training: the 14 train cities
cut into 96x96 tiles (zero-padded at the borders, as PIL's crop did), random horizontal flip and
rot90 applied alike to both images and the mask, batch 32 (last partial batch dropped), BCE on
logits, Adam lr 1e-3 with L2 weight decay 1e-4 (torch's Adam), lr x0.95 per epoch, 100 epochs.

Evaluation, after every epoch as Lightning validated (`config.oscd.validate_every`): the 10 test
cities cut into the same tiles, predicted with the eval-mode encoder and decoder, thresholded at
0.5. The reported F1 is the official one: the tiles shuffled (seeded by the run's seed and the
epoch), cut into batches of 32, the last partial batch dropped, precision / recall / F1 of the
"changed" class per batch (0 where undefined, Lightning 1.1's F1), averaged over the batches. The
pooled precision / recall / F1 of all test pixels (padding excluded) stand beside it; the last
epoch's and the best epoch's values are both reported. Input (RGB encoders): SeCo's per-band
quantile stretch of the raw L1C values to uint8, then [0, 1], no mean/std; other encoders see
their bands as `oscd_input` says.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from caco_jax.data import layout
from caco_jax.data.normalization import Normalization
from caco_jax.evaluators import common, fit, metrics, protocol
from caco_jax.evaluators.datasets import oscd as oscd_builder
from caco_jax.evaluators.tiling import TiledScenes, flip_rotate, tile, tile_scenes
from caco_jax.models import unet
from caco_jax.runtime import inference
from caco_jax.runtime import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class OscdSettings(fit.DecoderSettings):
    """`config.oscd`: SeCo's main_oscd.py (96 px tiles, validation after every epoch)."""

    SECTION = "oscd"
    tile_size: int = 96


# SeCo's OSCD stretch of the raw Sentinel-2 L1C values (datasets/oscd_dataset.py QUANTILES).
RGB_QUANTILES = {"B04": (426.0, 3698.0), "B03": (667.0, 2969.0), "B02": (885.0, 2620.0)}
THRESHOLD = 0.5  # of the change probability (Lightning's metrics' threshold)


def seco_rgb_stretch() -> Normalization:
    """SeCo's OSCD input: each of (B04, B03, B02) mapped linearly from its (low, high) quantiles to
    uint8, clipped and truncated, then [0, 1] (ToTensor), no standardisation."""
    return Normalization(
        bands=layout.RGB_BANDS,
        low=tuple(RGB_QUANTILES[b][0] for b in oscd_builder.RGB_BANDS),
        high=tuple(RGB_QUANTILES[b][1] for b in oscd_builder.RGB_BANDS),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )


def oscd_config_name(norm: Normalization) -> str:
    return "rgb" if norm.is_rgb else "all_bands"


@functools.cache
def oscd_input(norm: Normalization, config_name: str):
    """The encoder's input from OSCD's uint16 L1C values. RGB encoders: SeCo's quantile stretch
    (the paper's protocol). Others (no official recipe): the encoder's bands by name, brought to
    the archive's scale, then the export's normalisation."""
    stored = oscd_builder.RGB_BANDS if config_name == "rgb" else oscd_builder.ALL_BANDS
    channels = np.asarray(layout.channel_indices("OSCD", stored, norm.bands))
    if config_name == "rgb":
        stretch = seco_rgb_stretch()
        return lambda images: stretch.stretch(images[..., channels], jnp)
    return lambda images: norm(layout.to_archive_uint8(images[..., channels], jnp), jnp)


@dataclasses.dataclass
class OscdData:
    """The train cities as training tiles and the test cities as `TiledScenes`."""

    config_name: str
    train_cities: list[str]
    test_cities: list[str]
    train: tuple[np.ndarray, np.ndarray, np.ndarray]  # images_1, images_2, masks: [T, s, s, ...]
    test: TiledScenes


def load_oscd(shared: common.EvalSettings, config_name: str, tile_size: int) -> OscdData:
    """The records of `datasets.oscd` (built from `config.eval.manual_dir` the first time) cut into
    `tile_size` tiles."""
    builder = common.prepared(
        oscd_builder.Oscd(
            config=config_name, data_dir=shared.records_dir(), file_format="array_record"
        ),
        shared,
        "the three Onera archives (Images, Train Labels, Test Labels)",
    )
    cities = {}
    for split in ("train", "test"):
        source = builder.as_data_source(split)
        cities[split] = [source[i] for i in range(len(source))]
    train = tuple(
        np.concatenate([tile(city[part], tile_size)[0] for city in cities["train"]])
        for part in ("image1", "image2", "mask")
    )
    test = tile_scenes(
        [(city["image1"], city["image2"]) for city in cities["test"]],
        [city["mask"] for city in cities["test"]],
        tile_size,
    )
    names = {split: [common.read_text(c["city"]) for c in cities[split]] for split in cities}
    return OscdData(config_name, names["train"], names["test"], train, test)


def binary_cross_entropy(logits, targets):
    """torch's BCEWithLogitsLoss: the mean over pixels."""
    return optax.sigmoid_binary_cross_entropy(logits, targets.astype(logits.dtype)).mean()


def change_forward(encoder, decoder, images, rngs):
    """The change logits of a pair: the decoder on |f(x1) - f(x2)| (no gradient into the
    encoder)."""
    return decoder(unet.feature_differences(encoder, *images), rngs=rngs)


def test_scores(
    probabilities: np.ndarray, test: TiledScenes, batch_size: int, order: np.ndarray
) -> dict:
    """The official per-batch scores (whole tiles, padding included, as SeCo's loader fed them;
    batches of `batch_size` tiles in `order`, the last partial one dropped) and the pooled scores
    of every test pixel inside its city."""
    predicted = probabilities >= THRESHOLD
    official = metrics.batch_mean(
        metrics.binary_scores, (predicted, test.targets), batch_size, order=order
    )
    pooled = metrics.binary_scores(predicted[test.inside], test.targets[test.inside])
    return {**official, **{f"pooled_{name}": value for name, value in pooled.items()}}


def train_and_evaluate(encoder, data: OscdData, settings: OscdSettings, seed: int) -> dict:
    """Trains a fresh decoder on the frozen `encoder`, validating on the test tiles as the official
    loop did; returns the row's metrics."""
    preprocess = oscd_input(encoder.input, data.config_name)
    batch_size = inference.global_batch_size(settings.batch_size, mesh_lib.data_mesh())
    images_1, images_2, masks = data.train
    steps = fit.steps_per_epoch(len(images_1), batch_size, "OSCD")
    decoder = unet.ChangeDecoder(unet.skip_channels(encoder.model), rngs=nnx.Rngs(seed))
    change_fit, state = fit.start(
        encoder.model,
        decoder,
        encoder_bn=settings.encoder_bn,
        preprocess=preprocess,
        forward=change_forward,
        loss=binary_cross_entropy,
        output=jax.nn.sigmoid,
        optimizer=fit.Optimizer(
            (("head", settings.learning_rate),),
            steps,
            weight_decay=settings.weight_decay,
            lr_decay=settings.lr_decay,
        ),
    )

    def batches(epoch, rng):
        for batch in fit.shuffled_batches(len(images_1), batch_size, rng):
            x1, x2, y = flip_rotate((images_1[batch], images_2[batch], masks[batch]), rng)
            yield (x1, x2), y

    history, last = [], {}

    def validate(epoch, state):
        if not protocol.is_validation_epoch(epoch, settings.validate_every, settings.epochs):
            return
        probabilities = fit.predict(
            change_fit, state, data.test.load, len(data.test), batch_size=settings.batch_size
        )
        # The official validation loader reshuffles the tiles every epoch (shuffle=True).
        order = np.random.default_rng((seed, epoch)).permutation(len(data.test))
        history.append(
            {"epoch": epoch, **test_scores(probabilities, data.test, settings.batch_size, order)}
        )
        last["probabilities"] = probabilities

    _, loss = fit.train(
        change_fit,
        state,
        batches,
        epochs=settings.epochs,
        seed=seed,
        after_epoch=validate,
        description=f"{encoder.name} OSCD",
    )
    predicted = last["probabilities"] >= THRESHOLD
    per_city = {}
    for index, city in enumerate(data.test_cities):
        pixels = (data.test.scene == index)[:, None, None] & data.test.inside
        per_city[city] = metrics.binary_scores(predicted[pixels], data.test.targets[pixels])["f1"]
    return {
        **protocol.best_and_last(history, "f1"),
        "pooled_per_city_f1": per_city,
        "final_loss": loss,
    }


class OscdEvaluation(protocol.Evaluation):
    """OSCD under SeCo's protocol for every encoder row (`protocol.run`)."""

    task = "eval_oscd"
    columns = ("f1", "precision", "recall", "pooled_f1", "best_f1", "best_epoch")

    def dataset_key(self, encoder) -> str:
        config_name = oscd_config_name(encoder.input)
        oscd_input(encoder.input, config_name)  # the encoder's bands are in the dataset
        return config_name

    def load(self, key: str) -> OscdData:
        return load_oscd(self.settings.eval, key, self.settings.oscd.tile_size)

    def evaluate(self, encoder, data: OscdData) -> dict:
        result = train_and_evaluate(encoder, data, self.settings.oscd, self.settings.seed)
        return {"dataset": f"oscd/{data.config_name}", "bands": list(encoder.input.bands), **result}

    def describe(self, data: OscdData) -> dict:
        oscd = self.settings.oscd
        return {
            "metric": (
                "f1, precision, recall: per batch of "
                f"{oscd.batch_size} shuffled {oscd.tile_size} px test tiles (last partial batch "
                "dropped, 0 where undefined), averaged over the batches (SeCo's main_oscd.py); "
                "pooled_*: over every test pixel"
            ),
            "train_cities": data.train_cities,
            "test_cities": data.test_cities,
            "train_tiles": len(data.train[0]),
            "test_tiles": len(data.test),
            "settings": oscd.to_dict(),
        }


def run_task(settings, workdir) -> dict:
    """Task `eval_oscd`: change detection on OSCD for every encoder row."""
    return protocol.run(OscdEvaluation(settings), workdir)
