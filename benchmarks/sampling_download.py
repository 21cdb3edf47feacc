r"""Cost of building a new archive: sampling locations, and the downloader up to Earth Engine.

  .venv/bin/python benchmarks/sampling_download.py
  .venv/bin/python benchmarks/sampling_download.py --locations 20000 --download-locations 16

Sampling: the vectorised sampler (`sample_locations`, 10,000 cities) against a one-draw-at-a-time
loop with the same maths, in the same run. Downloading: an in-process fake client (no network), so
what is measured is our side: Earth Engine requests and bytes requested per location (counted at the
client boundary; 30 % of tried scenes have a cloudy patch) and the seconds per location spent
converting and writing GeoTIFFs, against the floor of `write_location` alone on the same images.
Earth Engine latency is not measured (no access from this machine).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from caco_jax.sources.download import downloader, writer
from caco_jax.sources.download.client import Acquisition
from caco_jax.sources.sampling import geodesy
from caco_jax.sources.sampling.cities import most_populous_cities
from caco_jax.sources.sampling.files import Site
from caco_jax.sources.sampling.landmask import is_land
from caco_jax.sources.sampling.sampler import sample_locations


class _Fake:
    """A scene every 5 days; 30 % of patches cloudy; smooth uint16 fields."""

    def __init__(self):
        self.requests = 0
        self.bytes = 0
        self._lock = threading.Lock()

    def search(self, lat, lon, start, end, max_cloud):
        with self._lock:
            self.requests += 1
        days = range(0, (end - start).days, 5)
        times = [
            datetime.datetime.combine(start, datetime.time(10, 30)) + datetime.timedelta(d)
            for d in days
        ]
        ids = [f"{t:%Y%m%dT%H%M%S}_{t:%Y%m%dT%H%M%S}_T31UDQ" for t in times]
        return [
            Acquisition(i, t, 1.0, {"system:index": i, "CLOUDY_PIXEL_PERCENTAGE": 1.0})
            for i, t in zip(ids, times, strict=True)
        ]

    def fetch(self, acquisition, bands, grid):
        cloudy = zlib.crc32(acquisition.product_id.encode()) % 10 < 3
        ramp = np.linspace(300, 3000, grid.size, dtype=np.float32)
        pixels = np.repeat((ramp[:, None] + ramp[None, :])[..., None], len(bands), -1).astype(
            np.uint16
        )
        if bands[-1] == "SCL":
            pixels[..., -1] = 9 if cloudy else 4
        with self._lock:
            self.requests += 1
            self.bytes += pixels.nbytes
        return pixels


def _naive_sample(n, cities, sigma_m, rng):
    out = []
    while len(out) < n:
        c = rng.integers(len(cities))
        while True:
            east, north = rng.normal(0, sigma_m, 2)
            lat, lon = geodesy.destination(cities.lat[c], cities.lon[c], east, north)
            if is_land(lat, lon):
                out.append((float(lat), float(lon)))
                break
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--locations", type=int, default=10_000)
    parser.add_argument("--naive-locations", type=int, default=1_000)
    parser.add_argument("--download-locations", type=int, default=8)
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}"
    )

    t = time.perf_counter()
    is_land(0.0, 0.0)
    print(f"land mask load: {time.perf_counter() - t:.1f} s (once per process)")
    cities = most_populous_cities()
    t = time.perf_counter()
    locations = sample_locations(args.locations, cities, seed=0)
    vectorised = (time.perf_counter() - t) / args.locations
    t = time.perf_counter()
    locations_spaced = sample_locations(args.locations, cities, seed=0, min_spacing_m=3740.0)
    spaced = (time.perf_counter() - t) / args.locations
    t = time.perf_counter()
    _naive_sample(args.naive_locations, cities, 5000.0, np.random.default_rng(0))
    naive = (time.perf_counter() - t) / args.naive_locations
    print(
        f"sampling, per location: vectorised {vectorised * 1e6:.0f} us "
        f"({args.locations} locations, {locations.counts['sea']} sea draws redrawn), "
        f"with 3.74 km spacing {spaced * 1e6:.0f} us ({locations_spaced.counts['too_close']} "
        f"too close), one draw at a time {naive * 1e6:.0f} us ({args.naive_locations} locations); "
        f"vectorised is {naive / vectorised:.1f}x faster"
    )

    root = tempfile.mkdtemp()
    try:
        sites = [Site(f"{i:06d}", 40.0 + 0.1 * i, 10.0) for i in range(args.download_locations)]
        per_location = {}
        for workers in (1, 2):
            client = _Fake()
            settings = downloader.DownloadSettings(concurrent_requests=workers)
            t = time.perf_counter()
            summary = downloader.download_all(
                client, sites, os.path.join(root, f"w{workers}"), settings, progress=False
            )
            per_location[workers] = (time.perf_counter() - t) / len(sites)
            per_request = client.requests / len(sites)
            megabytes = client.bytes / len(sites) / 1e6
            print(
                f"download (fake client, {workers} worker(s)): {per_location[workers]:.2f} s per "
                f"location, {per_request:.1f} requests and {megabytes:.2f} MB requested per "
                f"location ({summary.written} written)"
            )
        calls = downloader._Calls(settings, threading.Event())
        images = downloader.download_location(_Fake(), sites[0], settings, calls)
        t = time.perf_counter()
        for i in range(3):
            writer.write_location(os.path.join(root, "floor"), f"{i:06d}", images)
        floor = (time.perf_counter() - t) / 3
        folder = os.path.join(root, "floor", "000000")
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
        print(
            f"write_location alone: {floor:.2f} s per location; 1-worker download / floor = "
            f"{per_location[1] / floor:.2f}; {size / 1e6:.2f} MB on disk per location"
        )
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
