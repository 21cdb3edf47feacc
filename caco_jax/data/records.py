"""Random access to the prepared `caco_geography` records, without TensorFlow.

`dataset.open_records` gives `Records`: location i of the split (in record order) is ``records[i]``,
and the training item of its window h is 2 * i + h. What a location is (id, centre, the window, date
and cloud of each acquisition) comes from the side index (`location_index`), so counting locations,
listing them and drawing acquisitions read no pixels; `Records.pixels` then reads only the
acquisition records asked for, each decompressed once.

`Records.acquisitions` is the split's `tfds.data_source` (one decoded acquisition record per item,
usable by grain). `Records.pixels` reads the same records' bytes and takes the pixel features from
the serialised example itself: TFDS's generic decoding of every feature cost more than the
decompression it follows (BENCHMARKS.md "Record layout").
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from tensorflow_datasets.proto import tf_example_pb2

from caco_jax.data import location_index
from caco_jax.runtime import errors


class DamagedRecordsError(errors.UserError):
    """A records shard that does not read (truncated, overwritten): names it and the fix."""


class Records:
    """The locations of prepared records (see the module docstring).

    ``acquisitions`` is the split's `tfds.data_source` of acquisition records, ``index`` the side
    index, ``pixel_shapes`` {pixel feature: [H, W, C]} (``rgb``, or the three ``bands_*m`` of
    ``all_bands``).
    """

    def __init__(
        self,
        acquisitions,
        index: location_index.LocationIndex,
        pixel_shapes: dict,
        stored_statistics: dict | None = None,
    ):
        self.acquisitions = acquisitions
        self.index = index
        self.pixel_shapes = {g: tuple(shape) for g, shape in pixel_shapes.items()}
        # all_bands: the per-band statistics computed at prepare time (`normalization.STORED_KEY`)
        self.stored_statistics = stored_statistics

    def __len__(self) -> int:
        return len(self.index)

    def location_id(self, location: int) -> str:
        return str(self.index.location_id[location])

    def acquisition_counts(self) -> np.ndarray:
        """The number of acquisitions of every location, in record order."""
        return self.index.count

    def windows(self, location: int) -> np.ndarray:
        """The window (0 early, 1 late) of each of the location's acquisitions, in time order."""
        return self.index.window[self.index.records(location)].astype(np.int64)

    def pixels(self, location: int, acquisitions: Sequence[int]):
        """uint8 pixels [len(acquisitions), ...] of the location's acquisitions at those positions
        (a dict of the three groups for ``all_bands``); an acquisition asked for twice is read
        once."""
        wanted, inverse = np.unique(np.asarray(acquisitions, np.int64), return_inverse=True)
        span = self.index.records(location)
        if wanted.size and not 0 <= wanted[0] <= wanted[-1] < span.stop - span.start:
            raise IndexError(
                f"location {location} ({self.location_id(location)}) has "
                f"{span.stop - span.start} acquisitions, not {wanted.tolist()}"
            )
        serialized = self.acquisitions.data_source  # the records' bytes, before TFDS decodes them
        read = [self._pixels_of(self._read(serialized, span.start + int(a))) for a in wanted]
        stacked = {g: np.stack([r[g] for r in read])[inverse] for g in self.pixel_shapes}
        return stacked["rgb"] if list(stacked) == ["rgb"] else stacked

    def _read(self, serialized, key: int) -> bytes:
        """Record ``key``'s bytes; a shard that does not read is DamagedRecordsError naming it."""
        try:
            return serialized[key]
        except (RuntimeError, OSError, ValueError) as error:  # array_record's (Riegeli's) errors
            shard = _shard_of(serialized, key)
            folder = os.path.dirname(shard) if shard else "the records' folder"
            raise DamagedRecordsError(
                f"{shard or 'a shard'}: record {key} does not read ({errors.one_line(error)}); "
                f"the records are damaged: delete {folder} and run the 'prepare' task again"
            ) from error

    def _pixels_of(self, record: bytes) -> dict:
        """The pixel features of one serialised acquisition record (a tf.Example whose pixel
        features are raw uint8 bytes, `builder.PIXEL_ENCODING`)."""
        features = tf_example_pb2.Example.FromString(record).features.feature
        return {
            g: np.frombuffer(features[g].bytes_list.value[0], np.uint8).reshape(shape)
            for g, shape in self.pixel_shapes.items()
        }

    def __getitem__(self, location: int) -> dict:
        """The whole location, every acquisition's pixels included.

        Returns {"location_id": str, "lat", "lon": float, "window": int64 [T], "date": [T] str,
        "cloud": float32 [T], "pixels": uint8 [T, 264, 264, 3] for `rgb`, or for `all_bands` a dict
        {"bands_10m": [T, 264, 264, 4], "bands_20m": [T, 132, 132, 6], "bands_60m": [T, 44, 44,
        2]}}.
        """
        span = self.index.records(location)
        return {
            "location_id": self.location_id(location),
            "lat": float(self.index.lat[location]),
            "lon": float(self.index.lon[location]),
            "window": self.windows(location),
            "date": [str(d) for d in self.index.date[span]],
            "cloud": self.index.cloud[span].copy(),
            "pixels": self.pixels(location, np.arange(span.stop - span.start)),
        }


def _shard_of(serialized, key: int) -> str:
    """The file of record ``key`` of an array_record data source ("" when it does not say)."""
    first = 0
    for instruction in getattr(serialized, "_read_instructions", None) or []:
        if key < first + instruction.num_records:
            return instruction.filename
        first += instruction.num_records
    return ""


def location_table(source: Records) -> list[tuple[str, float, float]]:
    """(location_id, lat, lon) of every location, in record order, from the side index."""
    index = source.index
    return [
        (str(i), float(lat), float(lon))
        for i, lat, lon in zip(index.location_id, index.lat, index.lon, strict=True)
    ]
