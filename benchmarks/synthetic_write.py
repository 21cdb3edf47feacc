r"""Time to write the synthetic archive, against the floor of writing the same GeoTIFFs alone.

  .venv/bin/python benchmarks/synthetic_write.py                    # 64 and 300 locations
  .venv/bin/python benchmarks/synthetic_write.py --sizes 64 --workers 1 2

For each size: `write_archive` (folder form) with each worker count, then the floor: the same
number of band GeoTIFFs and previews written with constant pixels by the same GDAL calls, one
process, nothing rendered. Wall and CPU seconds (CPU of this process and its workers) are printed,
with the machine's core count and load average, since a shared machine slows wall time.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

import numpy as np


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    fn()
    return time.perf_counter() - wall, _cpu_seconds() - cpu


def _write_floor(root: str, num_locations: int) -> None:
    """The GDAL file writes of an archive of this size, with nothing rendered."""
    import rasterio

    from caco_jax.data import layout
    from caco_jax.sources.synthetic import writer

    box = layout.GeoBox.around(48.85, 2.35)
    pixels = {b: np.full(layout.band_shape(b), 40, np.uint8) for b in layout.BANDS}
    rgb = np.full((3, 264, 264), 120, np.uint8)
    with rasterio.Env():
        for location in range(num_locations):
            for acquisition in range(2 * layout.ACQUISITIONS_PER_WINDOW):
                folder = os.path.join(root, f"{location:06d}", f"{acquisition:02d}")
                os.makedirs(folder)
                for band in layout.BANDS:
                    layout.write_band_geotiff(
                        os.path.join(folder, layout.band_file(band)), pixels[band], box
                    )
                writer.write_preview(folder + ".tif", rgb, box)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 300])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from caco_jax.sources import synthetic
    from caco_jax.sources.sampling import cities

    cities.most_populous_cities()  # a one-off load of the city table, not part of a write
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average before: {os.getloadavg()[0]:.1f}, python {platform.python_version()}"
    )
    scratch = tempfile.mkdtemp(dir=args.dir)
    try:
        for size in args.sizes:
            floor_dir = os.path.join(scratch, "floor")
            floor_wall, floor_cpu = _timed(lambda s=size, d=floor_dir: _write_floor(d, s))
            shutil.rmtree(floor_dir)
            print(
                f"{size:4d} locations  floor (GeoTIFF writes only, 1 process): "
                f"wall {floor_wall:6.1f}s  cpu {floor_cpu:6.1f}s"
            )
            for workers in args.workers:
                out = os.path.join(scratch, f"archive{workers}")
                wall, cpu = _timed(
                    lambda s=size, w=workers, o=out: synthetic.write_archive(
                        o, num_locations=s, num_workers=w
                    )
                )
                megabytes = (
                    sum(
                        os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs
                    )
                    / 2**20
                )
                shutil.rmtree(out)
                print(
                    f"{size:4d} locations  write_archive, {workers} process(es): "
                    f"wall {wall:6.1f}s  cpu {cpu:6.1f}s  ({megabytes:.0f} MiB; "
                    f"wall / floor wall = {wall / floor_wall:.2f}, "
                    f"cpu / floor cpu = {cpu / floor_cpu:.2f})"
                )
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
