"""The side index of the records (data/location_index.py): order, columns, save and load."""

import dataclasses

import numpy as np
import pytest

from caco_jax.data import location_index


def _location(i, rng):
    n = int(rng.integers(6, 11))
    return location_index.IndexedLocation(
        location_id=f"{i:06d}",
        lat=float(i),
        lon=-float(i),
        windows=tuple(int(w) for w in rng.integers(0, 2, n)),
        dates=tuple(f"2017-03-{1 + t:02d}T00:00:{i % 60:02d}" for t in range(n)),
        clouds=tuple(float(100 * i + t) for t in range(n)),
    )


def test_locations_are_ordered_by_shard_then_arrival_and_survive_a_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    added = [(int(rng.integers(0, 7)), _location(i, rng)) for i in range(60)]
    builder = location_index.IndexBuilder()
    for rank, location in added:
        builder.add(rank, location)
    path = tmp_path / location_index.FILENAME
    builder.build().save(path)
    index = location_index.LocationIndex.load(path)
    expected = [location for _, location in sorted(added, key=lambda a: a[0])]  # stable
    assert index.location_id.tolist() == [e.location_id for e in expected]
    assert index.num_acquisitions == sum(len(e.windows) for e in expected)
    for i, e in enumerate(expected):
        span = index.records(i)
        assert (index.lat[i], index.lon[i]) == (e.lat, e.lon)
        assert index.window[span].tolist() == list(e.windows)
        assert [str(d) for d in index.date[span]] == list(e.dates)
        assert index.cloud[span].tolist() == list(e.clouds)


def test_a_damaged_index_is_refused_naming_the_file(tmp_path):
    rng = np.random.default_rng(1)
    builder = location_index.IndexBuilder()
    for i in range(3):
        builder.add(0, _location(i, rng))
    index = builder.build()
    broken = tmp_path / "broken.npz"
    dataclasses.replace(index, count=index.count + 1).save(broken)
    with pytest.raises(ValueError, match=f"{broken}: the location index is inconsistent"):
        location_index.LocationIndex.load(broken)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match=f"{garbage}: not a readable location index"):
        location_index.LocationIndex.load(garbage)
