"""The host input pipeline for pretraining: prepared records -> this process's shard of each batch.

The host only chooses acquisitions (`caco_jax.data.item_sampler`), reads and decodes them and
stacks uint8 batches; every augmentation and the normalisation run on the accelerator
(`caco_jax.pretrain.augment`).

The source of locations (`records.Records`, or anything with the same methods) gives
``len(source)`` (the number of locations), ``source.windows(i)`` (int [T], the window of each of
location i's T acquisitions, in time order), ``source.location_id(i)`` and
``source.pixels(i, acquisitions)`` (uint8 ``[len(acquisitions), H, W, C]``, or a dict of such
groups) and ``source.acquisition_counts()`` (int [L], acquisitions per location). An item's
acquisitions are drawn from the windows alone; then one `pixels` call per location reads the
acquisitions its items drew, each distinct one decompressed once (caco/teco: at most 6 of the
location's ~10, seco: at most 3; moco reads the one acquisition it visits).

Contract (the training step relies on it):

``make_pipeline(settings, source, stream, *, num_epochs=None, process_index=0, process_count=1,
start_batch=0)`` (``settings``: `InputSettings`) returns a grain ``DatasetIterator`` yielding, for
every global batch of ``stream`` (a `Stream`: method, global_batch_size, seed, num_locations, what
an epoch visits and, for moco,
num_acquisitions) in order from global batch ``start_batch`` on, this process's rows as host numpy
arrays:

- ``images``: uint8 ``[B, V, H, W, C]``, the item's acquisitions in the order t0, t1, t2 (V = 3
  for caco/teco/seco) or t0 alone (V = 1 for moco). For the ``all_bands`` records ``images`` is a
  dict of the three resolution groups, exactly as the records hold them: ``bands_10m``
  ``[B, V, 264, 264, 4]`` (B2, B3, B4, B8), ``bands_20m`` ``[B, V, 132, 132, 6]`` (B5, B6, B7, B8A,
  B11, B12), ``bands_60m`` ``[B, V, 44, 44, 2]`` (B1, B9); `augment.make_views` resizes them to 264
  on the device.
- ``item_id``: int32 ``[B]``, the index of the change statistics: ``2 * location_index + window``
  for caco/teco; ``location_index`` for seco/moco (they keep no change statistics).
- ``window``: int32 ``[B]``, the item's window for caco/teco; the window of t0 for seco/moco.
- ``location_index``: int32 ``[B]``, the record index of the location.

B = global_batch_size / process_count. An epoch visits every location once (caco, teco, seco), or
every acquisition of every location once (moco: one item per acquisition, nothing drawn, as the
official MoCo baseline's dataset lists every acquisition; ``Stream.epoch_over``, from
`methods.Method.epoch_over`), in an order shuffled per epoch from `seed`. For caco/teco the global
batch holds global_batch_size / 2 locations, each as two adjacent rows (2l: window 0, 2l+1: window
1), as the official ``FirstSecondSampler`` does; process p receives the rows of locations
[p * n / P, (p + 1) * n / P) of the global batch's n locations, so pairs are never split and the
global batch is the concatenation of the processes' shards in process order (what
``jax.make_array_from_process_local_data`` assembles on a 1-D data mesh). The final partial batch
of an epoch is dropped (the official DataLoader uses ``drop_last=True``): ``steps_per_epoch =
num_locations // (global_batch_size / items_per_location)``, for moco ``num_acquisitions //
global_batch_size`` (about 10x the steps of an epoch over locations; the official MoCo runs
``resnet{18,50}_moco_geo_100k_200`` train 200 such epochs, lr x0.1 at 120 and 160, what
``configs/pretrain.py`` sets).

Everything random is a pure function of (seed, epoch, location, window), so the batches do not
depend on the number of worker processes or threads. The position of the stream is therefore one
number, the index of the next global batch (a training run consumes one per step, so it is the
global step): a `Position` records it with the `Stream` that gives it its meaning, and a pipeline
built with ``start_batch=position.start_batch(stream)`` continues exactly where the saved run
stopped, with any number of processes (each takes its slice of the same global batches).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from caco_jax import methods
from caco_jax.data import item_sampler
from caco_jax.runtime import workers
from caco_jax.settings import Section

if TYPE_CHECKING:
    import grain


@dataclasses.dataclass(frozen=True)
class InputSettings(Section):
    """`config.input`: how the host reads and draws; none of it changes the batches, except
    ``acquisition_draws``."""

    SECTION = "input"
    acquisition_draws: str = "official"  # or "distinct": 3 distinct acquisitions in every mode
    num_workers: int = 0  # grain worker processes; 0 = read in the training process
    num_threads: int = 2  # reader threads per process (each assembles whole batches)
    prefetch_batches: int = 4  # batches buffered per process
    # all_bands: locations the per-band statistics come from (64: stored at prepare time,
    # `normalization.STATS_LOCATIONS`; another number reads them at start-up)
    stats_locations: int = 64

    def validate(self) -> None:
        self.require(
            self.acquisition_draws in item_sampler.ACQUISITION_DRAWS,
            "acquisition_draws",
            f"one of {item_sampler.ACQUISITION_DRAWS}",
        )
        self.require(self.num_workers >= 0, "num_workers", "must be >= 0")
        self.require(self.num_threads >= 0, "num_threads", "must be >= 0")
        self.require(self.prefetch_batches >= 1, "prefetch_batches", "must be >= 1")
        self.require(self.stats_locations >= 1, "stats_locations", "must be >= 1")


class Locations(Protocol):
    """The source the pipeline reads (`records.Records`; see the module docstring)."""

    def __len__(self) -> int: ...

    def windows(self, location: int) -> np.ndarray: ...

    def location_id(self, location: int) -> str: ...

    def pixels(self, location: int, acquisitions: Sequence[int]) -> np.ndarray | dict: ...

    def acquisition_counts(self) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Stream:
    """What fixes the sequence of global batches: the same on every process and process count.

    ``epoch_over`` ("" = the method's `methods.Method.epoch_over`) says what an epoch visits once;
    ``num_acquisitions`` (all the locations' acquisitions) is counted only when that is the
    acquisitions, so a stream over locations does not depend on it.
    """

    method: str
    global_batch_size: int
    seed: int
    num_locations: int
    epoch_over: str = ""
    num_acquisitions: int = 0

    def __post_init__(self):
        if not self.epoch_over:
            object.__setattr__(self, "epoch_over", methods.get(self.method).epoch_over)

    @classmethod
    def of(
        cls,
        method: methods.Method,
        global_batch_size: int,
        seed: int,
        num_locations: int,
        num_acquisitions: int = 0,
    ) -> Stream:
        """The stream of a run; ``num_acquisitions`` is kept only where an epoch visits them."""
        over_acquisitions = method.epoch_over == "acquisitions"
        return cls(
            method.name,
            global_batch_size,
            seed,
            num_locations,
            num_acquisitions=num_acquisitions if over_acquisitions else 0,
        )

    @property
    def epoch_elements(self) -> int:
        """What an epoch visits once: its locations, or its acquisitions."""
        return {"locations": self.num_locations, "acquisitions": self.num_acquisitions}[
            self.epoch_over
        ]

    def elements_per_batch(self, process_count: int = 1) -> int:
        """Locations (or acquisitions) in one global batch; checks that pairs and process shards
        divide evenly."""
        per_element = methods.get(self.method).items_per_location
        if self.global_batch_size <= 0 or self.global_batch_size % per_element:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} must be a positive multiple of "
                f"{per_element} for method {self.method!r} (both windows of a location share a "
                "batch)"
            )
        elements = self.global_batch_size // per_element
        if elements % process_count:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} holds {elements} "
                f"{self.epoch_over}, which must divide evenly over process_count={process_count}"
            )
        return elements

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch; the last partial batch is dropped (official
        drop_last)."""
        steps = self.epoch_elements // self.elements_per_batch()
        if steps == 0:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} needs more {self.epoch_over} than "
                f"the {self.epoch_elements} in the dataset (method {self.method!r})"
            )
        return steps


@dataclasses.dataclass(frozen=True)
class Position:
    """The next global batch of a stream: what a checkpoint records to resume the input."""

    next_global_batch: int
    stream: Stream

    def to_json(self) -> dict:
        return {"next_global_batch": self.next_global_batch, **dataclasses.asdict(self.stream)}

    @classmethod
    def from_json(cls, record: dict) -> Position:
        # Checkpoints written before the method table named the method "mode"; those written
        # before epochs over acquisitions existed were all over locations.
        old = {"method": record.get("mode"), "epoch_over": "locations", "num_acquisitions": 0}
        record = {**old, **record}
        fields = {f.name for f in dataclasses.fields(Stream)}
        return cls(
            int(record["next_global_batch"]), Stream(**{k: record[k] for k in sorted(fields)})
        )

    def start_batch(self, stream: Stream) -> int:
        """The global batch to resume ``stream`` from; refuses a position of another stream.

        With another seed, batch size, method, epoch or dataset size the saved batch index would
        silently point at other data.
        """
        for field in dataclasses.fields(Stream):
            saved, current = getattr(self.stream, field.name), getattr(stream, field.name)
            if saved != current:
                raise ValueError(
                    f"cannot resume the input stream: the checkpoint was written with "
                    f"{field.name}={saved!r}, this run has {field.name}={current!r}"
                )
        return self.next_global_batch


class _EpochOrder:
    """Maps an element index of this process's stream to (epoch, location or acquisition)."""

    def __init__(self, num_elements, elements_per_batch, steps, seed, process_index, process_count):
        self.num_elements = num_elements
        self.per_process = elements_per_batch // process_count
        self.elements_per_batch = elements_per_batch
        self.steps = steps
        self.seed = seed
        self.offset = process_index * self.per_process
        self._cached: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        cached = self._cached  # one read: reader threads may replace it concurrently
        if cached is None or cached[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_elements)
            cached = self._cached = (epoch, order)
        return cached[1]

    def __call__(self, element: int) -> tuple[int, int]:
        epoch, within = divmod(int(element), self.steps * self.per_process)
        step, slot = divmod(within, self.per_process)
        position = step * self.elements_per_batch + self.offset + slot
        return epoch, int(self.permutation(epoch)[position])


class _LoadLocation:
    """Draws one location's items from its windows, then reads only the drawn acquisitions: one
    grain element per location."""

    def __init__(self, source, order, stream: Stream, acquisition_draws):
        self.source = source
        self.order = order
        self.method = methods.get(stream.method)
        self.seed = stream.seed
        self.acquisition_draws = acquisition_draws
        self.windows = range(self.method.items_per_location)

    def __call__(self, element: int) -> dict:
        epoch, location_index = self.order(element)
        windows = self.source.windows(location_index)
        picks = [
            item_sampler.draw_acquisitions(
                windows,
                method=self.method,
                item_window=window,
                rng=item_sampler.item_rng(self.seed, epoch, location_index, window),
                acquisition_draws=self.acquisition_draws,
                location=f"{location_index} ({self.source.location_id(location_index)})",
            )
            for window in self.windows
        ]
        paired = self.method.paired
        item_windows = [
            w if paired else int(windows[p[0]]) for w, p in zip(self.windows, picks, strict=True)
        ]
        pixels = self.source.pixels(location_index, np.concatenate(picks))
        items, views = len(picks), self.method.acquisitions_per_item
        images = _tree_map(lambda x: x.reshape((items, views, *x.shape[1:])), pixels)
        return {
            "images": images,
            "item_id": np.asarray(
                [2 * location_index + w if paired else location_index for w in item_windows],
                np.int32,
            ),
            "window": np.asarray(item_windows, np.int32),
            "location_index": np.full(items, location_index, np.int32),
        }


class _LoadAcquisition:
    """Reads one acquisition as one item (nothing drawn): one grain element per acquisition."""

    def __init__(self, source, order, stream: Stream, acquisition_draws):
        del acquisition_draws  # every acquisition is visited, none drawn
        counts = np.asarray(source.acquisition_counts(), np.int64)
        if int(counts.sum()) != stream.num_acquisitions:
            raise ValueError(
                f"the stream is of {stream.num_acquisitions} acquisitions, the source holds "
                f"{int(counts.sum())}"
            )
        self.source = source
        self.order = order
        self.first = np.cumsum(counts) - counts  # each location's first acquisition

    def __call__(self, element: int) -> dict:
        _, acquisition = self.order(element)
        location = int(np.searchsorted(self.first, acquisition, side="right")) - 1
        t = acquisition - int(self.first[location])
        pixels = self.source.pixels(location, [t])
        return {
            "images": _tree_map(lambda x: x.reshape((1, 1, *x.shape[1:])), pixels),
            "item_id": np.asarray([location], np.int32),
            "window": np.asarray([self.source.windows(location)[t]], np.int32),
            "location_index": np.asarray([location], np.int32),
        }


# What one grain element of an epoch is, by `Stream.epoch_over`.
_LOADERS = {"locations": _LoadLocation, "acquisitions": _LoadAcquisition}


def _tree_map(fn, x):
    """`fn` on an array, or on each array of a dict of them (the ``all_bands`` groups)."""
    return {k: _tree_map(fn, v) for k, v in x.items()} if isinstance(x, dict) else fn(x)


def _merge_items(batch: dict) -> dict:
    """[locations, items_per_location, ...] -> [locations * items_per_location, ...]."""
    return _tree_map(lambda x: x.reshape((x.shape[0] * x.shape[1], *x.shape[2:])), batch)


def make_pipeline(
    settings: InputSettings,
    source: Locations,
    stream: Stream,
    *,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    start_batch: int = 0,
) -> grain.DatasetIterator:
    """This process's rows of ``stream``'s global batches (see the module docstring).

    `source` gives the locations (`dataset.open_records`; see the module docstring for what the
    pipeline asks of it). The first batch is the process's rows of global batch `start_batch`
    (counted from the start of epoch 0); `num_epochs=None` never ends.
    """
    # Imported here: the rest of this module (batch counts, positions) serves `train.setup` on
    # machines without grain or absl (benchmarks/device_check.py).
    import grain
    from absl import flags

    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    if stream.num_locations != len(source):
        raise ValueError(
            f"the stream is of {stream.num_locations} locations, the source holds {len(source)}"
        )
    per_batch = stream.elements_per_batch(process_count)
    steps = stream.steps_per_epoch
    per_process = per_batch // process_count
    order = _EpochOrder(
        stream.epoch_elements, per_batch, steps, stream.seed, process_index, process_count
    )
    epoch_elements = steps * per_process
    if num_epochs is None:
        total = (sys.maxsize // 2 // epoch_elements) * epoch_elements
    else:
        total = num_epochs * epoch_elements
    if not 0 <= start_batch * per_process <= total:
        raise ValueError(
            f"start_batch={start_batch} is not within the stream's {total // per_process} "
            "global batches"
        )
    load = _LOADERS[stream.epoch_over](source, order, stream, settings.acquisition_draws)
    dataset = (
        grain.MapDataset.range(start_batch * per_process, total)
        .map(load)
        .batch(per_process, drop_remainder=True)
        .map(_merge_items)
    )
    read_options = grain.ReadOptions(
        num_threads=settings.num_threads, prefetch_buffer_size=settings.prefetch_batches
    )
    batches = dataset.to_iter_dataset(read_options)
    if settings.num_workers > 0:
        # grain's workers read absl flags; programs without absl.app (tests, notebooks) have not
        # parsed them, which is harmless to mark: grain's defaults apply.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        workers.install()  # grain's spawned workers must not rerun a caller's unguarded script
        batches = batches.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=settings.num_workers)
        )
    return iter(batches)
