"""How long does `embed` take on a whole Sentinel-2 scene, RGB and all bands, against another
checkout on the same scene?

Writes an L1C-like scene of band files with the real 10/20/60 m sizes and bounds offsets of a
1933 x 1947 px cut (B01 starts 10 m west and ends 50 m north of B02, B05 10 m east, ...), uint16
digital numbers, and two encoder exports of a ResNet-18 at ``--image_size`` px: RGB (B4, B3, B2)
and all 12 bands. Each measurement runs in its own process (`--tree` first on ``sys.path``), twice
in a row: the first includes loading and compiling, the second is the steady state; then the
encoder alone on as many zero tiles (the floor: the model's time without reading). The RGB scene
is also embedded by ``--baseline_tree`` in the same run, alternating with this tree, for the ratio;
an all-bands encoder needs the resampling onto one grid that older trees refuse.

  python benchmarks/embed_scene.py --dir /tmp/embed_scene --baseline_tree /work/baseline
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANDS_10M = ("B2", "B3", "B4", "B8")
BANDS_20M = ("B5", "B6", "B7", "B8A", "B11", "B12")
BANDS_60M = ("B1", "B9")
# (left, top) of each resolution's grid, as in a real L1C product: not the same bounds.
ORIGINS = {10: (435_730.0, 4_179_460.0), 20: (435_740.0, 4_179_460.0), 60: (435_720.0, 4_179_510.0)}

PROBE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
try:
    from caco_jax.products import embed
except ImportError:
    from caco_jax import embed
times = []
for _ in range(2):
    start = time.perf_counter()
    result = embed.embed(sys.argv[2], sys.argv[3], dn_offset=0.0, batch_size=int(sys.argv[4]))
    times.append(time.perf_counter() - start)
row = {"tiles": len(result.ids), "first_s": times[0], "steady_s": times[1]}
try:  # the floor: the encoder alone on as many tiles (trees with runtime.inference)
    import numpy as np
    from caco_jax.runtime import inference
    model, normalization, size = embed.load_encoder(sys.argv[3])
    frozen = inference.FrozenModel(
        model, embed.EncoderInput(normalization, size), batch_size=int(sys.argv[4])
    )
    batch = np.zeros((frozen.batch_size, size, size, normalization.num_bands), np.uint8)
    frozen(batch)
    start = time.perf_counter()
    for _ in range(-(-len(result.ids) // frozen.batch_size)):
        frozen(batch)
    row["model_s"] = time.perf_counter() - start
except (ImportError, AttributeError):
    pass
print(json.dumps(row))
"""


def write_scene(folder: str, width: int, height: int) -> None:
    import rasterio
    from rasterio.transform import from_origin

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for resolution, bands in ((10, BANDS_10M), (20, BANDS_20M), (60, BANDS_60M)):
        columns, rows = -(-width * 10 // resolution), -(-height * 10 // resolution)
        left, top = ORIGINS[resolution]
        for band in bands:
            values = rng.integers(1000, 5000, size=(rows, columns), dtype=np.uint16)
            path = os.path.join(folder, f"T33SVB_20230612T100031_B{band[1:].zfill(2)}.tif")
            with rasterio.open(
                path, "w", driver="GTiff", width=columns, height=rows, count=1, dtype="uint16",
                crs="EPSG:32633", transform=from_origin(left, top, resolution, resolution),
            ) as dataset:  # fmt: skip
                dataset.write(values, 1)


def write_encoders(folder: str, image_size: int) -> dict:
    sys.path.insert(0, ROOT)
    from caco_jax.data import layout
    from caco_jax.data.normalization import EXPORT_KEY, Normalization
    from caco_jax.evaluators import common
    from caco_jax.models import export

    exports = {}
    for name, normalization in (
        ("rgb", Normalization.rgb()),
        (
            "all_bands",
            Normalization(layout.BANDS, (0.0,) * 12, (255.0,) * 12, (0.5,) * 12, (0.25,) * 12),
        ),
    ):
        model = common.random_encoder(18, normalization.num_bands, seed=0)
        metadata = {EXPORT_KEY: normalization.to_json(), "image_size": image_size}
        exports[name] = str(
            export.save_encoder(os.path.join(folder, name), model, metadata, overwrite=True)
        )
    return exports


def probe(tree: str, scene: str, encoder: str, batch: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, tree, scene, encoder, str(batch)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/caco_embed_scene")
    parser.add_argument("--width", type=int, default=1933)
    parser.add_argument("--height", type=int, default=1947)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--baseline_tree", default="")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    scene = os.path.join(args.dir, "scene")
    write_scene(scene, args.width, args.height)
    exports = write_encoders(os.path.join(args.dir, "encoders"), args.image_size)
    print(
        f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; scene "
        f"{args.width} x {args.height} px, {args.image_size} px tiles, batch {args.batch}"
    )
    rows = []
    for repeat in range(args.repeats):
        runs = [("this tree", ROOT, "rgb"), ("this tree", ROOT, "all_bands")]
        if args.baseline_tree:
            runs.insert(1 if repeat % 2 == 0 else 0, ("baseline", args.baseline_tree, "rgb"))
        for label, tree, encoder in runs:
            start = time.perf_counter()
            result = probe(tree, scene, exports[encoder], args.batch)
            result.update(tree=label, encoder=encoder, wall_s=time.perf_counter() - start)
            rows.append(result)
            print(json.dumps(result), flush=True)
    for encoder in ("rgb", "all_bands"):
        mine = [
            r for r in rows if r["tree"] == "this tree" and r["encoder"] == encoder and "tiles" in r
        ]
        if mine:
            steady = float(np.median([r["steady_s"] for r in mine]))
            first = float(np.median([r["first_s"] for r in mine]))
            tiles = mine[0]["tiles"]
            model = [r["model_s"] for r in mine if "model_s" in r]
            print(
                f"{encoder}: {tiles} tiles, first {first:.1f} s, steady {steady:.1f} s "
                f"({tiles / steady:.0f} tiles/s)"
                + (f"; the encoder alone {np.median(model):.1f} s" if model else "")
            )
    base = [r["steady_s"] for r in rows if r["tree"] == "baseline" and "steady_s" in r]
    mine = [r["steady_s"] for r in rows if r["tree"] == "this tree" and r["encoder"] == "rgb"]
    if base and mine:
        print(f"rgb steady, this tree / baseline: {np.median(mine) / np.median(base):.2f}")


if __name__ == "__main__":
    main()
