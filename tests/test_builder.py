"""The caco_geography TFDS builder (data/builder.py) and reading its records (data/records.py)."""

import csv
import fcntl
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import rasterio
import tensorflow_datasets as tfds
from helpers import (
    EARLY,
    LATE,
    RGB_GROUPS,
    RGB_KEEP,
    all_records,
    assert_same_records,
    count_record_reads,
    pack_tar_gz,
    prepare,
    replicated_tar,
    split_parts,
    synthetic_folder,
    write_location,
)

from caco_jax import config as config_lib
from caco_jax.data import archive, builder, dataset, layout, normalization, records, shard_writer
from caco_jax.runtime import locks


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return synthetic_folder(tmp_path_factory)


@pytest.fixture
def faulty_archive(tmp_path):
    """5 locations: one too short, one with an unreadable band in an otherwise good location."""
    root = tmp_path / "faulty" / "clean_10k_geography"
    for i in range(4):
        write_location(root, f"{i:06d}", EARLY + LATE, seed=i)
    write_location(root, "000004", EARLY[:2] + LATE, seed=4)
    bad = next(f for f in sorted((root / "000001").iterdir()) if f.is_dir())
    (bad / "B3.tif").write_bytes(b"garbage")
    return root, bad.name


def test_every_input_form_gives_identical_records_and_run_task_uses_the_synthetic_archive(
    synthetic, tmp_path
):
    config = config_lib.for_tasks("prepare")
    config.data.num_workers = 2
    work = tmp_path / "work"  # with the synthetic archive where the `synthesize` task leaves it
    os.makedirs(work)
    os.symlink(os.path.dirname(synthetic), work / "synthetic_archive")
    result = dataset.run_task(config_lib.resolve(config), os.fspath(work))
    data_dir = tmp_path / "work" / "tfds"
    assert result["locations_written"] == 3 and result["source_files"] == [
        "clean_synthetic_geography"
    ]
    assert os.path.exists(result["skip_report"])
    folder = all_records(data_dir)
    assert [r["location_id"] for r in folder] == ["000000", "000001", "000002"]
    assert all(r["pixels"].shape == (10, 264, 264, 3) for r in folder)

    tar_dir = tmp_path / "tar"
    tar_dir.mkdir()
    tar = pack_tar_gz(synthetic, os.fspath(tar_dir / "clean_synthetic_geography.tar.gz"))
    config.data.archive, config.data.data_dir = tar, os.fspath(tmp_path / "tfds_tar")
    result_tar = dataset.run_task(config_lib.resolve(config), os.fspath(tmp_path / "work"))
    assert result_tar["locations_written"] == 3
    metadata = tfds.builder_from_directory(
        tmp_path / "tfds_tar/caco_geography/rgb/2.0.0"
    ).info.metadata
    assert metadata["source_form"] == "tar.gz"
    assert_same_records(all_records(tmp_path / "tfds_tar"), folder)
    config.data.archive, config.data.data_dir = "", ""
    split_parts(os.fspath(tar_dir / "clean_synthetic_geography.tar.gz"))
    prepared = prepare(tar_dir, tmp_path / "tfds_parts")
    assert prepared.info.metadata["source_files"] == [
        f"clean_synthetic_geography_part{i}" for i in range(4)
    ]
    assert_same_records(all_records(tmp_path / "tfds_parts"), folder)

    # Prepared data is reused, but never silently for another archive.
    reused = dataset.run_task(config_lib.resolve(config), os.fspath(tmp_path / "work"))
    assert reused == {**result, "reused": True} and result["reused"] is False
    config.data.archive = os.fspath(tar_dir)
    with pytest.raises(archive.ArchiveError, match=r"prepared from.*not from.*delete"):
        dataset.run_task(config_lib.resolve(config), os.fspath(tmp_path / "work"))
    config.data.archive = ""
    with pytest.raises(archive.ArchiveError, match=r"config\.data\.archive is empty"):
        dataset.run_task(config_lib.resolve(config), os.fspath(tmp_path / "nothing"))


def test_all_bands_records_hold_every_band_at_native_resolution(synthetic, tmp_path):
    prepare(synthetic, tmp_path, config="all_bands")
    record = all_records(tmp_path, "all_bands")[2]
    location = os.path.join(synthetic, record["location_id"])
    folders = sorted(d for d in os.listdir(location) if not d.endswith(".tif"))
    assert record["window"].tolist() == [0] * 5 + [1] * 5
    assert record["date"][0] == layout.sensing_time(folders[0]).isoformat()
    for res in (10, 20, 60):
        pixels = record["pixels"][f"bands_{res}m"]
        size = layout.PIXELS_AT_RESOLUTION[res]
        assert pixels.shape == (10, size, size, len(layout.BANDS_AT_RESOLUTION[res]))
        for t in (0, 9):
            for c, band in enumerate(layout.BANDS_AT_RESOLUTION[res]):
                path = os.path.join(location, folders[t], layout.band_file(band))
                with rasterio.open(path) as ds:
                    np.testing.assert_array_equal(pixels[t, ..., c], ds.read(1))

    # The per-band statistics were computed while preparing: pretraining reads no pixels for them.
    source = dataset.open_records(os.fspath(tmp_path), "all_bands")
    reads = count_record_reads(source)
    stored = normalization.for_records("all_bands", source)
    assert reads == []
    assert stored == normalization.from_records(source, num_locations=normalization.STATS_LOCATIONS)
    assert len(reads) > 0  # from_records read them again, for the comparison
    reads.clear()
    assert normalization.for_records("all_bands", source, num_locations=2) == (
        normalization.from_records(source, num_locations=2)
    )
    assert reads  # another number of locations than the stored one: computed at start-up


def test_skips_are_reported_beside_the_records_and_in_the_metadata(
    faulty_archive, tmp_path, capsys
):
    root, bad_acquisition = faulty_archive
    prepared = prepare(root.parent, tmp_path, max_skip_fraction=0.25)
    with open(prepared.data_path / builder.SKIP_REPORT) as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["location_id", "product_id", "action", "reason"]
    assert rows[1][:3] == ["000001", bad_acquisition, "acquisition skipped"]
    assert rows[1][3].startswith("unreadable band B3")
    assert rows[2] == [
        "000004",
        "",
        "location skipped",
        "too few acquisitions: 2 early, 5 late (need >= 3 per window)",
    ]
    assert len(rows) == 3
    metadata = tfds.builder_from_directory(prepared.data_path).info.metadata
    assert metadata["source_files"] == ["clean_10k_geography"]
    assert (metadata["locations_read"], metadata["locations_written"]) == (5, 4)
    assert (metadata["acquisitions_written"], metadata["acquisitions_skipped"]) == (39, 1)
    assert metadata["ignored_files"] == 47  # the previews
    assert metadata["skip_reasons"] == {
        "acquisition skipped: unreadable band B3": 1,
        "location skipped: too few acquisitions": 1,
    }
    assert (
        "4 of 5 locations written (39 acquisitions); skipped 1 locations" in capsys.readouterr().out
    )
    source = dataset.open_records(tmp_path)
    assert sorted(len(source.windows(i)) for i in range(len(source))) == [9, 10, 10, 10]


def test_too_many_skips_fail_the_build_and_leave_only_the_report(faulty_archive, tmp_path):
    root, _ = faulty_archive
    with pytest.raises(builder.TooManySkipsError, match=r"skipped 1 of 5 locations \(20.0%\)"):
        prepare(root.parent, tmp_path, max_skip_fraction=0.1)
    config_dir = tmp_path / "caco_geography" / "rgb"
    assert sorted(os.listdir(config_dir)) == [builder.FAILED_SKIP_REPORT]
    assert "too few acquisitions" in (config_dir / builder.FAILED_SKIP_REPORT).read_text()
    assert not builder.CacoGeography(config="rgb", data_dir=os.fspath(tmp_path)).is_prepared()
    with pytest.raises(FileNotFoundError, match="no prepared caco_geography/rgb records"):
        dataset.open_records(os.fspath(tmp_path))
    prepare(root.parent, tmp_path, max_skip_fraction=0.2)
    assert sorted(os.listdir(config_dir)) == ["2.0.0"]


def test_truncated_archive_fails_without_leaving_a_dataset(tmp_path):
    root = tmp_path / "src" / "caco"
    for i in range(4):
        write_location(root, f"{i:06d}", EARLY + LATE, seed=i)
    manual = tmp_path / "manual"
    manual.mkdir()
    tar = pack_tar_gz(os.fspath(root), os.fspath(manual / "caco10k.tar.gz"))
    data = open(tar, "rb").read()
    open(tar, "wb").write(data[: len(data) // 2])
    with pytest.raises(
        archive.ArchiveError, match=r"caco10k\.tar\.gz: truncated or corrupt archive"
    ):
        prepare(manual, tmp_path / "tfds")
    assert os.listdir(tmp_path / "tfds" / "caco_geography" / "rgb") == []


def test_records_read_through_tfds_data_source_and_grain_without_tensorflow(synthetic, tmp_path):
    import grain

    prepare(synthetic, tmp_path)
    source = tfds.data_source(
        "caco_geography/rgb", split="train", data_dir=os.fspath(tmp_path), download=False
    )
    dataset = grain.MapDataset.source(source).map(lambda r: (r["location_id"], r["rgb"]))
    ids = [dataset[i][0].decode() for i in range(len(dataset))]
    # One record per acquisition, a location's acquisitions contiguous.
    assert ids == [f"{i:06d}" for i in range(3) for _ in range(10)]
    assert dataset[1][1].dtype == np.uint8 and dataset[1][1].shape == (264, 264, 3)
    assert "tensorflow" not in sys.modules


def test_the_side_index_agrees_with_the_records(faulty_archive, tmp_path):
    root, bad_acquisition = faulty_archive
    prepare(root.parent, tmp_path, max_skip_fraction=0.25, num_workers=2)
    source = dataset.open_records(os.fspath(tmp_path))
    acquisitions = source.acquisitions  # the tfds.data_source, decoded by TFDS
    index = source.index
    assert len(source) == 4 and index.num_acquisitions == len(acquisitions) == 39
    assert index.count.tolist() == [10, 9, 10, 10]  # 000001 lost one acquisition
    for location in range(len(source)):
        span = index.records(location)
        for t, key in enumerate(range(span.start, span.stop)):
            record = acquisitions[key]
            assert record["location_id"].decode() == index.location_id[location]
            assert (record["lat"], record["lon"]) == (index.lat[location], index.lon[location])
            assert record["window"] == index.window[key]
            assert record["date"].decode() == str(index.date[key])
            assert record["cloud"] == index.cloud[key]
            np.testing.assert_array_equal(record["rgb"], source.pixels(location, [t])[0])
            if location == 1:
                assert record["product_id"].decode() != bad_acquisition
    assert records.location_table(source)[1][0] == "000001"


def test_records_of_builder_version_1_are_refused_with_how_to_prepare_again(synthetic, tmp_path):
    prepared = prepare(synthetic, tmp_path)
    old = tmp_path / "caco_geography" / "rgb" / "1.0.0"
    os.rename(prepared.data_path, old)  # what the one-record-per-location builder left
    with pytest.raises(dataset.OutdatedRecordsError) as error:
        dataset.open_records(os.fspath(tmp_path))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{old}: caco_geography/rgb records")
    assert f"delete {old} and run the 'prepare' task" in message


def test_importing_caco_jax_registers_the_builder_and_stays_light():
    code = (
        "import sys, caco_jax, tensorflow_datasets as tfds; "
        "assert 'caco_geography' in tfds.list_builders(with_community_datasets=False); "
        "heavy = [m for m in ('jax', 'rasterio', 'grain', 'tensorflow') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(__file__) + "/..")


def test_peak_memory_of_streaming_does_not_grow_with_the_archive(tmp_path):
    write_location(tmp_path / "one", "000000", EARLY + LATE)
    peaks = {}
    for n in (10, 40):
        tar = replicated_tar(tmp_path / "one" / "000000", n, tmp_path / f"a{n}.tar.gz")
        locations = archive.read_locations(archive.find_archive(tar), RGB_KEEP)
        written = []
        out = tmp_path / f"shards{n}"
        out.mkdir()
        tracemalloc.start()
        shards = shard_writer.write_shards(
            locations,
            groups=RGB_GROUPS,
            features=builder.acquisition_features(RGB_GROUPS),
            directory=os.fspath(out),
            prefix="records",
            num_workers=2,
            on_location=written.append,
        )
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert [w.decoded.location_id for w in written] == [f"{i:06d}" for i in range(n)]
        assert sum(shard.num_records for shard in shards) == 10 * n  # one per acquisition
    location_bytes = 10 * 264 * 264 * 3  # one decoded location
    assert peaks[40] < 1.3 * peaks[10] + location_bytes
    assert peaks[40] < 12 * location_bytes  # far below the 40 locations streamed


def test_another_file_format_is_refused_before_anything_is_written(synthetic, tmp_path):
    with pytest.raises(ValueError, match="writes array_record files only"):
        prepare(synthetic, tmp_path / "tfds", file_format="tfrecord")
    assert not builder.CacoGeography(
        config="rgb", data_dir=os.fspath(tmp_path / "tfds")
    ).is_prepared()


def prepare_task(archive_path, workdir, data_dir=""):
    config = config_lib.for_tasks("prepare")
    config.data.archive, config.data.data_dir = os.fspath(archive_path), os.fspath(data_dir)
    config.data.num_workers = 1
    return dataset.run_task(config_lib.resolve(config), os.fspath(workdir))


def test_records_are_reused_only_while_the_archive_fingerprint_matches(tmp_path, capsys):
    """An archive that grows, or is replaced by one of the same name, between two prepares is
    refused with one line saying what changed; the same archive is reused, saying so."""
    root = tmp_path / "src" / "clean_10k_geography"
    for i in range(3):
        write_location(root, f"{i:06d}", EARLY + LATE, seed=i)
    first = prepare_task(root, tmp_path / "w")
    assert (first["reused"], first["locations_written"]) == (False, 3)
    metadata = tfds.builder_from_directory(first["records"]).info.metadata
    assert metadata[builder.SOURCE_FINGERPRINT] == {
        "form": "folder",
        "files": ["clean_10k_geography"],
        "locations": 3,
    }
    assert prepare_task(root, tmp_path / "w")["reused"] is True
    assert "prepare: reusing the records in" in capsys.readouterr().out
    write_location(root, "000003", EARLY + LATE, seed=3)  # the archive grows
    with pytest.raises(dataset.ArchiveChangedError) as error:
        prepare_task(root, tmp_path / "w")
    assert "it changed since (3 location folders then, 4 now)" in str(error.value)

    tar_dir = tmp_path / "tar"
    tar_dir.mkdir()
    tar = pack_tar_gz(os.fspath(root), os.fspath(tar_dir / "caco10k.tar.gz"))
    assert prepare_task(tar_dir, tmp_path / "t")["locations_written"] == 4
    assert prepare_task(tar, tmp_path / "t")["reused"] is True
    stat = os.stat(tar)
    os.utime(tar, (stat.st_atime, stat.st_mtime + 3600))  # downloaded again, or replaced
    with pytest.raises(dataset.ArchiveChangedError) as error:
        prepare_task(tar_dir, tmp_path / "t")
    message = str(error.value)
    assert f"caco10k.tar.gz: {stat.st_size:,} bytes modified" in message and "\n" not in message
    # Records prepared before fingerprints were stored: compared by the total size they record.
    records = prepare_task(tar_dir, tmp_path / "legacy")["records"]
    info = tfds.builder_from_directory(records).info
    del info.metadata[builder.SOURCE_FINGERPRINT]
    info.write_to_directory(records)
    assert prepare_task(tar_dir, tmp_path / "legacy")["reused"] is True
    assert "prepared before archives were fingerprinted" in capsys.readouterr().out
    with open(tar, "ab") as f:
        f.write(b"\0" * 1024)
    with pytest.raises(dataset.ArchiveChangedError, match=r"when it had \d+ bytes; it has \d+"):
        prepare_task(tar_dir, tmp_path / "legacy")


def test_a_prepare_removes_what_an_interrupted_one_left_and_a_second_writer_is_refused(
    tmp_path, capsys
):
    root = tmp_path / "src" / "clean_10k_geography"
    write_location(root, "000000", EARLY + LATE)
    data_dir = tmp_path / "tfds"
    # What a prepare killed half way leaves: TFDS's temporary folder with partial shards.
    stale = data_dir / "caco_geography" / "rgb" / "incomplete.AB12CD_2.0.0"
    stale.mkdir(parents=True)
    (stale / "caco_geography-train.array_record-00000-of-00001.tmp").write_bytes(b"partial")
    result = prepare_task(root, tmp_path / "w", data_dir)
    assert result["locations_written"] == 1
    assert not stale.exists()
    assert f"prepare: removed {stale}, left by an interrupted build" in capsys.readouterr().err
    assert locks.LOCK_FILE not in os.listdir(data_dir)  # released
    # Another run holding the data_dir's lock (its own open of the lock file, as a second
    # process would have): refused at once, naming the holder.
    (data_dir / locks.LOCK_FILE).write_text(
        '{"host": "other-host", "pid": 4242, "started": "2026-01-01T00:00:00+00:00"}'
    )
    holder = os.open(data_dir / locks.LOCK_FILE, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(locks.LockedError) as error:
            prepare_task(root, tmp_path / "w", data_dir)
    finally:
        os.close(holder)
    assert str(error.value).startswith(
        f"data_dir {data_dir} is being written by another run (host other-host, pid 4242, "
        "started 2026-01-01T00:00:00+00:00; lock file "
    )


def test_a_truncated_shard_is_named_with_the_fix(synthetic, tmp_path):
    prepared = prepare(synthetic, tmp_path)
    shard = sorted(prepared.data_path.glob("*.array_record-*"))[0]
    os.truncate(shard, os.path.getsize(shard) // 3)  # a copy that stopped early
    source = dataset.open_records(os.fspath(tmp_path))
    with pytest.raises(records.DamagedRecordsError) as error:
        for location in range(len(source)):
            source.pixels(location, [0])
    message = str(error.value)
    assert message.startswith(f"{shard}: record 0 does not read (") and "\n" not in message
    assert message.endswith(
        f"the records are damaged: delete {prepared.data_path} and run the 'prepare' task again"
    )
