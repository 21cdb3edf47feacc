"""The side index of the prepared records: every location and its acquisitions, without pixels.

The records hold one acquisition each, the acquisitions of a location contiguous and in time order
(`builder.py`). Beside them the builder writes ``location_index.npz``, which says per location (in
record order) its id, centre lat/lon, its first acquisition record and how many it has, and per
acquisition record its window, sensing time and cloud percentage. Everything that chooses what to
read (the number of locations, the windows the draws need, the ids and coordinates of the change
report) comes from here, so nothing reads pixels before it knows which acquisitions it wants.

Columns, L locations and A acquisition records (a location's acquisitions are records
``first[i] .. first[i] + count[i] - 1``): ``location_id`` str [L], ``lat``, ``lon`` float32 [L],
``first`` int64 [L], ``count`` int32 [L], ``window`` int8 [A], ``date`` datetime64[s] [A],
``cloud`` float32 [A] (NaN when unknown). About 13 bytes per acquisition.
"""

from __future__ import annotations

import array
import dataclasses
import os

import numpy as np

FILENAME = "location_index.npz"
_LOCATION_COLUMNS = ("location_id", "lat", "lon", "first", "count")
_ACQUISITION_COLUMNS = ("window", "date", "cloud")


@dataclasses.dataclass(frozen=True)
class IndexedLocation:
    """What the side index keeps of one written location (a worker sends it to the parent)."""

    location_id: str
    lat: float
    lon: float
    windows: tuple[int, ...]
    dates: tuple[str, ...]  # ISO YYYY-MM-DDTHH:MM:SS, as the records hold them
    clouds: tuple[float, ...]

    @classmethod
    def of_example(cls, example: dict) -> IndexedLocation:
        """From a decoded location (`archive.decode_location`'s example)."""
        acquisitions = example["acquisitions"]
        return cls(
            location_id=example["location_id"],
            lat=float(example["lat"]),
            lon=float(example["lon"]),
            windows=tuple(int(a["window"]) for a in acquisitions),
            dates=tuple(a["date"] for a in acquisitions),
            clouds=tuple(float(a["cloud"]) for a in acquisitions),
        )


@dataclasses.dataclass(frozen=True)
class LocationIndex:
    """The columns of the module docstring."""

    location_id: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    first: np.ndarray
    count: np.ndarray
    window: np.ndarray
    date: np.ndarray
    cloud: np.ndarray

    def __len__(self) -> int:
        return len(self.location_id)

    @property
    def num_acquisitions(self) -> int:
        return len(self.window)

    def records(self, location: int) -> slice:
        """The acquisition records of `location`."""
        start = int(self.first[location])
        return slice(start, start + int(self.count[location]))

    def save(self, path) -> None:
        with open(os.fspath(path), "wb") as f:
            np.savez(f, **dataclasses.asdict(self))

    @classmethod
    def load(cls, path) -> LocationIndex:
        """Reads and checks an index; a missing or inconsistent one is an error naming it."""
        path = os.fspath(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                columns = {name: data[name] for name in (*_LOCATION_COLUMNS, *_ACQUISITION_COLUMNS)}
        except (OSError, KeyError, ValueError) as error:
            raise ValueError(f"{path}: not a readable location index ({error})") from None
        index = cls(**columns)
        index.check(path)
        return index

    def check(self, where: str) -> None:
        """Raises ValueError naming `where` unless the locations tile the acquisition records."""
        lengths = {len(getattr(self, name)) for name in _LOCATION_COLUMNS}
        lengths_a = {len(getattr(self, name)) for name in _ACQUISITION_COLUMNS}
        expected_first = np.concatenate([[0], np.cumsum(self.count, dtype=np.int64)[:-1]])
        if (
            len(lengths) != 1
            or len(lengths_a) != 1
            or not np.array_equal(self.first, expected_first[: len(self.first)])
            or int(np.sum(self.count, dtype=np.int64)) != self.num_acquisitions
        ):
            raise ValueError(
                f"{where}: the location index is inconsistent (columns of unequal length, or "
                "locations that do not cover the acquisition records in order)"
            )


class IndexBuilder:
    """Collects `IndexedLocation`s as the shards receive them and orders them as the records are.

    Each location comes with its shard's rank in record order; within a shard locations are in
    the order they were added. Compact columns (about 13 bytes per acquisition) rather than a
    Python object per location, so a million-location archive costs little memory.
    """

    def __init__(self):
        self._ids: list[str] = []
        self._lat, self._lon = array.array("f"), array.array("f")
        self._count, self._shard = array.array("i"), array.array("q")
        self._window, self._date, self._cloud = array.array("b"), array.array("q"), array.array("f")

    def add(self, shard_rank: int, location: IndexedLocation) -> None:
        self._ids.append(location.location_id)
        self._lat.append(location.lat)
        self._lon.append(location.lon)
        self._count.append(len(location.windows))
        self._shard.append(shard_rank)
        self._window.extend(location.windows)
        self._date.frombytes(np.asarray(location.dates, "datetime64[s]").astype(np.int64).tobytes())
        self._cloud.extend(location.clouds)

    def build(self) -> LocationIndex:
        count = np.frombuffer(self._count, np.int32).astype(np.int64)
        order = np.argsort(np.frombuffer(self._shard, np.int64), kind="stable")
        added_first = np.cumsum(count) - count  # where each location's acquisitions were added
        first = np.cumsum(count[order]) - count[order]  # and where they go, in record order
        # The added row of every acquisition record, location runs in record order.
        rows = np.repeat(added_first[order] - first, count[order]) + np.arange(int(count.sum()))
        return LocationIndex(
            location_id=np.asarray(self._ids, dtype=str)[order],
            lat=np.frombuffer(self._lat, np.float32)[order],
            lon=np.frombuffer(self._lon, np.float32)[order],
            first=first,
            count=count[order].astype(np.int32),
            window=np.frombuffer(self._window, np.int8)[rows],
            date=np.frombuffer(self._date, np.int64)[rows].astype("datetime64[s]"),
            cloud=np.frombuffer(self._cloud, np.float32)[rows],
        )
