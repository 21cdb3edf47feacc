"""Decode locations and write their records in worker processes, straight into array_record shards.

The parent process only streams the archive (gunzip + untar) and hands each location's raw bytes
to a worker. The worker decodes the GeoTIFFs (GDAL), serialises one record per acquisition (TFDS
features), appends the location's records, zstd-compressed and one chunk each, to a shard file of
its own, and sends back what the side index needs (`location_index.IndexedLocation`). Nothing
heavy passes back through the parent, and no single-threaded writing pass follows the last
location (TFDS's generic writer re-reads, shuffles and compresses every record in the parent after
generation), so preparation scales with the cores until the archive stream itself is the limit
(see BENCHMARKS.md).

Shard layout, the same for any number of workers, so every machine prepares identical records:
location n of the stream (skipped ones included) belongs to lane ``n % LANES`` and piece
``n // (LANES * LOCATIONS_PER_SHARD)``; each (piece, lane) pair is one shard, shards are ordered by
(piece, lane), and shards that hold no record are left out. Within a shard the locations follow
stream order, each location's acquisition records contiguous and in time order. Worker w writes
the lanes ``w, w + W, ...``, so each lane's records are appended in stream order by one process;
W is the largest divisor of LANES not above the requested number (48 has many: 1-4, 6, 8, 12, 16,
24, 48), so every worker gets the same share.

Paths are local files (`os` and array_record's writer): the data_dir must be a local or mounted
filesystem, not ``gs://``.

At most `QUEUE_DEPTH + 1` locations per worker are in flight, so memory does not grow with the
archive. A worker that raises or dies stops the whole build with an error naming the location.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import queue as queue_lib
import traceback
from collections.abc import Callable, Iterable, Mapping

from caco_jax.data import archive, location_index
from caco_jax.runtime import workers as workers_lib

LANES = 48
# At most about 1 GiB per shard for `rgb` records (~1 MiB per location), TFDS's usual shard size.
LOCATIONS_PER_SHARD = 1024
# One record per chunk (group_size:1): a random read decompresses that acquisition alone. zstd
# level 1, not array_record's default 3: 30-45 % less CPU to write and no slower to read, for about
# 10 % more disk (decoded JPEG pixels are noisy; see BENCHMARKS.md "Preparing records").
RECORD_OPTIONS = "group_size:1,zstd:1"
QUEUE_DEPTH = 2
_POLL_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class WrittenLocation:
    """A worker's account of one location: `decoded` without its pixels (those are in the shard),
    the rank of its shard in record order, and what the side index keeps of it (None when the
    location was skipped)."""

    decoded: archive.DecodedLocation
    shard_rank: int
    indexed: location_index.IndexedLocation | None

    @property
    def num_acquisitions(self) -> int:
        return len(self.indexed.windows) if self.indexed else 0


@dataclasses.dataclass(frozen=True)
class Shard:
    path: str
    num_records: int


class WorkerError(RuntimeError):
    """A worker raised or died; names the location(s) it was working on."""


def usable_workers(requested: int) -> int:
    """The largest divisor of LANES not above `requested` (at least 1): equal shares of lanes."""
    return max(w for w in range(1, LANES + 1) if LANES % w == 0 and w <= max(requested, 1))


def shard_of(n: int) -> tuple[int, int]:
    """(piece, lane) of location n of the stream."""
    return n // (LANES * LOCATIONS_PER_SHARD), n % LANES


def shard_path(directory: str, prefix: str, piece: int, lane: int) -> str:
    return os.path.join(directory, f"{prefix}.piece{piece:06d}-lane{lane:02d}.tmp")


def write_shards(
    locations: Iterable[archive.Location],
    *,
    groups: Mapping[str, tuple[str, ...]],
    features,
    directory: str,
    prefix: str,
    num_workers: int,
    on_location: Callable[[WrittenLocation], None],
) -> list[Shard]:
    """Decodes and writes every location of `locations` (see the module docstring).

    `features` is the dataset's `tfds.features.FeaturesDict` of one acquisition record (it encodes
    and serialises a record); `on_location` is called in stream order, once per location. Returns
    the non-empty shards in dataset order (`num_records` counts acquisitions); their files are named
    by `shard_path`, for the caller to rename.
    """
    num_workers = usable_workers(num_workers)
    # forkserver, not fork: the parent may run JAX's threads; the server forks cheap workers.
    context = workers_lib.context("forkserver")
    context.set_forkserver_preload(
        ["caco_jax.data.archive", "rasterio", "tensorflow_datasets", "array_record.python"]
    )
    outbox = context.Queue()
    inboxes = [context.Queue(maxsize=QUEUE_DEPTH) for _ in range(num_workers)]
    workers = [
        context.Process(
            target=_worker_main,
            args=(index, inboxes[index], outbox, dict(groups), features, directory, prefix),
            daemon=True,
            name=f"caco-shard-writer-{index}",
        )
        for index in range(num_workers)
    ]
    for worker in workers:
        worker.start()
    collector = _Collector(workers, outbox, on_location)
    finished = False
    try:
        for n, location in enumerate(locations):
            piece, lane = shard_of(n)
            collector.dispatched[n] = (lane % num_workers, location.location_id)
            collector.put(inboxes[lane % num_workers], (n, piece, lane, location))
        for inbox in inboxes:
            collector.put(inbox, None)
        counts = collector.wait_until_done()
        finished = True
    finally:
        for worker in workers:
            # After "done" a worker is only exiting; after a failure, stop it at once.
            worker.join(timeout=_POLL_SECONDS if finished else 0)
            if worker.is_alive():
                worker.terminate()
                worker.join()
        # After a failure an inbox may hold tasks no worker will read; without this, the
        # queue's feeder thread would block the interpreter's exit on the full pipe.
        for inbox in inboxes:
            inbox.cancel_join_thread()
            inbox.close()
        outbox.close()
    return [
        Shard(shard_path(directory, prefix, piece, lane), count)
        for (piece, lane), count in sorted(counts.items())
        if count
    ]


class _Collector:
    """The parent's side: feeds the inboxes, passes results on in stream order, watches workers."""

    def __init__(self, workers, outbox, on_location):
        self.workers = workers
        self.outbox = outbox
        self.on_location = on_location
        self.dispatched: dict[int, tuple[int, str]] = {}  # location n -> (worker, location id)
        self.results: dict[int, WrittenLocation] = {}  # finished ahead of an earlier location
        self.next_index = 0
        self.counts: dict[tuple[int, int], int] = {}
        self.done: set[int] = set()

    def put(self, inbox, item) -> None:
        while True:
            self.drain(block=False)
            try:
                inbox.put(item, timeout=_POLL_SECONDS)
                return
            except queue_lib.Full:
                self.check_alive()

    def wait_until_done(self) -> dict[tuple[int, int], int]:
        while len(self.done) < len(self.workers):
            if not self.drain(block=True):
                self.check_alive()
        return self.counts

    def drain(self, block: bool) -> bool:
        """Handles the messages waiting in the outbox (waiting a little for one if `block`)."""
        got = False
        while True:
            try:
                message = self.outbox.get(block=block and not got, timeout=_POLL_SECONDS)
            except queue_lib.Empty:
                return got
            got = True
            self._handle(*message)

    def _handle(self, kind, worker, *payload) -> None:
        if kind == "location":
            n, written = payload
            self.results[n] = written
            while self.next_index in self.results:
                self.dispatched.pop(self.next_index)
                self.on_location(self.results.pop(self.next_index))
                self.next_index += 1
        elif kind == "done":
            (counts,) = payload
            self.counts.update(counts)
            self.done.add(worker)
        else:
            n, details = payload
            location_id = self.dispatched.get(n, (worker, "?"))[1]
            raise WorkerError(
                f"decoding location {location_id} failed in worker {worker}:\n{details}"
            )

    def check_alive(self) -> None:
        for index, worker in enumerate(self.workers):
            if index not in self.done and not worker.is_alive():
                self.drain(block=False)  # it may have reported "done" or an error before exiting
                if index in self.done:
                    continue
                lost = [loc for n, (w, loc) in sorted(self.dispatched.items()) if w == index]
                raise WorkerError(
                    f"worker {index} died (exit code {worker.exitcode}) while decoding "
                    f"location(s) {', '.join(lost) or '(none)'}"
                )


def _worker_main(index, inbox, outbox, groups, features, directory, prefix) -> None:
    n = None
    try:
        from array_record.python import array_record_module
        from tensorflow_datasets.core import example_serializer

        serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
        writers: dict[int, tuple[int, object]] = {}  # lane -> (piece, open writer)
        counts: collections.Counter = collections.Counter()
        while (task := inbox.get()) is not None:
            n, piece, lane, location = task
            decoded = archive.decode_location(location, groups)
            indexed = None
            if decoded.example is not None:
                indexed = location_index.IndexedLocation.of_example(decoded.example)
                if lane not in writers or writers[lane][0] != piece:
                    if lane in writers:  # the lane moved on to its next piece: that shard is done
                        writers[lane][1].close()
                    path = shard_path(directory, prefix, piece, lane)
                    writers[lane] = (
                        piece,
                        array_record_module.ArrayRecordWriter(path, RECORD_OPTIONS),
                    )
                for record in acquisition_records(decoded.example):
                    writers[lane][1].write(
                        serializer.serialize_example(features.encode_example(record))
                    )
                counts[(piece, lane)] += len(indexed.windows)
            summary = dataclasses.replace(decoded, example=None)
            rank = piece * LANES + lane
            outbox.put(("location", index, n, WrittenLocation(summary, rank, indexed)))
        for _, writer in writers.values():
            writer.close()
        outbox.put(("done", index, dict(counts)))
    except BaseException:  # report anything, even KeyboardInterrupt, with the location it hit
        outbox.put(("error", index, n, traceback.format_exc(limit=8)))
        raise SystemExit(1) from None


def acquisition_records(example: dict) -> list[dict]:
    """A decoded location as its acquisition records, each with the location's id and centre."""
    location = {k: example[k] for k in ("location_id", "lat", "lon")}
    return [{**location, **acquisition} for acquisition in example["acquisitions"]]
