"""The downloader up to the Earth Engine boundary, with a fake client: layout, resume, failures."""

import csv
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import zlib

import numpy as np
import pytest
import rasterio
from helpers import SETTINGS, SITES, WINDOWS, FakeClient, fake_band, fake_kind

from caco_jax import config as config_lib
from caco_jax.data import dataset, layout
from caco_jax.settings import SettingsError
from caco_jax.sources.download import downloader, footprint, writer
from caco_jax.sources.download.client import Acquisition, TransientError
from caco_jax.sources.download.downloader import choose_acquisitions, download_all
from caco_jax.sources.download.task import run


def _fifth(day, window):
    start, end = WINDOWS[window]
    return int((day - start) / ((end - start) / 5))


def _files(folder):
    """{relative path: sha256} of every file under folder."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_reflectance_to_uint8_clips_and_truncates_like_seco():
    dn = np.array([-5, 0, 39, 40, 5000, 9999, 10_000, 12_000])
    np.testing.assert_array_equal(layout.to_archive_uint8(dn), [0, 0, 0, 1, 127, 254, 255, 255])
    qa60 = np.array([[0, 1 << 10], [1 << 11, 1 << 3]])
    assert downloader.cloud_fraction(downloader.CLOUD_MASKS["qa60"], qa60) == 0.5
    scl = np.array([[3, 4, 5, 6, 7], [8, 9, 10, 11, 2]])
    assert downloader.cloud_fraction(downloader.CLOUD_MASKS["scl"], scl) == 0.4
    # The group with the cloud band is fetched first, so a cloudy patch costs one request.
    assert downloader.fetch_groups(downloader.CLOUD_MASKS["scl"]) == [
        (20, ("B5", "B6", "B7", "B8A", "B11", "B12", "SCL")),
        (10, ("B2", "B3", "B4", "B8")),
        (60, ("B1", "B9")),
    ]
    assert downloader.fetch_groups(downloader.CLOUD_MASKS["qa60"])[0] == (60, ("B1", "B9", "QA60"))
    assert downloader.nodata_fraction(np.array([[[0, 0], [0, 3]]])) == 0.5


def test_choice_spreads_over_the_window_and_merges_same_day_scenes():
    start, end = datetime.date(2019, 1, 1), datetime.date(2020, 1, 1)

    def acq(month, day, cloud, tile="T31UDQ"):
        t = datetime.datetime(2019, month, day, 10, 30)
        return Acquisition(f"{t:%Y%m%dT%H%M%S}_{t:%Y%m%dT%H%M%S}_{tile}", t, cloud, {})

    scenes = [acq(1, 5, 8.0), acq(1, 5, 2.0, "T31UDR"), acq(2, 1, 1.0), acq(6, 1, 5.0),
              acq(6, 20, 3.0), acq(7, 1, 4.0), acq(12, 1, 9.0)]  # fmt: skip
    bad = {"20190201", "20190620"}  # their patches turn out cloudy
    tried = []

    def try_one(a):
        tried.append(a.product_id[:8])
        return None if a.product_id[:8] in bad else a

    chosen = choose_acquisitions(scenes, start, end, 5, try_one, max_tries=20)
    # Periods of 73 days: Jan 1-Mar 14 (Feb 1, then Jan 5), Mar 15-May 26 (none), May 27-Aug 7
    # (Jun 20, then Jul 1, then Jun 1), Aug 8-Oct 19 (none), Oct 20-Dec 31 (Dec 1). Round 1 tries
    # the least cloudy of each, round 2 the next of the two whose first was bad; then the rest by
    # cloud. Jan 5 is the less cloudy T31UDR twin.
    assert tried == ["20190201", "20190620", "20191201", "20190105", "20190701", "20190601"]
    assert [a.product_id[:8] for a in chosen] == ["20191201", "20190105", "20190701", "20190601"]
    assert chosen[1].product_id.endswith("T31UDR")
    tried.clear()
    assert len(choose_acquisitions(scenes, start, end, 5, try_one, max_tries=3)) == 1
    assert len(tried) == 3


def test_written_layout_is_exactly_the_published_one(tmp_path):
    client = FakeClient()
    archive = str(tmp_path / "clean_custom_geography")
    sites = SITES[1:]
    summary = download_all(client, sites, archive, SETTINGS, progress=False)
    assert (summary.written, summary.skipped, summary.failed) == (3, 0, {})
    assert sorted(os.listdir(archive)) == [s.location_id for s in sites]
    for site in sites:
        location = os.path.join(archive, site.location_id)
        folders = sorted(
            n for n in os.listdir(location) if os.path.isdir(os.path.join(location, n))
        )
        previews = sorted(n for n in os.listdir(location) if n.endswith(".tif"))
        assert previews == [f"{n}.tif" for n in folders]
        assert len(folders) == 10
        times = [layout.sensing_time(n).date() for n in folders]
        assert times == sorted(times)
        assert all(WINDOWS[0][0] <= t < WINDOWS[0][1] for t in times[:5])
        assert all(WINDOWS[1][0] <= t < WINDOWS[1][1] for t in times[5:])
        # Every fifth of a window that has a good scene gives one of the acquisitions.
        for window, chosen in ((0, times[:5]), (1, times[5:])):
            start, end = WINDOWS[window]
            scenes = client.search(site.lat, site.lon, start, end, SETTINGS.max_scene_cloud)
            good = {
                _fifth(a.time.date(), window) for a in scenes if fake_kind(a.product_id) == "good"
            }
            assert {_fifth(t, window) for t in chosen} == good
        grids = footprint.patch_grids(site.lat, site.lon)
        box = footprint.geobox(grids[10], site.lon)
        assert box.west < box.east and abs(box.center[0] - site.lat) < 0.001
        for name in folders:
            assert fake_kind(name) == "good"
            folder = os.path.join(location, name)
            assert sorted(os.listdir(folder)) == sorted(
                [layout.band_file(b) for b in layout.BANDS] + [layout.METADATA_FILE]
            )
            for band in layout.BANDS:
                with rasterio.open(os.path.join(folder, layout.band_file(band))) as src:
                    assert (src.driver, src.count, src.dtypes[0]) == ("GTiff", 1, "uint8")
                    assert src.shape == layout.band_shape(band)
                    assert (
                        src.compression == rasterio.enums.Compression.jpeg
                        and src.crs.to_epsg() == 4326
                    )
                    np.testing.assert_allclose(
                        src.bounds, (box.west, box.south, box.east, box.north), atol=1e-9
                    )
                    pixels = src.read(1).astype(np.float64)
                raw = fake_band(name, band, layout.band_shape(band)[0])
                expected = layout.to_archive_uint8(raw)
                assert np.abs(pixels - expected).mean() < 2.0  # JPEG is lossy
            with open(os.path.join(folder, layout.METADATA_FILE)) as f:
                metadata = json.load(f)
            assert metadata["system:index"] == name and layout.CLOUD_PROPERTY in metadata
            with rasterio.open(os.path.join(location, f"{name}.tif")) as src:
                assert (src.count, src.shape) == (3, (264, 264))
    # Cloudy-patch candidates cost one request (the 20 m group with SCL), good ones three.
    assert summary.requests == 2 * len(sites) + client.fetches


def test_a_failing_location_is_reported_and_not_fatal(tmp_path):
    client = FakeClient(
        fail_search={-33.9: ValueError("Image.load: asset not found")}, scarce={35.7}
    )
    config = config_lib.for_tasks("download")
    config.download.locations = str(tmp_path / "locations.csv")
    config.download.output = str(tmp_path / "archive" / "clean_custom_geography")
    config.download.concurrent_requests = 2
    config.download.cloud_mask = "qa60"  # SeCo's cloud band, screened with the 60 m group
    config_lib.validate(config)
    with open(config.download.locations, "w") as f:
        f.write(
            "location_id,lat,lon\n" + "".join(f"{s.location_id},{s.lat},{s.lon}\n" for s in SITES)
        )
    result = run(client, config_lib.resolve(config), str(tmp_path), progress=False)
    assert (result["complete"], result["failed"]) == (2, 2)
    assert sorted(os.listdir(config.download.output)) == ["000000", "000002"]
    with open(result["report"]) as f:
        failed = json.load(f)["failed"]
    assert "asset not found" in failed["000001"]
    assert failed["000003"].startswith(
        "window 0 (2019-01-01..2020-01-01): 1 usable acquisitions, need 3"
    )
    assert "2 scenes with cloud < 10%, rejected: 1 cloudy patch" in failed["000003"]
    with open(config.download.output + "_download_report.csv", newline="") as f:
        assert list(csv.reader(f)) == [
            ["location_id", "reason"],
            ["000001", "ValueError: Image.load: asset not found"],
            ["000003", failed["000003"]],
        ]


def test_transient_errors_are_retried_with_exponential_backoff(tmp_path):
    delays = []
    client = FakeClient(transient_every=5)
    settings = dataclasses.replace(SETTINGS, concurrent_requests=1, retry_base_seconds=1.0)
    summary = download_all(
        client, SITES[:1], str(tmp_path / "a"), settings, progress=False, sleep=delays.append
    )
    assert summary.written == 1 and summary.retries == len(delays) > 0
    assert all(0.5 <= d <= 1.5 for d in delays)  # first retry of each request: base x [0.5, 1.5]

    class AlwaysBusy(FakeClient):
        def fetch(self, acquisition, bands, grid):
            raise TransientError("503 Service Unavailable")

    delays.clear()
    settings = dataclasses.replace(settings, max_retries=3)
    summary = download_all(
        AlwaysBusy(), SITES[:1], str(tmp_path / "b"), settings, progress=False, sleep=delays.append
    )
    assert "gave up after 4 attempts" in summary.failed["000000"]
    assert [round(d / 2**k, 6) >= 0.5 and d / 2**k <= 1.5 for k, d in enumerate(delays)] == [
        True
    ] * 3


def test_resume_after_an_interruption_gives_the_same_archive(tmp_path):
    clean = str(tmp_path / "clean")
    download_all(FakeClient(), SITES[:3], clean, SETTINGS, progress=False)

    archive = str(tmp_path / "resumed")
    serial = dataclasses.replace(SETTINGS, concurrent_requests=1)
    # Ctrl-C while fetching the second location.
    with pytest.raises(KeyboardInterrupt):
        download_all(FakeClient(crash_at_fetch=40), SITES[:3], archive, serial, progress=False)
    assert os.listdir(archive) == ["000000"]
    # A crash while writing the third location leaves only a dot-folder that readers ignore.
    real_write = layout.write_band_geotiff
    calls = []

    def crashing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 120 + 30:  # 30 files into the second location of this run
            raise KeyboardInterrupt
        real_write(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(writer.layout, "write_band_geotiff", crashing_write)
        with pytest.raises(KeyboardInterrupt):
            download_all(FakeClient(), SITES[:3], archive, serial, progress=False)
    assert sorted(os.listdir(archive)) == [".partial-000002", "000000", "000001"]

    client = FakeClient()
    summary = download_all(client, SITES[:3], archive, SETTINGS, progress=False)
    assert (summary.skipped, summary.written, summary.partials_removed) == (2, 1, 1)
    # The finished locations were not fetched again: 1 location x 10 good acquisitions x 3 requests,
    # plus one screening request per rejected candidate.
    assert len(client.fetched_products) < 10 * 3 + 10
    assert _files(archive) == _files(clean)


def test_bad_download_config_names_the_key():
    config = config_lib.for_tasks("download")
    config.download.windows = (("2019-01-01", "2020-06-01"), ("2023-01-01", "2024-01-01"))
    with pytest.raises(SettingsError, match=r"config\.download\.windows"):
        config_lib.validate(config)
    config.download.windows = (("2023-01-01", "2024-01-01"), ("2019-01-01", "2020-01-01"))
    with pytest.raises(SettingsError, match="early window must end first"):
        config_lib.validate(config)
    config = config_lib.for_tasks("download")
    config.download.min_acquisitions_per_window = 6
    with pytest.raises(SettingsError, match=r"config\.download\.min_acquisitions_per_window"):
        config_lib.validate(config)


def test_the_core_never_imports_earth_engine():
    import sys

    assert "ee" not in sys.modules


def test_a_downloaded_archive_goes_through_the_builder(tmp_path):

    archive = str(tmp_path / "archive" / "clean_custom_geography")
    sites = SITES[:2]
    download_all(FakeClient(), sites, archive, SETTINGS, progress=False)
    # What an interrupted write leaves (a full-looking dot-folder) never reaches the records.
    shutil.copytree(os.path.join(archive, "000000"), os.path.join(archive, ".partial-000002"))

    config = config_lib.for_tasks("prepare")
    config.data.archive = str(tmp_path / "archive")  # the report files beside it are ignored
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.num_workers = 1
    config.data.max_skip_fraction = 0.0
    result = dataset.run_task(config_lib.resolve(config), str(tmp_path))
    assert (result["locations_written"], result["locations_skipped"]) == (2, 0)
    assert result["acquisitions_written"] == 20

    source = dataset.open_records(config.data.data_dir, "rgb")
    assert len(source) == 2
    for index, site in enumerate(sites):
        arrays = source[index]
        assert arrays["location_id"] == site.location_id
        assert abs(arrays["lat"] - site.lat) < 1e-3 and abs(arrays["lon"] - site.lon) < 1e-3
        np.testing.assert_array_equal(arrays["window"], [0] * 5 + [1] * 5)
        folders = sorted(
            n for n in os.listdir(os.path.join(archive, site.location_id)) if not n.endswith(".tif")
        )
        assert arrays["date"] == [layout.sensing_time(n).isoformat() for n in folders]
        expected_cloud = [zlib.crc32(n.encode()) % 30 for n in folders]
        np.testing.assert_array_equal(arrays["cloud"], expected_cloud)
        assert arrays["pixels"].shape == (10, 264, 264, 3)
        with rasterio.open(os.path.join(archive, site.location_id, folders[0], "B4.tif")) as src:
            np.testing.assert_array_equal(arrays["pixels"][0, ..., 0], src.read(1))


class _FakeEarthEngine:
    """Just enough of the `ee` module to check the requests EarthEngineClient builds."""

    def __init__(self):
        self.calls = []
        self.data = self
        fake = self

        class Chain:
            def __init__(self, *args):
                fake.calls.append((type(self).__name__, args))

            def __getattr__(self, name):
                return lambda *args: (fake.calls.append((name, args)), self)[1]

            def getInfo(self):
                fake.calls.append(("getInfo", ()))
                return fake.info

        self.ImageCollection = type("ImageCollection", (Chain,), {})
        self.Image = type("Image", (Chain,), {})
        self.Geometry = type("Geometry", (), {"Point": staticmethod(lambda xy: ("Point", xy))})
        self.Filter = type("Filter", (), {"lt": staticmethod(lambda k, v: ("lt", k, v))})

    def Initialize(self, project=None, url=None):
        self.calls.append(("Initialize", (project, url)))

    def computePixels(self, request):
        self.calls.append(("computePixels", request))
        size = request["grid"]["dimensions"]["width"]
        names = ("B1", "B9", "QA60")
        return np.zeros((size, size), dtype=[(n, "<u2") for n in names])


def test_earth_engine_client_builds_the_expected_requests(monkeypatch):
    import sys

    from caco_jax.sources.download import earth_engine

    fake = _FakeEarthEngine()
    fake.info = {
        "features": [
            {
                "id": "COPERNICUS/S2_SR_HARMONIZED/20190105T103021_20190105T103302_T31UDQ",
                "properties": {
                    "system:index": "20190105T103021_20190105T103302_T31UDQ",
                    "system:time_start": 1546684221000,
                    "CLOUDY_PIXEL_PERCENTAGE": 3.5,
                },
            }
        ]
    }
    monkeypatch.setitem(sys.modules, "ee", fake)
    client = earth_engine.EarthEngineClient("COPERNICUS/S2_SR_HARMONIZED", project="my-project")
    assert fake.calls[0] == ("Initialize", ("my-project", earth_engine.HIGH_VOLUME_URL))
    (acq,) = client.search(48.85, 2.35, WINDOWS[0][0], WINDOWS[0][1], 10.0)
    assert acq.product_id == "20190105T103021_20190105T103302_T31UDQ"
    assert acq.time == datetime.datetime(2019, 1, 5, 10, 30, 21) and acq.cloud == 3.5
    assert acq.properties["system:id"].endswith(acq.product_id)
    names = [name for name, _ in fake.calls]
    assert names[1:] == ["ImageCollection", "filterBounds", "filterDate", "filter", "sort", "limit",
                         "getInfo"]  # fmt: skip
    assert fake.calls[2][1] == (("Point", [2.35, 48.85]),)
    assert fake.calls[3][1] == ("2019-01-01", "2020-01-01")
    assert fake.calls[4][1] == (("lt", "CLOUDY_PIXEL_PERCENTAGE", 10.0),)

    grid = footprint.patch_grids(48.85, 2.35)[60]
    pixels = client.fetch(acq, ("B1", "B9", "QA60"), grid)
    assert pixels.shape == (44, 44, 3)
    request = fake.calls[-1][1]
    assert request["fileFormat"] == "NUMPY_NDARRAY" and request["grid"]["crsCode"] == "EPSG:32631"
    assert request["grid"]["affineTransform"] == {
        "scaleX": 60, "shearX": 0, "translateX": grid.west,
        "shearY": 0, "scaleY": -60, "translateY": grid.north,
    }  # fmt: skip
    assert ("Image", (f"COPERNICUS/S2_SR_HARMONIZED/{acq.product_id}",)) in fake.calls
    assert ("unmask", (0,)) in fake.calls


def test_earth_engine_errors_are_sorted_into_transient_and_permanent():
    from caco_jax.sources.download import earth_engine

    def failing(message):
        def fn():
            raise RuntimeError(message)

        return fn

    for message in ("Too Many Requests: rate exceeded", "Computation timed out.", "503 Backend"):
        with pytest.raises(TransientError):
            earth_engine._translate_errors(failing(message))
    with pytest.raises(RuntimeError, match=r"Image\.load"):
        earth_engine._translate_errors(failing("Image.load: Image asset not found."))
