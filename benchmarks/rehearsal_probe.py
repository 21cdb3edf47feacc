r"""One measurement of benchmarks/rehearsal.py, run in its own process against any checkout.

  python benchmarks/rehearsal_probe.py prepare --tree T --archive A --data_dir D --num_workers W
  python benchmarks/rehearsal_probe.py pipeline --tree T --data_dir D [--batches 200 --batch 16]

`--tree` is the checkout whose `caco_jax` is imported (put first on sys.path), so the same probe
measures the current tree and an older one side by side. Only public entry points are used: the
`caco_geography` builder (`caco_jax.data.builder.CacoGeography`), `dataset.open_records`,
`records.location_table`, `pipeline.Stream` / `pipeline.make_pipeline`.
Prints one JSON line (prefixed `RESULT `) with the figures; memory is sampled from outside.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time


def _io_counters() -> dict[str, int]:
    """This process's read counters: `rchar` (bytes returned by read calls, page cache or not)
    and `read_bytes` (bytes fetched from the block device)."""
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def prepare(args) -> dict:
    import tensorflow_datasets as tfds

    from caco_jax.data import builder

    os.environ["TQDM_DISABLE"] = "1"
    tfds.disable_progress_bar()
    start = time.perf_counter()
    prepared = builder.CacoGeography(
        config=args.config,
        data_dir=args.data_dir,
        num_workers=args.num_workers,
        archive_path=args.archive,
    )
    prepared.download_and_prepare()
    seconds = time.perf_counter() - start
    files = glob.glob(os.path.join(os.fspath(prepared.data_path), "*"))
    return dict(
        seconds=seconds,
        locations=int(prepared.info.metadata["locations_written"]),
        records=int(prepared.info.splits["train"].num_examples),
        record_bytes=int(prepared.info.splits["train"].num_bytes),
        dataset_bytes=sum(os.path.getsize(f) for f in files if os.path.isfile(f)),
    )


def pipeline(args) -> dict:
    from caco_jax import methods
    from caco_jax.data import dataset, records
    from caco_jax.data import pipeline as pipeline_lib

    start = time.perf_counter()
    source = dataset.open_records(args.data_dir, args.config)
    open_seconds = time.perf_counter() - start
    settings = pipeline_lib.InputSettings(num_workers=0, num_threads=args.threads)
    counts = int(source.acquisition_counts().sum())  # an epoch over acquisitions (moco) needs it
    stream = pipeline_lib.Stream.of(methods.get(args.method), args.batch, 0, len(source), counts)
    batches = pipeline_lib.make_pipeline(settings, source, stream)
    next(batches)  # opens the files and fills the prefetch buffer; not counted
    io_before, cpu_before = _io_counters(), time.process_time()
    start = time.perf_counter()
    items = 0
    for _ in range(args.batches):
        items += len(next(batches)["item_id"])
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu_before
    io_after = _io_counters()
    # What the change report reads at the end of the first epoch: (id, lat, lon) of every location
    # (1.0.0 reads every record, 2.0.0 the side index).
    start = time.perf_counter()
    table = records.location_table(source)
    table_seconds = time.perf_counter() - start
    return dict(
        open_seconds=open_seconds,
        items=items,
        seconds=seconds,
        cpu_seconds=cpu,
        rchar=io_after["rchar"] - io_before["rchar"],
        read_bytes=io_after["read_bytes"] - io_before["read_bytes"],
        locations=len(source),
        location_table_seconds=table_seconds,
        location_table_rows=len(table),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("prepare", "pipeline"):
        command = commands.add_parser(name)
        command.add_argument("--tree", required=True, help="checkout whose caco_jax is measured")
        command.add_argument("--data_dir", required=True, help="TFDS data_dir of the records")
        command.add_argument("--config", default="rgb", help="builder config")
    commands.choices["prepare"].add_argument("--archive", required=True)
    commands.choices["prepare"].add_argument("--num_workers", type=int, required=True)
    measure = commands.choices["pipeline"]
    measure.add_argument("--method", default="caco")
    measure.add_argument("--batch", type=int, default=16, help="items per batch")
    measure.add_argument("--batches", type=int, default=200, help="batches timed")
    measure.add_argument("--threads", type=int, default=2, help="grain reader threads")
    args = parser.parse_args()
    tree = os.path.abspath(args.tree)
    sys.path.insert(0, tree)
    import caco_jax

    if os.path.dirname(os.path.dirname(os.path.abspath(caco_jax.__file__))) != tree:
        sys.exit(f"imported caco_jax from {caco_jax.__file__}, not from --tree {tree}")
    result = {"prepare": prepare, "pipeline": pipeline}[args.command](args)
    print("RESULT " + json.dumps({"caco_jax": caco_jax.__file__, **result}), flush=True)


if __name__ == "__main__":
    main()
