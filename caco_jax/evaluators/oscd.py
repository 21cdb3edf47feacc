"""OSCD change detection (SeCo's `main_oscd.py` protocol, reused by CACo).

The encoder embeds both dates; |f(x1) - f(x2)| at five depths feeds the U-Net decoder of
`models.unet`. The encoder is not trained, but by default its BatchNorm runs in training mode while
the decoder trains, as in SeCo's code (`config.oscd.encoder_bn`). Training: the 14 train cities cut
into 96x96 tiles (zero-padded at the borders, as PIL's crop did), random horizontal flip and rot90
applied alike to both images and the mask, batch 32 (last partial batch dropped), BCE on logits,
Adam lr 1e-3 with L2 weight decay 1e-4 (torch's Adam), lr x0.95 per epoch, 100 epochs. Evaluation:
each of the 10 test cities predicted whole, stitched from its tiles, thresholded at 0.5; precision /
recall / F1 of the "changed" class from the pixel counts of all test cities together. Input (RGB
encoders): SeCo's per-band quantile stretch of the raw L1C values to uint8, then [0, 1], no
mean/std; other encoders see their bands as `oscd_input` says.
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
from caco_jax.evaluators.datasets import oscd as oscd_builder
from caco_jax.evaluators.tiling import flip_rotate, stitch, tile
from caco_jax.models import unet
from caco_jax.runtime import inference, progress
from caco_jax.runtime import mesh as mesh_lib

ENCODER_BN = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class OscdSettings(fit.DecoderSettings):
    """`config.oscd`: SeCo's main_oscd.py (96 px tiles), and the encoder's BatchNorm mode."""

    SECTION = "oscd"
    tile_size: int = 96
    # The encoder's BatchNorm while the decoder trains: "train" (SeCo's main_oscd.py: its encoder
    # is only left out of the optimiser) or "eval" (statistics frozen).
    encoder_bn: str = "train"

    def validate(self) -> None:
        super().validate()
        self.require(self.encoder_bn in ENCODER_BN, "encoder_bn", f"one of {ENCODER_BN}")


# SeCo's OSCD stretch of the raw Sentinel-2 L1C values (datasets/oscd_dataset.py QUANTILES).
RGB_QUANTILES = {"B04": (426.0, 3698.0), "B03": (667.0, 2969.0), "B02": (885.0, 2620.0)}


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


def load_oscd(shared: common.EvalSettings, config_name: str):
    """{split: list of (city, image1, image2, mask)}, images uint16 as downloaded, from the records
    of `datasets.oscd`, built from `config.eval.manual_dir` the first time."""
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
        cities[split] = [
            (
                common.read_text(source[i]["city"]),
                source[i]["image1"],
                source[i]["image2"],
                source[i]["mask"],
            )
            for i in range(len(source))
        ]
    return cities


def training_tiles(cities, size: int):
    """Every tile of every training city: (images_1, images_2, masks)."""
    parts = [[], [], []]
    for _, image_1, image_2, mask in cities:
        for part, array in zip(parts, (image_1, image_2, mask), strict=True):
            part.append(tile(array, size)[0])
    return tuple(np.concatenate(p) for p in parts)


def binary_cross_entropy(logits, targets):
    """torch's BCEWithLogitsLoss: the mean over pixels."""
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean()


def train_and_evaluate(encoder, cities, protocol: OscdSettings, seed: int, preprocess) -> dict:
    """Trains a fresh decoder on the frozen `encoder` and reports test precision / recall / F1.

    With `config.oscd.encoder_bn="train"` (SeCo's main_oscd.py, which only leaves the encoder
    out of the optimiser) the encoder's BatchNorm normalises each date's batch with its own
    statistics while the decoder trains and its running statistics drift to OSCD; the test cities
    are predicted with the drifted statistics. "eval" keeps the exported statistics throughout."""
    size = protocol.tile_size
    mesh = mesh_lib.data_mesh()
    batch_size = inference.global_batch_size(protocol.batch_size, mesh)
    images_1, images_2, masks = training_tiles(cities["train"], size)
    steps_per_epoch = images_1.shape[0] // batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"OSCD: {images_1.shape[0]} training tiles, fewer than one batch of {batch_size}"
        )

    # The encoder's graph while the decoder trains: its BatchNorm mode is static in the graph.
    encoder.model.set_attributes(use_running_average=protocol.encoder_bn == "eval")
    encoder_training_graph, encoder_params, encoder_stats = nnx.split(
        encoder.model, nnx.Param, nnx.BatchStat
    )
    encoder.model.eval()
    encoder_eval_graph = nnx.graphdef(encoder.model)
    decoder = unet.ChangeDecoder(unet.skip_channels(encoder.model), rngs=nnx.Rngs(seed))
    decoder.train()
    train_graph, params, batch_stats = nnx.split(decoder, nnx.Param, nnx.BatchStat)
    decoder.eval()
    eval_graph = nnx.graphdef(decoder)

    optimizer = fit.adam_with_l2(
        protocol.learning_rate,
        weight_decay=protocol.weight_decay,
        lr_decay=protocol.lr_decay,
        steps_per_epoch=steps_per_epoch,
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec(mesh_lib.AXIS))
    encoder_params, encoder_stats, params, batch_stats = jax.device_put(
        (encoder_params, encoder_stats, params, batch_stats), replicated
    )
    opt_state = optimizer.init(params)

    def differences(graph, encoder_stats, x1, x2):
        # Fresh Variables for the statistics: in training mode BatchNorm updates them.
        model = nnx.merge(graph, encoder_params, jax.tree.map(jnp.asarray, encoder_stats))
        skips = unet.feature_differences(model, preprocess(x1), preprocess(x2))
        return skips, nnx.state(model, nnx.BatchStat)

    @jax.jit
    def train_step(encoder_stats, params, batch_stats, opt_state, x1, x2, y, key):
        skips, encoder_stats = differences(encoder_training_graph, encoder_stats, x1, x2)

        def loss_fn(params):
            # Fresh Variables for the statistics: BatchNorm updates them inside this trace.
            model = nnx.merge(train_graph, params, jax.tree.map(jnp.asarray, batch_stats))
            logits = model(skips, rngs=nnx.Rngs(dropout=key))
            return binary_cross_entropy(logits, y.astype(jnp.float32)), nnx.state(
                model, nnx.BatchStat
            )

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return encoder_stats, optax.apply_updates(params, updates), batch_stats, opt_state, loss

    @jax.jit
    def predict(encoder_stats, params, batch_stats, x1, x2):
        skips, _ = differences(encoder_eval_graph, encoder_stats, x1, x2)
        return jax.nn.sigmoid(nnx.merge(eval_graph, params, batch_stats)(skips))

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    epochs = progress.trange(protocol.epochs, desc=f"{encoder.name} OSCD", leave=False)
    for epoch in epochs:
        order = rng.permutation(images_1.shape[0])[: steps_per_epoch * batch_size]
        for step, batch in enumerate(order.reshape(steps_per_epoch, batch_size)):
            x1, x2, y = flip_rotate((images_1[batch], images_2[batch], masks[batch]), rng)
            x1, x2, y = jax.device_put((x1, x2, y), batch_sharding)
            step_key = jax.random.fold_in(key, epoch * steps_per_epoch + step)
            encoder_stats, params, batch_stats, opt_state, loss = train_step(
                encoder_stats, params, batch_stats, opt_state, x1, x2, y, step_key
            )
        epochs.set_postfix(loss=f"{float(loss):.4f}")

    counts = np.zeros(3, np.int64)
    per_city = {}
    for city, image_1, image_2, mask in cities["test"]:
        tiles_1, grid = tile(image_1, size)
        tiles_2, _ = tile(image_2, size)
        probabilities = []
        for start in range(0, tiles_1.shape[0], batch_size):
            stop = min(start + batch_size, tiles_1.shape[0])
            x1, x2 = (
                jax.device_put(inference.pad_batch(t[start:stop], batch_size), batch_sharding)
                for t in (tiles_1, tiles_2)
            )
            probabilities.append(
                np.asarray(predict(encoder_stats, params, batch_stats, x1, x2))[: stop - start]
            )
        full = stitch(np.concatenate(probabilities), grid, mask.shape)
        city_counts = metrics.binary_counts(full, mask)
        per_city[city] = metrics.precision_recall_f1(city_counts)["f1"]
        counts += city_counts
    return {**metrics.precision_recall_f1(counts), "per_city_f1": per_city}


def run_task(settings, workdir) -> dict:
    """Task `eval_oscd`: change detection on OSCD for every encoder row."""
    protocol, shared, seed = settings.oscd, settings.eval, settings.seed
    datasets = {}
    rows = []
    encoders = common.encoders(shared, seed, workdir)
    common.check_inputs(encoders, lambda e: oscd_input(e.input, oscd_config_name(e.input)))
    for encoder in encoders:
        config_name = oscd_config_name(encoder.input)
        preprocess = oscd_input(encoder.input, config_name)  # checks the bands first
        if config_name not in datasets:
            datasets[config_name] = load_oscd(shared, config_name)
        cities = datasets[config_name]
        result = train_and_evaluate(encoder, cities, protocol, seed, preprocess)
        rows.append(
            {
                "encoder": encoder.name,
                "source": encoder.source,
                "dataset": f"oscd/{config_name}",
                "bands": list(encoder.input.bands),
                **result,
            }
        )
    cities = next(iter(datasets.values()))
    extra = {
        "train_cities": [c[0] for c in cities["train"]],
        "test_cities": [c[0] for c in cities["test"]],
        "tile_size": protocol.tile_size,
        "epochs": protocol.epochs,
        "encoder_bn": protocol.encoder_bn,
    }
    return common.report(shared, workdir, "eval_oscd", rows, ("precision", "recall", "f1"), extra)
