r"""Host input pipeline cost: caco_jax's grain pipeline against the original approach, same run.

  .venv/bin/python benchmarks/input_pipeline.py [--locations 24] [--workdir /tmp/caco_bench_input]

Writes a synthetic archive (published layout) and its `rgb` records into --workdir (reused when
present), then measures, one after the other on one core:

1. caco_jax: the grain pipeline (`caco_jax.data.pipeline`, mode caco, no worker processes or reader
   threads, so one core does everything): read + decode a record, draw the acquisitions, stack
   uint8 batches. Augmentation is not on the host any more.
2. the original approach, as `utkarshmall13/CACo`'s `ChangeAwareContrastMultiAug.__getitem__` does
   it per item: open the acquisition folders of the window, read B4/B3/B2 of 3 acquisitions with
   rasterio, stretch to uint8, build PIL images and make the four views with torchvision's PIL code
   path written out (torchvision is not installable here): colour jitter via ImageEnhance and PIL's
   HSV hue shift in a random order, grayscale, ImageFilter.GaussianBlur, flip, random resized crop
   with PIL's bilinear resize, ToTensor and normalisation.
3. the on-device replacement of (2)'s augmentation: jitted `augment.make_views` on this machine's
   CPU (XLA), time per batch.

Prints, for each, items per second of wall time and per CPU-second (process CPU time over all its
threads: the per-core cost, robust to other processes sharing the machine), and the ratio (1)/(2).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def prepare(workdir: str, num_locations: int) -> tuple[str, str]:
    from caco_jax import config as config_lib
    from caco_jax.data import builder, synthetic

    archive_root = os.path.join(workdir, "archive")
    archive_dir = os.path.join(archive_root, "clean_synthetic_geography")
    if not os.path.isdir(archive_dir):
        synthetic.write_archive(archive_root, num_locations=num_locations, num_workers=2)
    config = config_lib.for_tasks("pretrain")
    config.data.archive = archive_dir
    config.data.data_dir = os.path.join(workdir, "tfds")
    builder.run_task(config, workdir)
    return archive_dir, config.data.data_dir


class Timer:
    """Wall time and this process's CPU time (all threads) of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def time_grain(data_dir: str, batch: int, epochs: int, threads: int) -> tuple[Timer, int]:
    from caco_jax import config as config_lib
    from caco_jax.data import pipeline, records

    config = config_lib.for_tasks("pretrain")
    config.input.num_workers = 0
    config.input.num_threads = threads
    source = records.open_records(data_dir, "rgb")
    iterator = pipeline.make_pipeline(
        config, source, mode="caco", global_batch_size=batch, seed=0, num_epochs=epochs
    )
    next(iterator)  # opens the files; not counted
    items = 0
    with Timer() as timer:
        for b in iterator:
            items += len(b["item_id"])
    return timer, items


# ------------------------------------------------------------------------- the original approach

QUANTILES = {"B4": (0.0, 129.0), "B3": (2.0, 103.0), "B2": (3.0, 88.0)}
ORIGINAL_RNG = np.random.default_rng(0)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def read_image(path: str):
    import rasterio
    from PIL import Image

    channels = []
    for band in ("B4", "B3", "B2"):
        with rasterio.open(os.path.join(path, f"{band}.tif")) as f:
            raw = f.read(1)
        low, high = QUANTILES[band]
        channels.append(np.clip((raw - low) / (high - low) * 255.0, 0, 255).astype(np.uint8))
    return Image.fromarray(np.dstack(channels))


def pil_hue(img, factor):
    from PIL import Image

    h, s, v = img.convert("HSV").split()
    shifted = (np.asarray(h, np.int16) + round(factor * 255)) % 256
    return Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8), "L"), s, v)).convert("RGB")


def pil_augment(img):
    from PIL import Image, ImageEnhance, ImageFilter

    if random.random() < 0.8:
        factors = [random.uniform(0.6, 1.4) for _ in range(3)] + [random.uniform(-0.1, 0.1)]
        ops = [
            lambda x: ImageEnhance.Brightness(x).enhance(factors[0]),
            lambda x: ImageEnhance.Contrast(x).enhance(factors[1]),
            lambda x: ImageEnhance.Color(x).enhance(factors[2]),
            lambda x: pil_hue(x, factors[3]),
        ]
        for index in random.sample(range(4), 4):
            img = ops[index](img)
    if random.random() < 0.2:
        img = img.convert("L").convert("RGB")
    if random.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
    if random.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def pil_preprocess(img, size=224):
    from PIL import Image

    width, height = img.size
    area = width * height
    for _ in range(10):
        target = area * random.uniform(0.2, 1.0)
        aspect = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            i, j = random.randint(0, height - h), random.randint(0, width - w)
            break
    else:
        i, j, h, w = 0, 0, height, width
    crop = img.crop((j, i, j + w, i + h)).resize((size, size), Image.Resampling.BILINEAR)
    return ((np.asarray(crop, np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def original_item(location_dir: str, window: int):
    acquisitions = sorted(
        (e.path for e in os.scandir(location_dir) if e.is_dir()), reverse=True
    )  # newest first, as the official code sorts; [:5] is the late window
    paths = acquisitions[:5] if window == 1 else acquisitions[5:]
    t0, t1, t2 = (read_image(p) for p in ORIGINAL_RNG.choice(paths, 3, replace=False))
    views = [pil_preprocess(v) for v in (t0, pil_augment(t1), t2, pil_augment(t0))]
    return views


def time_original(archive_dir: str, num_items: int) -> tuple[Timer, int]:
    locations = sorted(e.path for e in os.scandir(archive_dir) if e.is_dir())
    original_item(locations[0], 0)  # warm-up (imports, file cache of the first location)
    with Timer() as timer:
        for index in range(num_items):
            original_item(locations[(index // 2) % len(locations)], index % 2)
    return timer, num_items


# ----------------------------------------------------------------------- on-device augmentation


def time_device_augment(batch: int, repeats: int) -> tuple[Timer, float]:
    import jax
    import jax.numpy as jnp

    from caco_jax import augment
    from caco_jax import config as config_lib

    config = config_lib.for_tasks("pretrain")
    images = jax.device_put(
        jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, 3, 264, 264, 3)), jnp.uint8)
    )
    make = jax.jit(lambda key, x: augment.make_views(key, x, recipe="seco", config=config))
    start = time.perf_counter()
    jax.block_until_ready(make(jax.random.key(0), images))
    compile_s = time.perf_counter() - start
    timers = []
    for step in range(repeats):
        with Timer() as timer:
            jax.block_until_ready(make(jax.random.key(step + 1), images))
        timers.append(timer)
    return sorted(timers, key=lambda t: t.wall)[len(timers) // 2], compile_s


def machine() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{model}, {os.cpu_count()} cores, {platform.python_version()}, load avg {load:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--locations", type=int, default=24)
    parser.add_argument("--workdir", default="/tmp/caco_bench_input")
    parser.add_argument("--batch", type=int, default=8, help="items per host batch")
    parser.add_argument("--epochs", type=int, default=2, help="grain epochs timed")
    parser.add_argument("--original-items", type=int, default=24)
    parser.add_argument("--augment-batch", type=int, default=32, help="items per device batch")
    parser.add_argument(
        "--augment-repeats",
        type=int,
        default=5,
        help="timed calls of the on-device augmentation (median); 0 skips that measurement",
    )
    args = parser.parse_args()
    for name in ("locations", "batch", "epochs", "original_items", "augment_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.augment_repeats < 0:
        parser.error("--augment-repeats must be 0 (skip) or more")

    os.makedirs(args.workdir, exist_ok=True)
    archive_dir, data_dir = prepare(args.workdir, args.locations)
    print(f"machine: {machine()}")
    print(f"data: {args.locations} synthetic locations x 10 acquisitions, 264x264 RGB, mode caco")

    def rates(timer, items):
        return f"{items / timer.wall:7.1f} items/s wall, {items / timer.cpu:7.1f} items/CPU-s"

    grain_timer, grain_items = time_grain(data_dir, args.batch, args.epochs, threads=0)
    original_timer, original_items = time_original(archive_dir, args.original_items)
    threaded_timer, _ = time_grain(data_dir, args.batch, args.epochs, threads=2)
    print(
        f"(1) caco_jax grain pipeline, in-process, no reader threads: "
        f"{rates(grain_timer, grain_items)} ({grain_items} items, batches of {args.batch})"
    )
    print(
        f"    same, 2 reader threads:                                "
        f"{rates(threaded_timer, grain_items)}"
    )
    print(
        f"(2) original, rasterio + 4 views on the host (PIL):          "
        f"{rates(original_timer, original_items)} ({original_items} items)"
    )
    per_core = (grain_items / grain_timer.cpu) / (original_items / original_timer.cpu)
    wall = (grain_items / grain_timer.wall) / (original_items / original_timer.wall)
    print(f"    ratio (1)/(2): {per_core:.1f}x per CPU-second, {wall:.1f}x wall")

    if args.augment_repeats == 0:
        print("(3) on-device make_views: skipped (--augment-repeats 0)")
        return
    timer, compile_s = time_device_augment(args.augment_batch, args.augment_repeats)
    print(
        f"(3) on-device make_views (caco: 4 views 224x224 from 264x264), XLA:CPU: "
        f"{timer.wall * 1e3:.0f} ms wall, {timer.cpu:.1f} CPU-s per batch of {args.augment_batch} "
        f"items = {rates(timer, args.augment_batch)} (compile {compile_s:.1f} s, median of "
        f"{args.augment_repeats})"
    )


if __name__ == "__main__":
    main()
