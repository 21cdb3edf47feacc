r"""Host input pipeline cost: record layouts side by side, and against the original approach.

  git archive f2e9dd8 | (mkdir -p /tmp/caco_v1 && tar -x -C /tmp/caco_v1)   # or git worktree add
  .venv/bin/python benchmarks/input_pipeline.py --baseline-tree /tmp/caco_v1 [--locations 48]

Writes a synthetic archive (published layout) into --workdir (reused when present) and prepares its
`rgb` records twice: with this tree's builder (2.0.0, one record per acquisition and a side index)
and with --baseline-tree's (a checkout of the one-record-per-location builder 1.0.0). Then:

1. Layouts: for caco, seco and moco, alternating between the two trees, --passes one-epoch passes
   of each tree's grain pipeline (one process, no worker processes or reader threads), each pass
   cold: every shard's reader opened (as a training run holds them), then `os.fsync` and
   `os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)` on every shard file. Each pass
   runs in a fresh subprocess with that tree first on sys.path and counts per item: records read
   (each one zstd chunk decompressed and one example parsed), bytes decompressed (the records'
   serialised size), bytes the reader asked the kernel for (/proc/self/io rchar) and bytes that
   came from storage (read_bytes: about rchar when the cache drop took effect, ~0 when it did not);
   and items per CPU-second (process CPU time of the pass). Per location = per item x the items a
   location gives (caco 2, seco and moco 1). This tree's moco epoch visits every acquisition (10x
   the items of 1.0.0's epoch over locations); its costs are compared per item.
2. the original approach, as `utkarshmall13/CACo`'s `ChangeAwareContrastMultiAug.__getitem__` does
   it per item: open the acquisition folders of the window, read B4/B3/B2 of 3 acquisitions with
   rasterio, stretch to uint8, build PIL images and make the four views with torchvision's PIL code
   path written out (torchvision is not installable here): colour jitter via ImageEnhance and PIL's
   HSV hue shift in a random order, grayscale, ImageFilter.GaussianBlur, flip, random resized crop
   with PIL's bilinear resize, ToTensor and normalisation; compared with (1)'s caco on this tree.
3. the on-device replacement of (2)'s augmentation: jitted `augment.make_views` on this machine's
   CPU (XLA), time per batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

METHODS = ("caco", "seco", "moco")
# A location's items in a training batch (caco: one per window), to state costs per location.
ITEMS_PER_LOCATION = {"caco": 2, "seco": 1, "moco": 1}

# One cold pass of one tree's pipeline: python - TREE DATA_DIR METHOD BATCH -> one JSON line.
_PASS_SCRIPT = r"""
import json, os, sys, time
tree, data_dir, method, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, tree)
os.environ["TQDM_DISABLE"] = "1"
from caco_jax.data import dataset, pipeline

def io():
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}

class Counting:
    # Wraps the array_record data source: every record read is one chunk decompressed.
    def __init__(self, inner):
        self.inner, self.records, self.bytes = inner, 0, 0
    def __len__(self):
        return len(self.inner)
    def __getitem__(self, key):
        record = self.inner[key]
        self.records += 1
        self.bytes += len(record)
        return record
    def __getitems__(self, keys):
        return [self[k] for k in keys]

settings = pipeline.InputSettings(num_workers=0, num_threads=0)
source = dataset.open_records(data_dir, "rgb")
holder = getattr(source, "acquisitions", source)  # 2.0.0: Records; 1.0.0: the tfds source
counting = holder.data_source = Counting(holder.data_source)
folder = os.path.dirname(holder.dataset_info.data_dir + "/")
shards = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if ".array_record-" in n]
# Open every shard's reader first, as a training run holds them open: opening one reads its footer
# (array_record prefetches up to 1 MiB of it), a cost per shard and run, not per item.
first = 0
for length in holder.dataset_info.splits["train"].shard_lengths:
    counting.inner[first]
    first += length
for path in shards:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # dirty pages (records just written) are not dropped
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
# 2.0.0 with moco's epoch over acquisitions counts them; 1.0.0's Stream has no such field.
counts = getattr(source, "acquisition_counts", None)
extra = {"num_acquisitions": int(counts().sum())} if counts else {}
stream = pipeline.Stream(method, batch, 0, len(source), **extra)
batches = pipeline.make_pipeline(settings, source, stream, num_epochs=1)
before, cpu = io(), time.process_time()
items = sum(len(b["item_id"]) for b in batches)
cpu, after = time.process_time() - cpu, io()
print(json.dumps(dict(
    items=items, cpu=cpu, records=counting.records, decompressed=counting.bytes,
    rchar=after["rchar"] - before["rchar"], storage=after["read_bytes"] - before["read_bytes"],
    disk=sum(os.path.getsize(p) for p in shards), locations=len(source),
)))
"""

_PREPARE_SCRIPT = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
os.environ["TQDM_DISABLE"] = "1"
import tensorflow_datasets as tfds
from caco_jax.data import builder
builder.CacoGeography(config="rgb", data_dir=sys.argv[2], num_workers=2).download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=sys.argv[3]))
"""


def prepare(workdir: str, num_locations: int, baseline_tree: str) -> tuple[str, dict]:
    """The archive folder and {tree: data_dir} of its records prepared by each tree."""
    from caco_jax.sources import synthetic

    archive_root = os.path.join(workdir, "archive")
    archive_dir = os.path.join(archive_root, "clean_synthetic_geography")
    if not os.path.isdir(archive_dir):
        synthetic.write_archive(archive_root, num_locations=num_locations, num_workers=2)
    trees = {}
    for label, tree in (("1.0.0", baseline_tree), ("2.0.0", HERE)):
        data_dir = os.path.join(workdir, f"tfds_{label}")
        _python(_PREPARE_SCRIPT, tree, data_dir, archive_dir)  # reused when already prepared
        trees[label] = (tree, data_dir)
    return archive_dir, trees


def _python(script: str, tree: str, *args: str) -> str:
    """Runs `script` with `tree` as its caco_jax (its worker processes too: they re-import)."""
    env = {**os.environ, "PYTHONPATH": tree}
    done = subprocess.run(
        [sys.executable, "-c", script, tree, *args],
        capture_output=True,
        text=True,
        cwd=tree,
        env=env,
    )
    if done.returncode:
        raise RuntimeError(f"{tree} {args}: exit code {done.returncode}\n{done.stderr[-3000:]}")
    return done.stdout


def cold_pass(tree: str, data_dir: str, method: str, batch: int) -> dict:
    return json.loads(_python(_PASS_SCRIPT, tree, data_dir, method, str(batch)).splitlines()[-1])


class Timer:
    """Wall time and this process's CPU time (all threads) of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def compare_layouts(trees: dict, batch: int, passes: int) -> dict:
    """{(method, layout): [pass results]}, the layouts alternating pass by pass."""
    results = {}
    for method in METHODS:
        for _ in range(passes):
            for label, (tree, data_dir) in trees.items():
                results.setdefault((method, label), []).append(
                    cold_pass(tree, data_dir, method, batch)
                )
    return results


def _per_item(runs: list[dict], key: str) -> float:
    return sum(r[key] for r in runs) / sum(r["items"] for r in runs)


def _best_rate(runs: list[dict]) -> float:
    """The best items per CPU-second of the passes."""
    return max(r["items"] / r["cpu"] for r in runs)


def layout_table(results: dict) -> list[str]:
    kib, mib = 1 / 1024, 1 / 2**20
    lines = [
        "| method | layout | items / CPU-s (best) | records read / item | MiB decompressed / item "
        "| KiB read (rchar) / item | KiB from storage / item | MiB decompressed / location |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (method, label), runs in results.items():
        per_location = ITEMS_PER_LOCATION[method]

        def mean(key, runs=runs):
            return _per_item(runs, key)

        lines.append(
            f"| {method} | {label} | {_best_rate(runs):.0f} | {mean('records'):.2f} | "
            f"{mean('decompressed') * mib:.3f} | {mean('rchar') * kib:.0f} | "
            f"{mean('storage') * kib:.0f} | {mean('decompressed') * mib * per_location:.3f} |"
        )
    return lines


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

    from caco_jax.pretrain import augment

    settings = augment.AugmentSettings()
    images = jax.device_put(
        jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, 3, 264, 264, 3)), jnp.uint8)
    )
    make = jax.jit(lambda key, x: augment.make_views(key, x, recipe="seco", settings=settings))
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
    parser.add_argument(
        "--baseline-tree",
        required=True,
        help="a checkout of caco_jax with the one-record-per-location builder (1.0.0)",
    )
    parser.add_argument("--locations", type=int, default=48)
    parser.add_argument("--workdir", default="/tmp/caco_bench_input")
    parser.add_argument("--batch", type=int, default=8, help="items per host batch")
    parser.add_argument("--passes", type=int, default=3, help="cold passes per method and layout")
    parser.add_argument("--original-items", type=int, default=24)
    parser.add_argument("--augment-batch", type=int, default=32, help="items per device batch")
    parser.add_argument(
        "--augment-repeats",
        type=int,
        default=5,
        help="timed calls of the on-device augmentation (median); 0 skips that measurement",
    )
    args = parser.parse_args()
    for name in ("locations", "batch", "passes", "original_items", "augment_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.augment_repeats < 0:
        parser.error("--augment-repeats must be 0 (skip) or more")

    os.makedirs(args.workdir, exist_ok=True)
    archive_dir, trees = prepare(args.workdir, args.locations, args.baseline_tree)
    print(f"machine: {machine()}")
    print(f"data: {args.locations} synthetic locations x 10 acquisitions, 264x264 RGB")
    for label, (_, data_dir) in trees.items():
        folder = os.path.join(data_dir, "caco_geography", "rgb", label)
        size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
        print(f"records {label}: {size / args.locations / 2**20:.3f} MiB per location on disk")

    results = compare_layouts(trees, args.batch, args.passes)
    print(f"(1) record layouts, {args.passes} cold one-epoch passes each, batches of {args.batch}")
    print("\n".join(layout_table(results)))
    storage = [r["storage"] / max(r["rchar"], 1) for runs in results.values() for r in runs]
    print(
        f"    cache drop (POSIX_FADV_DONTNEED): storage reads / rchar = {min(storage):.2f}-"
        f"{max(storage):.2f} per pass ({'took effect' if min(storage) > 0.5 else 'NOT effective'})"
    )
    for method in METHODS:
        old, new = results[(method, "1.0.0")], results[(method, "2.0.0")]
        fewer = _per_item(old, "decompressed") / _per_item(new, "decompressed")
        faster = _best_rate(new) / _best_rate(old)
        print(
            f"    {method}: {fewer:.2f}x fewer bytes decompressed per item, "
            f"{faster:.2f}x items per CPU-second"
        )

    def rates(timer, items):
        return f"{items / timer.wall:7.1f} items/s wall, {items / timer.cpu:7.1f} items/CPU-s"

    original_timer, original_items = time_original(archive_dir, args.original_items)
    caco = _best_rate(results[("caco", "2.0.0")])
    print(
        f"(2) original, rasterio + 4 views on the host (PIL):          "
        f"{rates(original_timer, original_items)} ({original_items} items)"
    )
    per_core = caco / (original_items / original_timer.cpu)
    print(f"    ratio (1) caco 2.0.0 / (2): {per_core:.1f}x per CPU-second")

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
