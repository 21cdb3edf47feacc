r"""Preparing records from a synthetic archive vs. plain extraction (the floor); pixel encodings.

  python benchmarks/prepare.py --num_locations=300 --archive_dir=/tmp/caco_bench

1. Writes (once, cached in --archive_dir) a synthetic archive of --num_locations locations as one
   `.tar.gz`, exactly in the published layout.
2. Times, in the same run and alternating --repeats times, `tar -xzf` of that archive into a
   temporary folder (what the official code needs before it can train) and the `caco_geography`
   builder preparing the same archive into array_record records (streaming, no extraction), and
   prints both wall times, their ratio, and locations/s.
3. Compares pixel encodings of the `rgb` records on --encoding_locations locations: bytes on disk
   per record (array_record file, as TFDS writes it) and the time to encode+serialize (in the
   builder's parent process) and to read+decode one record.
"""

from __future__ import annotations

import io
import os
import platform
import subprocess
import tempfile
import time

import numpy as np
from absl import app, flags

_NUM_LOCATIONS = flags.DEFINE_integer("num_locations", 300, "Locations in the synthetic archive.")
_ARCHIVE_DIR = flags.DEFINE_string("archive_dir", "/tmp/caco_bench", "Where the archive is cached.")
_CONFIGS = flags.DEFINE_list("configs", ["rgb"], "Builder configs to time.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Alternating repeats of extraction and preparation.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Decode processes; 0 = one per core.")
_ENCODING_LOCATIONS = flags.DEFINE_integer("encoding_locations", 20, "Records per encoding.")


def main(argv):
    del argv
    import tensorflow_datasets as tfds

    from caco_jax.data import builder, synthetic

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
        with tempfile.TemporaryDirectory(dir=_ARCHIVE_DIR.value) as target:
            start = time.perf_counter()
            subprocess.run(["tar", "-xzf", tar_path, "-C", target], check=True)
            return time.perf_counter() - start

    def prepare(config):
        with tempfile.TemporaryDirectory(dir=_ARCHIVE_DIR.value) as data_dir:
            start = time.perf_counter()
            prepared = builder.CacoGeography(
                config=config, data_dir=data_dir, num_workers=_NUM_WORKERS.value
            )
            prepared.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=folder)
            )
            seconds = time.perf_counter() - start
            written = prepared.info.metadata["locations_written"]
            size = sum(os.path.getsize(f) for f in prepared.data_path.glob("*.array_record*"))
            return seconds, written, size

    tfds.disable_progress_bar()
    os.environ["TQDM_DISABLE"] = "1"  # the builder's bar, in locations/s
    rows = []
    for config in _CONFIGS.value:
        tar_times, prepare_times = [], []
        for _ in range(_REPEATS.value):
            tar_times.append(extract())
            seconds, written, size = prepare(config)
            prepare_times.append(seconds)
            print(f"{config}: tar -xzf {tar_times[-1]:.1f} s, prepare {seconds:.1f} s", flush=True)
        rows.append((config, min(tar_times), min(prepare_times), written, size))
    print("\n| config | `tar -xzf` (s) | prepare (s) | prepare / tar | locations/s | records MiB |")
    print("|---|---|---|---|---|---|")
    for config, tar_s, prep_s, written, size in rows:
        print(
            f"| {config} | {tar_s:.2f} | {prep_s:.2f} | {prep_s / tar_s:.2f} | "
            f"{written / prep_s:.1f} | {size / 2**20:.0f} |"
        )
    print(
        f"(best of {_REPEATS.value} alternating runs each; load average after "
        f"{os.getloadavg()[0]:.1f})"
    )
    compare_encodings(tar_path, _ENCODING_LOCATIONS.value)


def compare_encodings(tar_path: str, num_locations: int) -> None:
    """Size on disk and encode/decode time per record of the rgb pixels in each encoding."""
    import itertools

    import tensorflow_datasets as tfds
    from array_record.python import array_record_module
    from PIL import Image
    from rasterio.io import MemoryFile

    from caco_jax.data import archive, builder, layout

    keep = frozenset({layout.METADATA_FILE, *(layout.band_file(b) for b in layout.RGB_BANDS)})
    locations = list(
        itertools.islice(
            archive.read_locations(archive.find_archive(tar_path), keep), num_locations
        )
    )
    examples = [
        archive.decode_location(loc, builder.PIXEL_GROUPS["rgb"]).example for loc in locations
    ]
    examples = [e for e in examples if e is not None]
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
            writer = array_record_module.ArrayRecordWriter(path, "group_size:1")  # as TFDS writes
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
