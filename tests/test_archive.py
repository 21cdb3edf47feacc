"""Reading the archive (caco_jax/data/archive.py): input forms, layout, window split, bad input."""

import datetime
import io
import json
import os
import tarfile

import numpy as np
import pytest
import rasterio
from helpers import (
    EARLY,
    LATE,
    RGB_KEEP,
    as_comparable,
    decode_all,
    pack_tar_gz,
    product_id,
    split_parts,
    synthetic_folder,
    write_location,
)

from caco_jax.data import archive, layout

# ----------------------------------------------------------------------------------------------
# The window split.


def test_complete_location_takes_the_five_newest_as_late_window_like_the_official_loader():
    # Uneven gaps on purpose: a complete location is split by count, not by gap.
    times = [*EARLY[:4], LATE[0] - datetime.timedelta(days=900), *LATE]
    assert archive.assign_windows(times) == [0] * 5 + [1] * 5


def test_incomplete_location_is_split_at_the_largest_time_gap():
    assert archive.assign_windows(EARLY[:4] + LATE[:4]) == [0] * 4 + [1] * 4
    # Counting 5 from the end would have put an early acquisition into the late window.
    assert archive.assign_windows(EARLY[:3] + LATE[:4]) == [0] * 3 + [1] * 4
    assert archive.assign_windows(EARLY + LATE[:1]) == [0] * 5 + [1]
    assert archive.assign_windows(EARLY + LATE + LATE[:1]) == [0] * 5 + [1] * 6
    assert archive.assign_windows(EARLY[:1]) == [0]
    assert archive.assign_windows([]) == []


# ----------------------------------------------------------------------------------------------
# Input forms and the layout.


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return synthetic_folder(tmp_path_factory)


def test_every_input_form_gives_the_same_locations(synthetic, tmp_path):
    folder = decode_all(synthetic)
    # The manual dir holds the top folder and the ground truth CSV beside it.
    assert as_comparable(decode_all(os.path.dirname(synthetic))) == as_comparable(folder)
    tar_gz = pack_tar_gz(synthetic, os.fspath(tmp_path / "clean_synthetic_geography.tar.gz"))
    assert as_comparable(decode_all(tar_gz)) == as_comparable(folder)
    flat = pack_tar_gz(synthetic, os.fspath(tmp_path / "flat.tar.gz"), top=False)
    assert as_comparable(decode_all(flat)) == as_comparable(folder)
    os.remove(flat)
    parts = split_parts(tar_gz)
    assert archive.find_archive(tmp_path).form == "parts"
    assert as_comparable(decode_all(tmp_path)) == as_comparable(folder)
    assert as_comparable(decode_all(parts[2])) == as_comparable(folder)
    assert [d.location_id for d in folder] == ["000000", "000001", "000002"]


def test_pixels_dates_and_centre_match_what_rasterio_reads_from_the_files(synthetic):
    groups = {"bands_20m": layout.BANDS_AT_RESOLUTION[20], "rgb": layout.RGB_BANDS}
    keep = frozenset(
        {layout.METADATA_FILE} | {layout.band_file(b) for g in groups.values() for b in g}
    )
    decoded = decode_all(synthetic, keep, groups)[1]
    location = os.path.join(synthetic, decoded.location_id)
    product_ids = sorted(d for d in os.listdir(location) if not d.endswith(".tif"))
    acquisitions = decoded.example["acquisitions"]
    assert [a["product_id"] for a in acquisitions] == product_ids
    assert [a["window"] for a in acquisitions] == [0] * 5 + [1] * 5
    for acquisition in acquisitions:
        folder = os.path.join(location, acquisition["product_id"])
        for feature, bands in groups.items():
            for c, band in enumerate(bands):
                with rasterio.open(os.path.join(folder, layout.band_file(band))) as ds:
                    np.testing.assert_array_equal(acquisition[feature][..., c], ds.read(1))
        metadata = json.load(open(os.path.join(folder, layout.METADATA_FILE)))
        assert acquisition["cloud"] == np.float32(metadata[layout.CLOUD_PROPERTY])
        expected_date = layout.sensing_time(acquisition["product_id"]).isoformat()
        assert acquisition["date"] == expected_date and len(expected_date) == 19
    with rasterio.open(os.path.join(location, product_ids[0], "B4.tif")) as ds:
        west, south, east, north = ds.bounds
    assert decoded.example["lat"] == pytest.approx((south + north) / 2, abs=1e-5)
    assert decoded.example["lon"] == pytest.approx((west + east) / 2, abs=1e-5)
    assert decoded.example["acquisitions"][0]["bands_20m"].shape == (132, 132, 6)


def test_stray_files_previews_and_macos_folders_are_ignored(tmp_path):
    clean, messy = tmp_path / "clean" / "archive", tmp_path / "messy" / "archive"
    for root in (clean, messy):
        write_location(root, "000000", EARLY + LATE)
    for stray in (".DS_Store", "._000000", "Thumbs.db", "README.txt"):
        (messy / stray).write_bytes(b"x")
    location = messy / "000000"
    (location / ".DS_Store").write_bytes(b"x")
    (location / "notes.txt").write_bytes(b"x")
    (location / "__MACOSX").mkdir()
    acquisition = location / product_id(EARLY[0], 0)
    (acquisition / "._B4.tif").write_bytes(b"x")
    (acquisition / "B4.tif.aux.xml").write_bytes(b"x")
    (messy.parent / "__MACOSX" / "archive" / "000000").mkdir(parents=True)
    expected = as_comparable(decode_all(clean))
    assert as_comparable(decode_all(messy)) == expected
    tar = pack_tar_gz(os.fspath(messy), os.fspath(tmp_path / "messy.tar.gz"))
    decoded = decode_all(tar)
    assert as_comparable(decoded) == expected
    # 10 previews + notes.txt + B4.tif.aux.xml; stray names are not even counted.
    assert decoded[0].ignored == 12


def test_metadata_missing_or_corrupt_gives_unknown_cloud(tmp_path):
    root = tmp_path / "archive"
    write_location(root, "000000", EARLY + LATE)
    folders = sorted((root / "000000").iterdir())
    folders = [f for f in folders if f.is_dir()]
    (folders[0] / layout.METADATA_FILE).unlink()
    (folders[1] / layout.METADATA_FILE).write_text("{not json")
    (decoded,) = decode_all(root)
    clouds = [a["cloud"] for a in decoded.example["acquisitions"]]
    assert np.isnan(clouds[0]) and np.isnan(clouds[1]) and clouds[2] == np.float32(14.5)
    assert decoded.issues == [
        (folders[1].name, "cloud unknown", decoded.issues[0][2]),
    ]
    assert decoded.issues[0][2].startswith("metadata.json unreadable")


# ----------------------------------------------------------------------------------------------
# Bad input: counted skips with reasons, or clear errors.


def test_unreadable_and_missing_bands_skip_the_acquisition_then_the_location(tmp_path):
    root = tmp_path / "archive"
    write_location(root, "000000", EARLY + LATE, seed=1)
    write_location(root, "000001", EARLY + LATE, seed=2)
    write_location(root, "000002", EARLY[:2] + LATE, seed=3)
    good = [f for f in sorted((root / "000000").iterdir()) if f.is_dir()]
    (good[0] / "B4.tif").write_bytes(b"II*\x00 this is not a GeoTIFF")
    (good[6] / "B3.tif").unlink()
    bad = [f for f in sorted((root / "000001").iterdir()) if f.is_dir()]
    for folder in bad[:3]:
        (folder / "B2.tif").write_bytes((folder / "B2.tif").read_bytes()[:300])  # truncated
    kept, skipped, too_few = decode_all(root)

    assert [a["product_id"] for a in kept.example["acquisitions"]] == [
        f.name for f in good if f not in (good[0], good[6])
    ]
    assert [a["window"] for a in kept.example["acquisitions"]] == [0] * 4 + [1] * 4
    (first, action_1, reason_1), (second, action_2, reason_2) = kept.issues
    assert (first, action_1) == (good[0].name, "acquisition skipped")
    assert reason_1.startswith("unreadable band B4")
    assert (second, action_2, reason_2) == (good[6].name, "acquisition skipped", "missing band B3")

    assert skipped.example is None
    assert [i[0] for i in skipped.issues] == [f.name for f in bad[:3]]
    assert all(i[2].startswith("unreadable band B2") for i in skipped.issues)
    assert skipped.skip_reason == (
        "too few acquisitions: 2 early, 5 late "
        "(need >= 3 per window; 3 of 10 acquisitions unusable)"
    )
    assert too_few.example is None and too_few.split_rule == "largest gap"
    assert too_few.skip_reason == "too few acquisitions: 2 early, 5 late (need >= 3 per window)"


def test_wrong_band_shape_skips_the_acquisition(tmp_path):
    root = tmp_path / "archive"
    write_location(root, "000000", EARLY + LATE)
    folder = next(f for f in sorted((root / "000000").iterdir()) if f.is_dir())
    box = layout.GeoBox.around(45.0, 7.0)
    layout.write_band_geotiff(folder / "B4.tif", np.zeros((132, 132), np.uint8), box)
    (decoded,) = decode_all(root)
    assert decoded.issues == [
        (folder.name, "acquisition skipped", "band B4 is uint8(132, 132), expected uint8(264, 264)")
    ]


def test_empty_location_folder_is_a_skip(tmp_path):
    root = tmp_path / "archive"
    write_location(root, "000000", EARLY + LATE)
    (root / "000001").mkdir()
    for path in (root, pack_tar_gz(os.fspath(root), os.fspath(tmp_path / "a.tar.gz"))):
        decoded = decode_all(path)
        assert [(d.location_id, d.skip_reason) for d in decoded] == [
            ("000000", ""),
            ("000001", "no acquisition folders"),
        ]


def test_truncated_archive_is_an_error_naming_the_file_and_how_far_it_got(tmp_path):
    root = tmp_path / "archive"
    for i in range(4):
        write_location(root, f"{i:06d}", EARLY + LATE, seed=i)
    tar = pack_tar_gz(os.fspath(root), os.fspath(tmp_path / "caco10k.tar.gz"))
    data = open(tar, "rb").read()
    with open(tar, "wb") as f:
        f.write(data[: len(data) * 6 // 10])
    source = archive.find_archive(tar)
    seen = []
    with pytest.raises(archive.ArchiveError) as error:
        for location in archive.read_locations(source, RGB_KEEP):
            seen.append(location.location_id)
    message = str(error.value)
    assert "caco10k.tar.gz: truncated or corrupt archive" in message
    assert f"of {len(data) * 6 // 10:,} compressed bytes" in message
    assert f"after {len(seen)} complete locations (last: {seen[-1]})" in message
    assert 1 <= len(seen) <= 2  # the partial location was not yielded


def test_missing_part_and_ambiguous_folder_are_errors(tmp_path):
    root = tmp_path / "src" / "clean_1m_geography"
    write_location(root, "000000", EARLY + LATE)
    parts_dir = tmp_path / "parts"
    parts_dir.mkdir()
    tar = pack_tar_gz(os.fspath(root), os.fspath(parts_dir / "clean_1m_geography.tar.gz"))
    parts = split_parts(tar)
    os.remove(parts[2])
    with pytest.raises(archive.ArchiveError, match=r"clean_1m_geography_part\*.*missing \['2'\]"):
        archive.find_archive(parts_dir)
    pack_tar_gz(os.fspath(root), os.fspath(tmp_path / "src" / "caco10k.tar.gz"))
    with pytest.raises(archive.ArchiveError, match=r"several archives.*caco10k\.tar\.gz.*folder"):
        archive.find_archive(tmp_path / "src")
    with pytest.raises(archive.ArchiveError, match="no CACo archive found"):
        archive.find_archive(tmp_path / "src" / "clean_1m_geography" / "000000")
    (tmp_path / "fake.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(archive.ArchiveError, match=r"fake\.tar\.gz: not a gzip file"):
        list(archive.read_locations(archive.find_archive(tmp_path / "fake.tar.gz"), RGB_KEEP))


def test_a_location_split_across_the_tar_stream_is_an_error_naming_it(tmp_path):
    root = tmp_path / "archive"
    write_location(root, "000000", EARLY + LATE, seed=0)
    write_location(root, "000001", EARLY + LATE, seed=1)

    def interleave(paths):  # 000001's members in the middle of 000000's
        first = [p for p in paths if "/000000" in p]
        second = [p for p in paths if "/000001" in p]
        return [p for p in paths if p not in first + second] + first[:20] + second + first[20:]

    tar = pack_tar_gz(os.fspath(root), os.fspath(tmp_path / "a.tar.gz"), order=interleave)
    with pytest.raises(
        archive.ArchiveError, match="location 000000 continues after other locations"
    ):
        list(archive.read_locations(archive.find_archive(tar), RGB_KEEP))


def test_tar_without_directory_entries_is_read(tmp_path):
    root = tmp_path / "archive"
    write_location(root, "000000", EARLY + LATE)
    with_dirs = pack_tar_gz(os.fspath(root), os.fspath(tmp_path / "a.tar.gz"))
    files_only = tmp_path / "b.tar.gz"
    with tarfile.open(with_dirs) as src, tarfile.open(files_only, "w:gz") as dst:
        for member in src.getmembers():
            if member.isfile():
                dst.addfile(member, io.BytesIO(src.extractfile(member).read()))
    assert as_comparable(decode_all(files_only)) == as_comparable(decode_all(root))


def test_a_missing_first_part_or_a_gap_is_named_before_anything_is_read(tmp_path):
    root = tmp_path / "src" / "clean_1m_geography"
    write_location(root, "000000", EARLY + LATE)
    numbered = tmp_path / "numbered"
    numbered.mkdir()
    parts = split_parts(
        pack_tar_gz(os.fspath(root), os.fspath(numbered / "clean_1m_geography.tar.gz"))
    )
    os.remove(parts[0])  # parts 1..3 left: not a 1-based set, since part1 is no gzip start
    with pytest.raises(archive.ArchiveError) as error:
        archive.find_archive(numbered)
    assert "missing ['0'] (clean_1m_geography_part1 does not start a gzip stream)" in str(
        error.value
    )
    # split(1)'s lettered parts: a gap among them, or the first one gone.
    lettered = tmp_path / "lettered"
    lettered.mkdir()
    data = open(parts[1], "rb").read()  # any bytes: nothing is read before the names are checked
    for suffix in ("aa", "ab", "ad"):
        (lettered / f"clean_1m_geography_part{suffix}").write_bytes(data)
    with pytest.raises(archive.ArchiveError, match=r"parts \['aa', 'ab', 'ad'\], missing \['ac'\]"):
        archive.find_archive(lettered)
    (lettered / "clean_1m_geography_partaa").unlink()
    (lettered / "clean_1m_geography_partad").unlink()
    with pytest.raises(archive.ArchiveError, match=r"missing \['aa'\]"):
        archive.find_archive(lettered / "clean_1m_geography_partab")


def test_files_larger_than_the_layout_allows_are_skipped_unread(tmp_path, monkeypatch):
    """A tar member, or a file of a folder, above `layout.max_file_bytes` is reported and never
    read (its bytes are not held); the cap follows the band's size in the layout."""
    assert layout.max_file_bytes("B4.tif") == 2 * 264 * 264 + 65536
    assert layout.max_file_bytes("B1.tif") == 2 * 44 * 44 + 65536
    root = tmp_path / "archive"
    write_location(root, "000000", EARLY + LATE)
    folders = [f for f in sorted((root / "000000").iterdir()) if f.is_dir()]
    oversized = b"\0" * (layout.max_file_bytes("B4.tif") + 1)  # a few hundred kB, all zeros
    (folders[0] / "B4.tif").write_bytes(oversized)
    (folders[1] / layout.METADATA_FILE).write_bytes(b" " * (layout.MAX_METADATA_BYTES + 1))
    tar = pack_tar_gz(os.fspath(root), os.fspath(tmp_path / "a.tar.gz"))
    reads = []
    real_read = archive._read
    monkeypatch.setattr(archive, "_read", lambda path: reads.append(path) or real_read(path))
    for path in (root, tar):
        (location,) = archive.read_locations(archive.find_archive(path), RGB_KEEP)
        assert "B4.tif" not in location.acquisitions[folders[0].name]
        assert location.unreadable[f"{folders[0].name}/B4.tif"] == (
            f"{len(oversized):,} bytes, more than the {layout.max_file_bytes('B4.tif'):,} a "
            "B4.tif of the archive's layout can hold (not read)"
        )
        (decoded,) = [archive.decode_location(location, {"rgb": layout.RGB_BANDS})]
        assert decoded.issues[0][:2] == (folders[0].name, "acquisition skipped")
        assert decoded.issues[0][2].startswith(f"unreadable band B4: {len(oversized):,} bytes")
        assert decoded.issues[1][:2] == (folders[1].name, "cloud unknown")
        assert decoded.example is not None  # 9 acquisitions are enough
    assert os.path.join(folders[0], "B4.tif") not in reads  # the folder form: never opened
    assert os.path.join(folders[1], layout.METADATA_FILE) not in reads
    assert os.path.join(folders[1], "B4.tif") in reads


def test_a_location_with_more_acquisitions_than_a_reader_keeps_is_skipped_unread(tmp_path):
    root = tmp_path / "archive"
    many = layout.MAX_ACQUISITIONS_PER_LOCATION + 2
    times = [EARLY[0] + datetime.timedelta(days=3 * i) for i in range(many)]
    write_location(root, "000000", times, bands=("B4",))
    for path in (root, pack_tar_gz(os.fspath(root), os.fspath(tmp_path / "a.tar.gz"))):
        (location,) = archive.read_locations(archive.find_archive(path), frozenset({"B4.tif"}))
        assert len(location.acquisitions) == layout.MAX_ACQUISITIONS_PER_LOCATION
        assert len(location.dropped_acquisitions) == 2
        decoded = archive.decode_location(location, {"rgb": ("B4",)})
        assert decoded.example is None
        assert decoded.skip_reason.startswith(f"{many} acquisition folders, more than the 40")
    # What one location can hold in memory, at most (docs/data.md states it).
    assert archive.max_location_bytes(RGB_KEEP) == 40 * (3 * (2 * 264 * 264 + 65536) + (1 << 20))


def test_the_band_header_is_checked_before_any_pixel_is_decoded(tmp_path):
    """A 40000 x 40000 band in a file of a few kB (sparse tiles): refused from its header, so
    nothing the size of its pixels (1.6 GB) is allocated."""
    root = tmp_path / "archive"
    write_location(root, "000000", EARLY + LATE)
    folder = next(f for f in sorted((root / "000000").iterdir()) if f.is_dir())
    huge = folder / "B4.tif"
    with rasterio.open(
        huge, "w", driver="GTiff", width=40000, height=40000, count=1, dtype="uint8",
        crs="EPSG:4326", transform=rasterio.transform.from_origin(7, 45, 1e-5, 1e-5),
        tiled=True, sparse_ok=True, compress="deflate",
    ) as dataset:  # fmt: skip
        dataset.write(np.ones((16, 16), np.uint8), 1, window=rasterio.windows.Window(0, 0, 16, 16))
    assert huge.stat().st_size < layout.max_file_bytes("B4.tif")
    (decoded,) = decode_all(root)
    assert decoded.issues == [
        (
            folder.name,
            "acquisition skipped",
            "band B4 is uint8(40000, 40000), expected uint8(264, 264)",
        )
    ]


def test_an_acquisition_without_crs_or_transform_is_skipped_not_placed_at_its_pixel_centre(
    tmp_path,
):
    root = tmp_path / "archive"
    write_location(root, "000000", EARLY + LATE)
    write_location(root, "000001", EARLY + LATE, seed=1)
    folders = [f for f in sorted((root / "000000").iterdir()) if f.is_dir()]
    for folder in folders:  # every acquisition of 000000 loses its georeferencing
        for band in layout.RGB_BANDS:
            pixels = rasterio.open(folder / layout.band_file(band)).read(1)
            with rasterio.open(
                folder / layout.band_file(band), "w", driver="GTiff", width=264, height=264,
                count=1, dtype="uint8",
            ) as dataset:  # fmt: skip
                dataset.write(pixels, 1)
    unplaced, placed = decode_all(root)
    assert unplaced.example is None
    assert [issue[2] for issue in unplaced.issues] == [
        "band B4 is not georeferenced (no CRS and transform): its location cannot be placed"
    ] * 10
    assert unplaced.skip_reason.startswith("too few acquisitions: 0 early, 0 late")
    assert placed.example is not None and abs(placed.example["lat"] - 46.0) < 0.1
