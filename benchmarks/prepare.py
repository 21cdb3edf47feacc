r"""Preparing records from a synthetic archive vs. plain extraction (the floor); pixel encodings.

  python benchmarks/prepare.py --num_locations=300 --archive_dir=/tmp/caco_bench

1. Writes (once, cached in --archive_dir) a synthetic archive of --num_locations locations as one
   `.tar.gz`, exactly in the published layout.
2. Times, in the same run and alternating --repeats times, `tar -xzf` of that archive into a
   temporary folder (what the official code needs before it can train) and the `caco_geography`
   builder preparing the same archive into array_record records (streaming, no extraction), and
   prints both wall times, their ratio, and locations/s.
3. Compares pixel encodings of the `rgb` records on --encoding_locations locations: bytes on disk
   per record (array_record file, as the builder writes it) and the time to encode+serialize (in
   the builder's workers) and to read+decode one record; and the CPU per location of each stage
   of preparation, with the array_record compression options compared.
"""

from __future__ import annotations

import io
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_NUM_LOCATIONS = flags.DEFINE_integer("num_locations", 300, "Locations in the synthetic archive.")
_ARCHIVE_DIR = flags.DEFINE_string("archive_dir", "/tmp/caco_bench", "Where the archive is cached.")
_CONFIGS = flags.DEFINE_list("configs", ["rgb"], "Builder configs to time.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Alternating repeats of extraction and preparation.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Decode processes; 0 = one per core.")
_ENCODING_LOCATIONS = flags.DEFINE_integer("encoding_locations", 20, "Records per encoding.")
_BASELINE_TREE = flags.DEFINE_string(
    "baseline_tree",
    "",
    "Another checkout of caco_jax (e.g. `git worktree add /tmp/old <commit>`): its builder also "
    "prepares the archive, in a subprocess, alternating with the others (wall time only).",
)

_BASELINE_SCRIPT = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import tensorflow_datasets as tfds
from caco_jax.data import builder
if __name__ == "__main__":
    os.environ["TQDM_DISABLE"] = "1"
    tfds.disable_progress_bar()
    start = time.perf_counter()
    builder.CacoGeography(config=sys.argv[2], data_dir=sys.argv[3]).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=sys.argv[4]))
    print("SECONDS", time.perf_counter() - start)
"""


def main(argv):
    del argv
    import tensorflow_datasets as tfds

    from caco_jax.data import builder
    from caco_jax.sources import synthetic

    name = "clean_synthetic_geography"
    folder = os.path.join(_ARCHIVE_DIR.value, f"{_NUM_LOCATIONS.value}")
    tar_path = os.path.join(folder, f"{name}.tar.gz")
    if not os.path.exists(tar_path):
        print(f"writing a synthetic archive of {_NUM_LOCATIONS.value} locations to {tar_path} ...")
        synthetic.write_archive(
            folder,
            num_locations=_NUM_LOCATIONS.value,
            form="tar.gz",
            num_workers=os.cpu_count() or 1,
        )
    size_mb = os.path.getsize(tar_path) / 2**20
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average before {os.getloadavg()[0]:.1f}; archive {tar_path}: {size_mb:.0f} MiB, "
        f"{_NUM_LOCATIONS.value} locations"
    )

    def extract():
        """(wall s, CPU s of tar and gzip)."""
        with tempfile.TemporaryDirectory(dir=_ARCHIVE_DIR.value) as target:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(["tar", "-xzf", tar_path, "-C", target], check=True)
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            return seconds, cpu

    def prepare(config):
        """(wall s, CPU s of this process and its decode workers, locations, record bytes)."""
        with tempfile.TemporaryDirectory(dir=_ARCHIVE_DIR.value) as data_dir:
            meter = _TreeCpu()
            start = time.perf_counter()
            prepared = builder.CacoGeography(
                config=config, data_dir=data_dir, num_workers=_NUM_WORKERS.value
            )
            prepared.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=folder)
            )
            seconds = time.perf_counter() - start
            cpu = meter.stop()
            written = prepared.info.metadata["locations_written"]
            size = sum(os.path.getsize(f) for f in prepared.data_path.glob("*.array_record*"))
            return seconds, cpu, written, size

    def prepare_baseline(config):
        """Wall s of the --baseline_tree checkout's builder on the same archive."""
        with tempfile.TemporaryDirectory(dir=_ARCHIVE_DIR.value) as data_dir:
            script = os.path.join(data_dir, "baseline.py")
            with open(script, "w") as f:
                f.write(_BASELINE_SCRIPT)
            output = subprocess.run(
                [sys.executable, script, _BASELINE_TREE.value, config, data_dir + "/d", folder],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            return float(output.split("SECONDS")[-1])

    tfds.disable_progress_bar()
    os.environ["TQDM_DISABLE"] = "1"  # the builder's bar, in locations/s
    rows = []
    for config in _CONFIGS.value:
        tars, prepares, baselines = [], [], []
        for _ in range(_REPEATS.value):
            tars.append(extract())
            seconds, cpu, written, size = prepare(config)
            prepares.append((seconds, cpu))
            line = (
                f"{config}: tar -xzf {tars[-1][0]:.1f} s ({tars[-1][1]:.1f} CPU s), "
                f"prepare {seconds:.1f} s ({cpu:.1f} CPU s)"
            )
            if _BASELINE_TREE.value:
                baselines.append(prepare_baseline(config))
                line += f", baseline prepare {baselines[-1]:.1f} s"
            print(line, flush=True)
        rows.append((config, min(tars), min(prepares), written, size))
        if baselines:
            print(
                f"{config}: baseline ({_BASELINE_TREE.value}) best {min(baselines):.1f} s, "
                f"this tree best {min(prepares)[0]:.1f} s: baseline / this tree "
                f"{min(baselines) / min(prepares)[0]:.2f}"
            )
    print(
        "\n| config | `tar -xzf` wall s (CPU s) | prepare wall s (CPU s) | prepare / tar, wall "
        "(CPU) | locations/s wall (per CPU s) | records MiB |"
    )
    print("|---|---|---|---|---|---|")
    for config, (tar_s, tar_cpu), (prep_s, prep_cpu), written, size in rows:
        print(
            f"| {config} | {tar_s:.1f} ({tar_cpu:.1f}) | {prep_s:.1f} ({prep_cpu:.1f}) | "
            f"{prep_s / tar_s:.2f} ({prep_cpu / tar_cpu:.2f}) | "
            f"{written / prep_s:.1f} ({written / prep_cpu:.1f}) | {size / 2**20:.0f} |"
        )
    print(
        f"(best of {_REPEATS.value} alternating runs each; load average after "
        f"{os.getloadavg()[0]:.1f})"
    )
    compare_encodings(tar_path, _ENCODING_LOCATIONS.value)


class _TreeCpu:
    """CPU seconds of this process and its descendants (the decode workers are children of the
    forkserver, so rusage does not see them): a thread samples their CPU times every 0.2 s."""

    def __init__(self):
        import threading

        import psutil

        self._me = psutil.Process()
        self._start = self._me.cpu_times()
        self._others: dict[int, float] = {}
        self._sample_once()
        self._baseline = dict(self._others)  # e.g. a forkserver left by an earlier run
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._done.wait(0.2):
            self._sample_once()

    def _sample_once(self):
        import psutil

        for child in self._me.children(recursive=True):
            try:
                times = child.cpu_times()
            except psutil.Error:
                continue
            self._others[child.pid] = times.user + times.system

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        now = self._me.cpu_times()
        mine = now.user + now.system - self._start.user - self._start.system
        return mine + sum(t - self._baseline.get(pid, 0.0) for pid, t in self._others.items())


def compare_encodings(tar_path: str, num_locations: int) -> None:
    """Size on disk and encode/decode time per record of the rgb pixels in each encoding."""
    import itertools

    import tensorflow_datasets as tfds
    from array_record.python import array_record_module
    from PIL import Image
    from rasterio.io import MemoryFile

    from caco_jax.data import archive, builder, layout, shard_writer

    keep = frozenset({layout.METADATA_FILE, *(layout.band_file(b) for b in layout.RGB_BANDS)})
    # Where the CPU goes per location, one stage at a time in this process.
    cpu = {}
    start = time.process_time()
    locations = list(
        itertools.islice(
            archive.read_locations(archive.find_archive(tar_path), keep), num_locations
        )
    )
    cpu["stream + gunzip + untar (parent)"] = time.process_time() - start
    start = time.process_time()
    examples = [
        archive.decode_location(loc, builder.PIXEL_GROUPS["rgb"]).example for loc in locations
    ]
    cpu["GeoTIFF decode (workers)"] = time.process_time() - start
    examples = [e for e in examples if e is not None]
    rgb_features = builder.CacoGeography(config="rgb", data_dir=tempfile.gettempdir()).info.features
    start = time.process_time()
    serialized = [rgb_features.serialize_example(e) for e in examples]
    cpu["TFDS encode + serialize (workers)"] = time.process_time() - start
    compression = {}
    with tempfile.TemporaryDirectory() as tmp:
        for options in (shard_writer.RECORD_OPTIONS, "group_size:1", "group_size:1,snappy"):
            path = os.path.join(tmp, "r")
            start = time.process_time()
            writer = array_record_module.ArrayRecordWriter(path, options)
            for s in serialized:
                writer.write(s)
            writer.close()
            written = time.process_time() - start
            reader = array_record_module.ArrayRecordReader(path)
            start = time.process_time()
            for i in range(len(serialized)):
                reader.read([i])
            read = time.process_time() - start
            reader.close()
            compression[options] = (written, read, os.path.getsize(path))
    cpu[f"array_record write, `{shard_writer.RECORD_OPTIONS}` (workers)"] = compression[
        shard_writer.RECORD_OPTIONS
    ][0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(f"gzip -dc {tar_path} > /dev/null", shell=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    gunzip = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    cpu["(reference) gzip -dc of the archive"] = gunzip * len(locations) / _NUM_LOCATIONS.value
    print(f"\nCPU per location ({len(locations)} locations, rgb):")
    print("| stage | CPU ms per location |")
    print("|---|---|")
    for stage, seconds in cpu.items():
        print(f"| {stage} | {seconds / len(locations) * 1e3:.1f} |")
    print("\narray_record options for the serialized rgb records (group_size:1 = TFDS's, zstd:3):")
    print("| options | write CPU ms/record | read CPU ms/record | MiB per record |")
    print("|---|---|---|---|")
    for options, (written, read, size) in compression.items():
        n = len(serialized)
        print(
            f"| `{options}` | {written / n * 1e3:.1f} | {read / n * 1e3:.1f} | "
            f"{size / n / 2**20:.3f} |"
        )
    raw_bytes = sum(a["rgb"].nbytes for e in examples for a in e["acquisitions"]) / len(examples)

    def png(pixels):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        return buffer.getvalue()

    def features(pixel_feature):
        return tfds.features.FeaturesDict(
            {
                "location_id": tfds.features.Text(),
                "acquisitions": tfds.features.Sequence({"rgb": pixel_feature}),
            }
        )

    tensor = dict(shape=(264, 264, 3), dtype=np.uint8)
    encodings = {
        "Tensor NONE (int64 lists)": (features(tfds.features.Tensor(**tensor)), None, None),
        "Tensor BYTES (chosen)": (
            features(tfds.features.Tensor(**tensor, encoding=tfds.features.Encoding.BYTES)),
            None,
            None,
        ),
        "Tensor ZLIB": (
            features(tfds.features.Tensor(**tensor, encoding=tfds.features.Encoding.ZLIB)),
            None,
            None,
        ),
        "PNG bytes (Pillow)": (
            features(tfds.features.Tensor(shape=(), dtype=np.object_)),
            png,
            lambda b: np.asarray(Image.open(io.BytesIO(b))),
        ),
    }
    print(
        f"\nrgb pixel encodings, {len(examples)} records of 10 acquisitions "
        f"(raw uint8 {raw_bytes / 2**20:.2f} MiB per record):"
    )
    print(
        "| encoding | MiB per record on disk | vs raw | encode+serialize ms/record | "
        "read+decode ms/record |"
    )
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, (feature, encode, decode) in encodings.items():
            path = os.path.join(tmp, "records.array_record")
            start = time.perf_counter()
            serialized = []
            for e in examples:
                acquisitions = [
                    {"rgb": encode(a["rgb"]) if encode else a["rgb"]} for a in e["acquisitions"]
                ]
                serialized.append(
                    feature.serialize_example(
                        {"location_id": e["location_id"], "acquisitions": acquisitions}
                    )
                )
            encode_ms = (time.perf_counter() - start) / len(examples) * 1e3
            writer = array_record_module.ArrayRecordWriter(path, shard_writer.RECORD_OPTIONS)
            for s in serialized:
                writer.write(s)
            writer.close()
            size = os.path.getsize(path) / len(examples)
            reader = array_record_module.ArrayRecordReader(path)
            start = time.perf_counter()
            for i in range(len(examples)):
                record = feature.deserialize_example_np(reader.read([i])[0])
                pixels = record["acquisitions"]["rgb"]
                pixels = np.stack([decode(b) for b in pixels]) if decode else np.asarray(pixels)
                assert pixels.shape == (len(examples[i]["acquisitions"]), 264, 264, 3)
            decode_ms = (time.perf_counter() - start) / len(examples) * 1e3
            reader.close()
            print(
                f"| {label} | {size / 2**20:.2f} | {size / raw_bytes:.2f} | {encode_ms:.1f} | "
                f"{decode_ms:.1f} |"
            )

    # Reference: keeping the source JPEG GeoTIFFs and decoding them with GDAL at training time.
    band_bytes = [
        [
            loc.acquisitions[p][layout.band_file(b)]
            for p in sorted(loc.acquisitions)
            for b in layout.RGB_BANDS
        ]
        for loc in locations
    ]
    size = np.mean([sum(len(b) for b in files) for files in band_bytes])
    start = time.perf_counter()
    for files in band_bytes:
        for data in files:
            with MemoryFile(data) as memory, memory.open() as dataset:
                dataset.read(1)
    decode_ms = (time.perf_counter() - start) / len(band_bytes) * 1e3
    print(
        f"| (reference) source JPEG GeoTIFF bytes, GDAL decode | {size / 2**20:.2f} | "
        f"{size / raw_bytes:.2f} | - | {decode_ms:.1f} |"
    )


if __name__ == "__main__":
    app.run(main)
