"""What several test modules share: tiny pretraining configs and data, tree comparisons, a
TensorFlow blocker for subprocesses, archives written by hand, prepared records and a fake Earth
Engine."""

from __future__ import annotations

import datetime
import io
import json
import os
import socket
import tarfile
import threading
import zlib

import jax
import numpy as np
import tensorflow_datasets as tfds

from caco_jax import config as config_lib
from caco_jax.data import archive, builder, dataset, layout
from caco_jax.sources.download.client import Acquisition, TransientError
from caco_jax.sources.download.downloader import DownloadSettings
from caco_jax.sources.sampling.files import Site

NUM_LOCATIONS = 16
BATCH = 16


def xla_flags(devices: int) -> str:
    """The suite's XLA flags (tests/conftest.py) for a subprocess with `devices` CPU devices."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    return " ".join([f"--xla_force_host_platform_device_count={devices}", *kept])


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a service or coordinator a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_settings(*tasks, **train_overrides):
    """`tiny_config`, resolved: what pretraining takes."""
    return config_lib.resolve(tiny_config(*tasks, **train_overrides))


def tiny_config(*tasks, **train_overrides):
    """A pretraining config for 32x32 crops, 16-item batches, a 64-key queue and a ResNet-10 of
    width 8 (one block per stage: the tests are about the step, not the network, and compiling it
    is most of their time)."""
    config = config_lib.for_tasks(*(tasks or ("pretrain",)))
    config.augment.crop_size = 32
    config.method.num_negatives = 64
    config.model.embedding_dim = 16
    config.model.depth = 10
    config.model.width = 8
    config.train.batch_size = BATCH
    config.train.bn_mode = "sync"
    config.train.epochs = 2
    config.train.milestones = (1,)
    config.logging.every_steps = 1
    config.logging.progress_bar = False
    config.input.num_threads = 1
    for key, value in train_overrides.items():
        setattr(config.train, key, value)
    config_lib.validate(config)
    return config


class InMemoryLocations:
    """Whole-location arrays ({"pixels", "window", "location_id", ...}) in a list, read like
    `records.Records`; `pixel_reads` counts the acquisitions `pixels` handed out."""

    def __init__(self, locations):
        self.locations = locations
        self.pixel_reads = 0

    def __len__(self):
        return len(self.locations)

    def __getitem__(self, index):
        return self.locations[index]

    def windows(self, index):
        return np.asarray(self.locations[index]["window"])

    def acquisition_counts(self):
        return np.asarray([len(location["window"]) for location in self.locations])

    def location_id(self, index):
        return self.locations[index]["location_id"]

    def pixels(self, index, acquisitions):
        self.pixel_reads += len(acquisitions)
        pixels = self.locations[index]["pixels"]
        if isinstance(pixels, dict):
            return {group: arr[acquisitions] for group, arr in pixels.items()}
        return pixels[acquisitions]


# tests/test_end_to_end.py
END_TO_END_LOCATIONS = 24
END_TO_END_BATCH = 16  # 8 locations: 3 steps per epoch
END_TO_END_EPOCHS = 24
END_TO_END_QUEUE = 16  # 8 keys per window: full after the first step


def end_to_end_config(workdir, **overrides):
    """tests/test_end_to_end.py's run: 24 synthetic locations (half changed), 3 CACo steps per
    epoch of a width-32 ResNet-10, a 16-key queue that real keys fill at the first step, official
    lr and a fast EMA."""
    config = config_lib.for_tasks("synthesize", "prepare", "pretrain", "score_change")
    config.synthetic.num_locations = END_TO_END_LOCATIONS
    config.synthetic.change_fraction = 0.5  # balanced: the AUC has the most pairs
    config.data.data_dir = os.path.join(workdir, "tfds")
    config.data.num_workers = 1
    config.augment.crop_size = 32
    config.method.num_negatives = END_TO_END_QUEUE
    # 1/8 of a ResNet-18's FLOPs and half its layers to compile: the same learning of the change
    # at this size (AUC 0.77 vs 0.72 at seed 0, 12 epochs) in less time.
    config.model.depth = 10
    config.model.width = 32
    config.model.embedding_dim = 32
    config.train.batch_size = END_TO_END_BATCH
    config.train.epochs = END_TO_END_EPOCHS
    config.train.milestones = ()
    # The official lr 0.03 itself at this batch (not scaled down 16x), and a key encoder that
    # follows the query one within a few steps (official m: 0.999).
    config.train.base_learning_rate = 0.03 * 256 / END_TO_END_BATCH
    config.method.key_momentum = 0.99
    config.checkpoint.every_steps = 1000  # only the final checkpoint
    config.logging.every_steps = 1
    config.logging.progress_bar = False
    config.input.num_threads = 1
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(config[section], name, value)
    config_lib.validate(config)
    return config


def fake_source(num_locations=NUM_LOCATIONS, size=32, seed=0):
    """Locations of ten 32x32 acquisitions (five per window) around a per-location base image."""
    rng = np.random.default_rng(seed)
    source = []
    for index in range(num_locations):
        base = rng.integers(0, 256, (1, size, size, 3))
        noise = rng.integers(-20, 21, (10, size, size, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        source.append(
            {"pixels": pixels, "window": np.repeat([0, 1], 5), "location_id": f"{index:06d}"}
        )
    return InMemoryLocations(source)


def fake_batch(seed=0, batch=BATCH, size=32):
    rng = np.random.default_rng(seed)
    return {
        "images": rng.integers(0, 256, (batch, 3, size, size, 3), dtype=np.uint8),
        "item_id": np.arange(batch, dtype=np.int32),
        "window": (np.arange(batch) % 2).astype(np.int32),
        "location_index": (np.arange(batch) // 2).astype(np.int32),
    }


def assert_trees_close(actual, desired, tolerance):
    """Leaf by leaf, max |actual - desired| <= tolerance x the leaf's largest magnitude."""

    def close(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(float(np.max(np.abs(b))), 1e-6) if np.size(b) else 1.0
        error = float(np.max(np.abs(a - b), initial=0.0))
        assert error <= tolerance * scale, f"{error} > {tolerance} x {scale}"

    jax.tree.map(close, actual, desired)


BLOCK_TENSORFLOW = """
import importlib.abc, sys
class _NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError(f"this test forbids importing {name}")
        return None
sys.meta_path.insert(0, _NoTensorFlow())
"""


def environment_without_tensorflow(tmp_path) -> dict:
    """An environment for a subprocess in which ``import tensorflow`` fails (a sitecustomize on
    PYTHONPATH installs the blocker), so a test fails if anything reaches for TensorFlow."""
    folder = tmp_path / "no_tensorflow"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCK_TENSORFLOW)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(folder), os.getcwd(), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


# ----------------------------------------------------------------------------------------------
# Archives in the published layout, written by hand (test_archive, test_builder, test_shard_writer,
# test_pipeline).

RGB_KEEP = frozenset({layout.METADATA_FILE, *(layout.band_file(b) for b in layout.RGB_BANDS)})
RGB_GROUPS = {"rgb": layout.RGB_BANDS}
EARLY = [datetime.datetime(2017, 3, 1) + datetime.timedelta(days=40 * i) for i in range(5)]
LATE = [datetime.datetime(2021, 4, 2) + datetime.timedelta(days=35 * i) for i in range(5)]


def synthetic_folder(tmp_path_factory) -> str:
    """The embedded synthetic archive (3 locations, folder form), made once per session."""
    from caco_jax.sources import synthetic

    output = tmp_path_factory.getbasetemp() / "caco_synthetic"
    path = output / "clean_synthetic_geography"
    if not path.exists():
        synthetic.write_archive(os.fspath(output), num_locations=3, seed=0)
    return os.fspath(path)


def product_id(time: datetime.datetime, index: int = 0) -> str:
    return f"{time:%Y%m%dT%H%M%S}_{time:%Y%m%dT%H%M%S}_T31UDQ_{index:04d}_48923_8339"


def write_location(root, location_id, times, *, bands=layout.RGB_BANDS, seed=0, cloud=12.5):
    """A location folder with one acquisition per time (only `bands`), a preview beside each."""
    rng = np.random.default_rng(seed)
    box = layout.GeoBox.around(45.0 + seed, 7.0 - seed)
    for i, time in enumerate(times):
        folder = os.path.join(root, location_id, product_id(time, i))
        os.makedirs(folder)
        for band in bands:
            pixels = rng.integers(0, 200, size=layout.band_shape(band), dtype=np.uint8)
            layout.write_band_geotiff(os.path.join(folder, layout.band_file(band)), pixels, box)
        with open(os.path.join(folder, layout.METADATA_FILE), "w") as f:
            json.dump({layout.CLOUD_PROPERTY: cloud + i, "SPACECRAFT_NAME": "Sentinel-2A"}, f)
        with open(folder + ".tif", "wb") as f:  # the RGB preview sibling, to be ignored
            f.write(b"preview")


def pack_tar_gz(folder, destination, *, top=True, order=None) -> str:
    """Packs `folder` like `tar -czf` (sorted members), with or without its top folder."""
    arc_root = os.path.basename(folder) if top else ""
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in [*dirnames, *sorted(filenames)]:
            paths.append(os.path.join(dirpath, name))
    paths.sort()
    if order is not None:
        paths = order(paths)
    with tarfile.open(destination, "w:gz", compresslevel=1) as tar:
        for path in paths:
            arcname = os.path.join(arc_root, os.path.relpath(path, folder))
            tar.add(path, arcname=arcname, recursive=False)
    return destination


def split_parts(path, num_parts=4) -> list[str]:
    """Cuts a file byte-wise into `<stem>_part0..` like the published 1M archive."""
    data = open(path, "rb").read()
    stem = path.removesuffix(".tar.gz")
    size = -(-len(data) // num_parts)
    names = []
    for i in range(num_parts):
        names.append(f"{stem}_part{i}")
        with open(names[-1], "wb") as f:
            f.write(data[i * size : (i + 1) * size])
    os.remove(path)
    return names


def decode_all(path, keep=RGB_KEEP, groups=RGB_GROUPS):
    source = archive.find_archive(path)
    return [archive.decode_location(loc, groups) for loc in archive.read_locations(source, keep)]


def as_comparable(decoded):
    """Everything a record holds, as plain values, to compare across input forms."""
    out = []
    for d in decoded:
        example = d.example
        acquisitions = [
            {k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in a.items()}
            for a in example["acquisitions"]
        ]
        out.append(
            (d.location_id, float(example["lat"]), float(example["lon"]), repr(acquisitions))
        )
    return out


# ----------------------------------------------------------------------------------------------
# Prepared records.


def prepare(manual_dir, data_dir, config="rgb", num_workers=2, **kwargs):
    prepared = builder.CacoGeography(
        config=config, data_dir=os.fspath(data_dir), num_workers=num_workers, **kwargs
    )
    prepared.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
    return prepared


def all_records(data_dir, config="rgb"):
    source = dataset.open_records(os.fspath(data_dir), config)
    return sorted((source[i] for i in range(len(source))), key=lambda r: r["location_id"])


def count_record_reads(source) -> list[int]:
    """Makes `source` (`records.Records`) log the key of every record it reads into the returned
    list (pixels are read from the records' serialised bytes, `acquisitions.data_source`)."""
    serialized, keys = source.acquisitions.data_source, []

    class Counting:
        data_source = None

        def __getitem__(self, key):
            keys.append(int(key))
            return serialized[key]

    counting = Counting()
    counting.data_source = counting
    source.acquisitions = counting
    return keys


def assert_same_records(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], dict):
                for group in x[key]:
                    np.testing.assert_array_equal(x[key][group], y[key][group])
            else:
                np.testing.assert_array_equal(x[key], y[key])


def replicated_tar(location_dir, num_locations, destination):
    """A tar.gz of `num_locations` copies of one location folder (cheap to make at any size)."""
    files = []
    for dirpath, _, filenames in os.walk(location_dir):
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            files.append((os.path.relpath(path, location_dir), open(path, "rb").read()))
    with tarfile.open(destination, "w:gz", compresslevel=1) as tar:
        for i in range(num_locations):
            for relative, data in sorted(files):
                info = tarfile.TarInfo(f"caco/{i:06d}/{relative}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return destination


# ----------------------------------------------------------------------------------------------
# A fake Earth Engine (test_download, test_end_to_end).

SETTINGS = DownloadSettings(concurrent_requests=2, retry_base_seconds=0.0)
WINDOWS = SETTINGS.window_dates  # the default windows, 2019 and 2023
SITES = [
    Site("000000", 48.85, 2.35),
    Site("000001", -33.9, 18.6),
    Site("000002", 65.0, 179.999),  # a square across the antimeridian
    Site("000003", 35.7, 139.7),
]


class FakeClient:
    """A scene every 5 days over every site; some cloudy patches, some without data.

    `fail_search` maps location latitudes to the exception their search raises; `scarce` latitudes
    get only two scenes per window; `transient_every` makes every n-th fetch fail once with a
    TransientError; `crash_at_fetch` raises KeyboardInterrupt at that fetch (a Ctrl-C mid-location).
    """

    def __init__(self, fail_search=None, scarce=(), transient_every=0, crash_at_fetch=0):
        self.fail_search = fail_search or {}
        self.scarce = set(scarce)
        self.transient_every = transient_every
        self.crash_at_fetch = crash_at_fetch
        self.fetches = 0
        self.fetched_products = []
        self._lock = threading.Lock()

    def search(self, lat, lon, start, end, max_cloud):
        if lat in self.fail_search:
            raise self.fail_search[lat]
        scenes = []
        day = start
        while day < end:
            time = datetime.datetime.combine(day, datetime.time(10, 30, 21))
            tile = f"T{int(lat * 10) % 100:02d}ABC"
            product_id = f"{time:%Y%m%dT%H%M%S}_{time:%Y%m%dT%H%M%S}_{tile}"
            cloud = zlib.crc32(product_id.encode()) % 30
            if cloud < max_cloud:
                properties = {
                    "system:index": product_id,
                    "system:time_start": int(time.replace(tzinfo=datetime.UTC).timestamp() * 1000),
                    layout.CLOUD_PROPERTY: float(cloud),
                    "MGRS_TILE": tile[1:],
                }
                scenes.append(Acquisition(product_id, time, float(cloud), properties))
            day += datetime.timedelta(days=5)
        return scenes[:2] if lat in self.scarce else scenes

    def fetch(self, acquisition, bands, grid):
        with self._lock:
            self.fetches += 1
            count = self.fetches
            self.fetched_products.append(acquisition.product_id)
        if count == self.crash_at_fetch:
            raise KeyboardInterrupt
        if self.transient_every and count % self.transient_every == 0:
            raise TransientError("Too Many Requests: rate limit")
        return np.stack([fake_band(acquisition.product_id, b, grid.size) for b in bands], -1)


def fake_kind(product_id):
    """Every 4th scene's patch is cloudy, every 7th has no data."""
    h = zlib.crc32(product_id.encode()) // 31
    return "cloudy" if h % 4 == 0 else "nodata" if h % 7 == 0 else "good"


def fake_band(product_id, band, size):
    kind = fake_kind(product_id)
    if kind == "nodata":
        return np.zeros((size, size), np.uint16)
    if band in ("SCL", "QA60"):
        clear, cloud = (4, 9) if band == "SCL" else (0, 1 << 10)
        mask = np.full((size, size), clear, np.uint16)
        if kind == "cloudy":
            mask[:3, :3] = cloud
        return mask
    rng = np.random.default_rng(zlib.crc32(f"{product_id}/{band}".encode()))
    # Smooth fields (JPEG keeps them) spanning reflectances above 1 (clipped).
    base = rng.uniform(200, 12_000)
    ramp = np.linspace(0, 1500, size, dtype=np.float64)
    return (base + ramp[:, None] + ramp[None, :]).clip(1, 65_535).astype(np.uint16)


def write_band_files(folder, values, transform, crs="EPSG:32633"):
    """B4, B3, B2 band files of [3, H, W] uint16 digital numbers."""
    import rasterio

    folder.mkdir(parents=True)
    for band_values, band in zip(values, ("B04", "B03", "B02"), strict=True):
        with rasterio.open(
            folder / f"T33TVF_{band}_10m.tif", "w", driver="GTiff", height=band_values.shape[0],
            width=band_values.shape[1], count=1, dtype="uint16", crs=crs, transform=transform,
        ) as dst:  # fmt: skip
            dst.write(band_values, 1)
