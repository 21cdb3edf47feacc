r"""Time of the on-device views (`augment.make_views`, CACo mode) against the previous formulation,
side by side in one process, plus the work each op does.

  python benchmarks/augment.py --batch 32 --crops 64 224

Inputs: `--batch` items (location windows) of 3 uint8 acquisitions [264, 264, 3] (what the
pipeline hands the step), four views each: q = P(t0), k0 = P(A(t1)), k1 = P(t2), k2 = P(A(t0)).

- "previous": the formulation this module replaced, kept here privately: A (jitter, grayscale,
  blur, flip) run on the full 264 x 264 images of t1 and t0 (luma as a dot over the channels, blur
  as a sum of 13 shifted taps per axis), the four view sources concatenated, then the resized crop
  as gathers of a few taps per output pixel (`img[row_index]`, `rows[:, col_index]`). The replaced
  functions are swapped into `caco_jax.pretrain.augment` while it is traced.
- "now": `augment.make_views`: the resized crop as two dense products with per-image [crop, 264]
  resize matrices, the blur and flip folded into those matrices, no concatenated copies.
- The crop alone, on already-materialised images: the gathers against the dense products.
- The ops of "now" one by one, each jitted on its own, plus the replaced blur and A at full size.

Each function is compiled and run once first, then timed over --repeats calls (median,
`block_until_ready`), alternating previous and now so that both see the same machine load.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from caco_jax.data.normalization import Normalization
from caco_jax.pretrain import augment

SIZE = 264
CHANNELS = 3
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- previous formulation


def _gather_taps(start, length, in_size: int, out_size: int):
    """The replaced `_bilinear_taps`: (indices, weights) [out_size, taps] of PIL's bilinear."""
    start = jnp.asarray(start, jnp.float32)
    length = jnp.asarray(length, jnp.float32)
    scale = length / out_size
    support = jnp.maximum(scale, 1.0)
    taps = math.ceil(2.0 * max(in_size / out_size, 1.0)) + 2
    centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
    first = jnp.floor(centres - support - 0.5)
    positions = first[:, None] + jnp.arange(taps, dtype=jnp.float32)[None, :]
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(positions + 0.5 - centres[:, None]) / support)
    inside = (positions >= start) & (positions < start + length)
    weights = jnp.where(inside, weights, 0.0)
    weights = weights / jnp.sum(weights, axis=1, keepdims=True)
    indices = jnp.clip(positions, 0, in_size - 1).astype(jnp.int32)
    return indices, weights


def gather_resized_crop(img, box, size: int):
    height, width = img.shape[:2]
    row_index, row_weight = _gather_taps(box[0], box[2], height, size)
    col_index, col_weight = _gather_taps(box[1], box[3], width, size)
    rows = jnp.einsum("ok,okwc->owc", row_weight, img[row_index], precision=_HIGHEST)
    return jnp.einsum("pk,opkc->opc", col_weight, rows[:, col_index], precision=_HIGHEST)


def _tap_blur(img, sigma, radius: int):
    """The replaced `gaussian_blur`: 2 radius + 1 shifted taps per axis, edges replicated."""
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * jnp.square(offsets / sigma))
    weights = weights / jnp.sum(weights)
    height, width = img.shape[:2]
    padded = jnp.pad(img, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    img = sum(weights[k] * padded[k : k + height] for k in range(2 * radius + 1))
    padded = jnp.pad(img, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(weights[k] * padded[:, k : k + width] for k in range(2 * radius + 1))


@contextlib.contextmanager
def previous_ops():
    """Swaps the replaced luma (dm-pix: a dot over the channels) and blur into the module."""
    saved = augment._luma, augment.gaussian_blur
    augment._luma, augment.gaussian_blur = pix.rgb_to_grayscale, _tap_blur
    try:
        yield
    finally:
        augment._luma, augment.gaussian_blur = saved


def previous_make_views(key, raw, settings: augment.AugmentSettings):
    with previous_ops():
        return _previous_views(key, raw, settings)


def previous_augment_image(u, img, settings):
    with previous_ops():
        return augment.augment_image(u, img, settings)


def _previous_views(key, raw, settings: augment.AugmentSettings):
    norm = Normalization.rgb()
    x = norm.stretch(raw, jnp)
    t0, t1, t2 = x[:, 0], x[:, 1], x[:, 2]
    k_augment, k_crop = jax.random.split(key)
    sources = jnp.concatenate([t1, t0])
    u = jax.random.uniform(k_augment, (sources.shape[0], augment.AUGMENT_UNIFORMS))
    augmented = jax.vmap(lambda ui, img: augment.augment_image(ui, img, settings))(u, sources)
    a_t1, a_t0 = jnp.split(augmented, 2)
    images = jnp.concatenate([t0, a_t1, t2, a_t0])
    u = jax.random.uniform(k_crop, (images.shape[0], augment.crop_uniforms(settings)))
    boxes = jax.vmap(lambda ui: augment.crop_box(ui, SIZE, SIZE, settings))(u)
    crops = jax.vmap(lambda img, b: gather_resized_crop(img, b, settings.crop_size))(images, boxes)
    views = dict(zip(("q", "k0", "k1", "k2"), jnp.split(crops, 4), strict=True))
    return {name: norm.standardize(view, jnp) for name, view in views.items()}


# ----------------------------------------------------------------------------- work counts


def work_counts(crop: int) -> dict[str, float]:
    """Multiply-adds (MAC) per view of the ops at 264 -> crop, from the shapes alone."""
    pixels = SIZE * SIZE
    taps = math.ceil(2.0 * max(SIZE / crop, 1.0)) + 2
    blur_taps = 2 * augment.AugmentSettings().blur_radius + 1
    return {
        "gather crop MAC": crop * taps * SIZE * CHANNELS + crop * crop * taps * CHANNELS,
        "gather crop gathered floats": crop * taps * SIZE * CHANNELS
        + crop * crop * taps * CHANNELS,
        "dense crop MAC": crop * SIZE * SIZE * CHANNELS + crop * SIZE * crop * CHANNELS,
        "blur at 264 (separable) MAC": 2 * blur_taps * pixels * CHANNELS,
        "blur folded into the matrices MAC": 2 * crop * SIZE * blur_taps,
        "bytes of one full-size f32 image": pixels * CHANNELS * 4,
    }


# ----------------------------------------------------------------------------- timing


def median_ms(fn, *args, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def side_by_side(functions: dict, args, repeats: int) -> dict[str, float]:
    """Compiles and runs every function once, then times them in alternation."""
    for fn in functions.values():
        jax.block_until_ready(fn(*args))
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            samples[name].append(median_ms(fn, *args, repeats=1))
    return {name: statistics.median(values) for name, values in samples.items()}


def benchmark_crop_size(args, crop: int) -> None:
    settings = augment.AugmentSettings(crop_size=crop)
    rng = np.random.default_rng(0)
    raw = jnp.asarray(rng.integers(0, 256, (args.batch, 3, SIZE, SIZE, CHANNELS), np.uint8))
    key = jax.random.key(0)

    print(f"\n== crop {crop}: {args.batch} items x 4 views from [3, {SIZE}, {SIZE}, 3] uint8")
    for name, value in work_counts(crop).items():
        print(f"  work per view: {name:38s} {value / 1e6:8.2f} M")

    now = jax.jit(lambda k, x: augment.make_views(k, x, recipe="seco", settings=settings))
    previous = jax.jit(lambda k, x: previous_make_views(k, x, settings))
    got, before = now(key, raw), previous(key, raw)
    for name, view in got.items():  # same draws, same semantics: the same views
        assert view.shape == (args.batch, crop, crop, CHANNELS)
        np.testing.assert_allclose(view, before[name], atol=1e-4)
    views = side_by_side({"previous": previous, "now": now}, (key, raw), args.repeats)
    print(
        f"  make_views: previous {views['previous']:8.1f} ms   now {views['now']:8.1f} ms   "
        f"ratio {views['previous'] / views['now']:.2f}x"
    )

    norm = Normalization.rgb()
    images = norm.stretch(raw.reshape(-1, SIZE, SIZE, CHANNELS), jnp)
    images = jnp.concatenate([images, images[: args.batch]])  # 4 views per location
    u = jax.random.uniform(key, (images.shape[0], augment.crop_uniforms(settings)))
    boxes = jax.vmap(lambda ui: augment.crop_box(ui, SIZE, SIZE, settings))(u)
    gather = jax.jit(jax.vmap(lambda x, b: gather_resized_crop(x, b, crop)))
    dense = jax.jit(jax.vmap(lambda x, b: augment.resized_crop(x, b, crop)))
    np.testing.assert_allclose(gather(images, boxes), dense(images, boxes), atol=1e-5)
    crops = side_by_side({"gather": gather, "dense": dense}, (images, boxes), args.repeats)
    print(
        f"  resized crop alone ({images.shape[0]} views): gather {crops['gather']:8.1f} ms   "
        f"dense {crops['dense']:8.1f} ms   ratio {crops['gather'] / crops['dense']:.2f}x"
    )

    t0 = images[: args.batch]
    u_augment = jax.random.uniform(key, (args.batch, augment.AUGMENT_UNIFORMS))
    ops = {
        "stretch (3 acquisitions)": (jax.jit(lambda r: norm.stretch(r, jnp)), (raw,)),
        "colour ops at 264 (1 view)": (
            jax.jit(jax.vmap(lambda ui, x: augment.augment_colour(ui, x, settings))),
            (u_augment, t0),
        ),
        "tap blur at 264 (1 view, previous)": (
            jax.jit(jax.vmap(lambda ui, x: _tap_blur(x, 0.1 + 1.9 * ui[0], 6))),
            (u_augment, t0),
        ),
        "A at 264 (1 view, previous)": (
            jax.jit(jax.vmap(lambda ui, x: previous_augment_image(ui, x, settings))),
            (u_augment, t0),
        ),
        "A at 264 (1 view, now: matrix blur)": (
            jax.jit(jax.vmap(lambda ui, x: augment.augment_image(ui, x, settings))),
            (u_augment, t0),
        ),
        "plain crop P (1 view)": (
            jax.jit(jax.vmap(lambda x, b: augment.resized_crop(x, b, crop))),
            (t0, boxes[: args.batch]),
        ),
        "P(A) with blur + flip folded (1 view)": (
            jax.jit(
                jax.vmap(lambda ui, x, b: augment.augmented_crop(ui, x, b, settings)),
            ),
            (u_augment, t0, boxes[: args.batch]),
        ),
    }
    for name, (fn, fn_args) in ops.items():
        jax.block_until_ready(fn(*fn_args))
        print(f"  op: {name:40s} {median_ms(fn, *fn_args, repeats=args.repeats):8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="items per batch")
    parser.add_argument("--crops", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(
        f"command: python benchmarks/augment.py --batch {args.batch} --crops "
        f"{' '.join(map(str, args.crops))} --repeats {args.repeats}"
    )
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.processor() or '?'}, "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    for crop in args.crops:
        benchmark_crop_size(args, crop)
    print(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
