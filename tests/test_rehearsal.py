"""benchmarks/rehearsal_archive.py: a replicated archive is read by the builder's reader as
distinct locations, at their own coordinates, with the base locations' pixels."""

import os
import sys

import helpers
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import rehearsal_archive

NUM_LOCATIONS = 7


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return helpers.synthetic_folder(tmp_path_factory)


def test_replicas_are_distinct_locations_read_by_the_archive_reader(base_folder, tmp_path):
    parts = rehearsal_archive.write_replicated_archive(
        base_folder, os.fspath(tmp_path), num_locations=NUM_LOCATIONS
    )
    assert [os.path.basename(p) for p in parts] == [
        f"clean_rehearsal_geography_part{i}" for i in range(4)
    ]
    base = helpers.decode_all(base_folder)
    replicas = helpers.decode_all(os.fspath(tmp_path))  # the four parts as one stream

    assert [r.location_id for r in replicas] == [f"{n:06d}" for n in range(NUM_LOCATIONS)]
    assert all(r.example is not None and not r.issues for r in replicas)
    centres = [(float(r.example["lat"]), float(r.example["lon"])) for r in replicas]
    assert len(set(centres)) == NUM_LOCATIONS
    for n, centre in enumerate(centres):
        expected = rehearsal_archive.replica_lat_lon(n, NUM_LOCATIONS)
        np.testing.assert_allclose(centre, expected, atol=1e-4)
        original = base[n % len(base)].example["acquisitions"]
        copied = replicas[n].example["acquisitions"]
        assert [a["product_id"] for a in copied] == [a["product_id"] for a in original]
        for a, b in zip(copied, original, strict=True):
            np.testing.assert_array_equal(a["rgb"], b["rgb"])
            assert a["window"] == b["window"]


def test_a_file_without_georeferencing_tags_is_refused_by_name(tmp_path):
    path = tmp_path / "B4.tif"
    path.write_bytes(b"preview")
    with pytest.raises(ValueError, match=r"B4\.tif: not a little-endian classic TIFF"):
        rehearsal_archive.georef_offsets(path.read_bytes(), os.fspath(path))
