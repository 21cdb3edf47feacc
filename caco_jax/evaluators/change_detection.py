"""OSCD change detection (SeCo's `main_oscd.py` protocol, reused by CACo).

The frozen encoder (eval mode) embeds both dates; |f(x1) - f(x2)| at five depths feeds the U-Net
decoder
of `unet.py`. Training: the 14 train cities cut into 96x96 tiles (zero-padded at the borders, as
PIL's crop
did), random horizontal flip and rot90 applied alike to both images and the mask, batch 32 (last
partial
batch dropped), BCE on logits, Adam lr 1e-3 with L2 weight decay 1e-4 (torch's Adam), lr x0.95 per
epoch,
100 epochs. Evaluation: each of the 10 test cities predicted whole, stitched from its tiles,
thresholded at
0.5; precision / recall / F1 of the "changed" class from the pixel counts of all test cities
together.
Input: SeCo's per-band quantile stretch of the raw reflectance to uint8, then [0, 1], no mean/std.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from caco_jax import mesh as mesh_lib
from caco_jax.evaluators import common, metrics, oscd_builder, unet
from caco_jax.evaluators.tiling import flip_rotate, stitch, tile

# SeCo's OSCD stretch of the raw Sentinel-2 L1C values (datasets/oscd_dataset.py QUANTILES).
RGB_QUANTILES = {"B04": (426.0, 3698.0), "B03": (667.0, 2969.0), "B02": (885.0, 2620.0)}


def stretch_rgb(image: np.ndarray) -> np.ndarray:
    """uint16 (B04, B03, B02) -> uint8, each band mapped linearly from its (low, high) quantiles to
    [0, 255], clipped and truncated, as SeCo's reader did before ToTensor."""
    low = np.array([RGB_QUANTILES[b][0] for b in oscd_builder.RGB_BANDS], np.float32)
    high = np.array([RGB_QUANTILES[b][1] for b in oscd_builder.RGB_BANDS], np.float32)
    unit = np.clip((image.astype(np.float32) - low) / (high - low), 0.0, 1.0)
    return (unit * 255.0).astype(np.uint8)


def load_oscd(config):
    """{split: list of (city, image1 uint8, image2 uint8, mask)} from TFDS `oscd/rgb`, built from
    `config.eval.oscd_dir` first when it is not prepared yet."""
    data_dir = os.path.expanduser(config.eval.data_dir or "~/tensorflow_datasets")
    if not os.path.isdir(os.path.join(data_dir, "oscd", "rgb")):
        if not config.eval.oscd_dir:
            raise FileNotFoundError(
                f"config.eval.oscd_dir: OSCD is not prepared under {data_dir}; point "
                "--config.eval.oscd_dir at the downloaded Onera archive to build it"
            )
        oscd_builder.prepare(config.eval.oscd_dir, data_dir, "rgb")
    builder = common.open_tfds(data_dir, "oscd", "rgb")
    cities = {}
    for split in ("train", "test"):
        source = builder.as_data_source(split)
        cities[split] = [
            (
                common.read_text(source[i]["city"]),
                stretch_rgb(source[i]["image1"]),
                stretch_rgb(source[i]["image2"]),
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


def train_and_evaluate(encoder, cities, config) -> dict:
    """Trains a fresh decoder on the frozen `encoder` and reports test precision / recall / F1."""
    size = config.eval.tile_size
    mesh = mesh_lib.data_mesh()
    batch_size = common.global_batch_size(config.eval.batch_size, mesh)
    images_1, images_2, masks = training_tiles(cities["train"], size)
    steps_per_epoch = images_1.shape[0] // batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"OSCD: {images_1.shape[0]} training tiles, fewer than one batch of {batch_size}"
        )

    encoder.model.eval()
    encoder_graph, encoder_state = nnx.split(encoder.model)
    decoder = unet.ChangeDecoder(unet.skip_channels(encoder.model), rngs=nnx.Rngs(config.eval.seed))
    decoder.train()
    train_graph, params, batch_stats = nnx.split(decoder, nnx.Param, nnx.BatchStat)
    decoder.eval()
    eval_graph = nnx.graphdef(decoder)

    schedule = optax.exponential_decay(
        config.eval.learning_rate, steps_per_epoch, config.eval.lr_decay, staircase=True
    )
    # torch's Adam(weight_decay=...) adds the L2 term to the gradient before the moments.
    optimizer = optax.chain(
        optax.add_decayed_weights(config.eval.weight_decay),
        optax.scale_by_adam(),
        optax.scale_by_learning_rate(schedule),
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec(common.DATA_AXIS))
    encoder_state, params, batch_stats = jax.device_put(
        (encoder_state, params, batch_stats), replicated
    )
    opt_state = optimizer.init(params)

    def differences(encoder_state, x1, x2):
        model = nnx.merge(encoder_graph, encoder_state)
        return unet.feature_differences(model, common.as_unit_float(x1), common.as_unit_float(x2))

    @jax.jit
    def train_step(encoder_state, params, batch_stats, opt_state, x1, x2, y, key):
        skips = differences(encoder_state, x1, x2)

        def loss_fn(params):
            # Fresh Variables for the statistics: BatchNorm updates them inside this trace.
            model = nnx.merge(train_graph, params, jax.tree.map(jnp.asarray, batch_stats))
            logits = model(skips, rngs=nnx.Rngs(dropout=key))
            return binary_cross_entropy(logits, y.astype(jnp.float32)), nnx.state(
                model, nnx.BatchStat
            )

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    @jax.jit
    def predict(encoder_state, params, batch_stats, x1, x2):
        skips = differences(encoder_state, x1, x2)
        return jax.nn.sigmoid(nnx.merge(eval_graph, params, batch_stats)(skips))

    rng = np.random.default_rng(config.eval.seed)
    key = jax.random.key(config.eval.seed)
    progress = tqdm.trange(config.eval.epochs, desc=f"{encoder.name} OSCD", leave=False)
    for epoch in progress:
        order = rng.permutation(images_1.shape[0])[: steps_per_epoch * batch_size]
        for step, batch in enumerate(order.reshape(steps_per_epoch, batch_size)):
            x1, x2, y = flip_rotate((images_1[batch], images_2[batch], masks[batch]), rng)
            x1, x2, y = jax.device_put((x1, x2, y), batch_sharding)
            step_key = jax.random.fold_in(key, epoch * steps_per_epoch + step)
            params, batch_stats, opt_state, loss = train_step(
                encoder_state, params, batch_stats, opt_state, x1, x2, y, step_key
            )
        progress.set_postfix(loss=f"{float(loss):.4f}")

    counts = np.zeros(3, np.int64)
    per_city = {}
    for city, image_1, image_2, mask in cities["test"]:
        tiles_1, grid = tile(image_1, size)
        tiles_2, _ = tile(image_2, size)
        probabilities = []
        for start in range(0, tiles_1.shape[0], batch_size):
            stop = min(start + batch_size, tiles_1.shape[0])
            x1, x2 = (
                jax.device_put(common.pad_batch(t[start:stop], batch_size), batch_sharding)
                for t in (tiles_1, tiles_2)
            )
            probabilities.append(
                np.asarray(predict(encoder_state, params, batch_stats, x1, x2))[: stop - start]
            )
        full = stitch(np.concatenate(probabilities), grid, mask.shape)
        city_counts = metrics.binary_counts(full, mask)
        per_city[city] = metrics.precision_recall_f1(city_counts)["f1"]
        counts += city_counts
    return {**metrics.precision_recall_f1(counts), "per_city_f1": per_city}


def oscd_task(config, workdir: str) -> dict:
    """Task `eval_oscd`: change detection on OSCD for every encoder row."""
    cities = load_oscd(config)
    rows = []
    for encoder in common.encoders(config, workdir):
        result = train_and_evaluate(encoder, cities, config)
        rows.append({"encoder": encoder.name, "source": encoder.source, **result})
    extra = {
        "train_cities": [c[0] for c in cities["train"]],
        "test_cities": [c[0] for c in cities["test"]],
        "tile_size": config.eval.tile_size,
        "epochs": config.eval.epochs,
    }
    return common.report(config, workdir, "eval_oscd", rows, ("precision", "recall", "f1"), extra)
