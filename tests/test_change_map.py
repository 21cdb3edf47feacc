"""Change maps from an encoder alone: per-location statistics as documented, at the centres of the
locations' GeoTIFF footprints; two scenes compared tile by tile on the first one's grid; labels by
one threshold on the ratio; CSV, GeoJSON, GeoTIFF and figures that hold those numbers."""

import csv
import json
import os

import numpy as np
import pytest
import rasterio
from helpers import write_band_files

from caco_jax import config as config_lib
from caco_jax.data.normalization import EXPORT_KEY, Normalization
from caco_jax.evaluators import common
from caco_jax.models import export
from caco_jax.products import change_map, embed
from caco_jax.sources import synthetic


@pytest.fixture(scope="module")
def archive_and_encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("change")
    path = synthetic.write_archive(str(root), num_locations=3, seed=1, stray_files=False)
    metadata = {EXPORT_KEY: Normalization.rgb().to_json(), "image_size": 32}
    encoder = export.save_encoder(root / "encoder", common.random_encoder(18, 3, seed=2), metadata)
    return path, str(encoder)


def reference_statistics(features, windows):
    """d_lt, d_st of one location, written out from the definitions in numpy."""
    e = features / np.linalg.norm(features, axis=1, keepdims=True)
    early, late = e[windows == 0], e[windows == 1]
    d_lt = np.linalg.norm(early.mean(0) - late.mean(0))
    within = [
        np.linalg.norm(w[i] - w[j]) for w in (early, late) for i in range(len(w))
        for j in range(len(w)) if i != j
    ]  # fmt: skip
    return d_lt, np.mean(within)


def test_change_map_of_an_archive(tmp_path, archive_and_encoder):
    path, encoder = archive_and_encoder
    config = config_lib.for_tasks("change_map")
    config.change_map.source = path
    config.change_map.encoder = encoder
    config.change_map.batch_size = 8
    config.change_map.land_mask = False  # the 1 GB land mask is not needed to test the map
    config_lib.validate(config)
    result = change_map.run_task(config_lib.resolve(config), str(tmp_path))
    assert result["locations"] == 3

    with open(result["change_map_csv"]) as f:
        rows = list(csv.DictReader(f))
    with open(result["change_map_geojson"]) as f:
        points = json.load(f)["features"]
    embeddings = embed.embed(path, encoder, kind="archive", batch_size=8)
    location_of = np.array([i.split("/")[0] for i in embeddings.ids])
    for row, point in zip(rows, points, strict=True):
        location = row["location_id"]
        folder = os.path.join(path, location)
        first = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))[0]
        with rasterio.open(os.path.join(folder, first, "B4.tif")) as band:
            lon, lat = band.transform @ (band.width / 2, band.height / 2)
        np.testing.assert_allclose([float(row["lat"]), float(row["lon"])], [lat, lon], atol=1e-5)
        assert point["geometry"]["coordinates"] == [float(row["lon"]), float(row["lat"])]
        mine = location_of == location
        d_lt, d_st = reference_statistics(embeddings.embeddings[mine], embeddings.window[mine])
        np.testing.assert_allclose(
            [float(row["d_lt"]), float(row["d_st"]), float(row["ratio"])],
            [d_lt, d_st, d_lt / (d_st + 1e-4)],
            rtol=1e-5,
        )
    changed = np.array([r["changed"] == "True" for r in rows])
    ratios = np.array([float(r["ratio"]) for r in rows])
    threshold = change_map.split_threshold(ratios, seed=0)
    np.testing.assert_array_equal(changed, ratios > threshold)
    written = change_map.ChangeMap(
        [r["location_id"] for r in rows],
        *(np.array([float(r[k]) for r in rows]) for k in ("lat", "lon", "d_lt", "d_st", "ratio")),
        threshold,
    )
    check_figures(written, result)
    # The embeddings behind the map are kept, as the embed task writes them.
    kept = embed.Embeddings.read(os.path.join(tmp_path, "change_map", "embeddings"))
    assert kept.ids == embeddings.ids
    np.testing.assert_allclose(kept.embeddings, embeddings.embeddings, atol=1e-6)


def png_pixels(source) -> np.ndarray:
    """RGBA pixels of a PNG file, or of a figure saved the way change_map saves its figures."""
    import io

    import matplotlib.image

    if not isinstance(source, str):
        buffer = io.BytesIO()
        source.savefig(buffer, format="png", **change_map.PNG)
        source = io.BytesIO(buffer.getvalue())
    return matplotlib.image.imread(source, format="png")


def check_figures(result, paths):
    """The figures show the map's numbers, and the PNGs hold exactly the figures' pixels."""
    figure = change_map.map_figure(result, land_mask=False)
    points, rings = figure.axes[0].collections[:2]
    np.testing.assert_allclose(points.get_offsets(), np.stack([result.lon, result.lat], 1))
    np.testing.assert_allclose(points.get_array(), result.ratio)
    np.testing.assert_allclose(
        rings.get_offsets().reshape(-1, 2),
        np.stack([result.lon, result.lat], 1)[result.changed],
    )
    histograms = change_map.location_histograms(result)
    for axes, values in zip(histograms.axes, (result.d_lt, result.d_st, result.ratio), strict=True):
        bars = [p for p in axes.patches if p.get_height() > 0]
        heights = sorted(round(p.get_height()) for p in bars)
        edges = np.histogram_bin_edges(values, bins="auto", range=axes.get_xlim())
        expected = [
            c
            for label in (False, True)
            for c in np.histogram(values[result.changed == label], edges)[0]
        ]
        assert heights == sorted(c for c in expected if c > 0)
    for key, drawn in (("change_map_png", figure), ("histograms_png", histograms)):
        pixels = png_pixels(paths[key])
        np.testing.assert_array_equal(pixels, png_pixels(drawn))
        assert pixels.std() > 0.05  # not blank


def test_locations_without_two_acquisitions_per_window_are_skipped():
    features = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    embeddings = embed.Embeddings(
        ids=["a/1", "a/2", "a/3", "a/4", "b/1"],
        embeddings=features,
        lat=np.zeros(5),
        lon=np.zeros(5),
        window=np.array([0, 0, 1, 1, 0]),
        nodata=np.zeros(5, np.float32),
    )
    statistics, notes = change_map.location_statistics(embeddings)
    assert list(statistics) == ["a"]
    assert notes == ["b: 1 early and 0 late acquisitions, need 2 per window; skipped"]


def test_change_map_of_a_pretraining_run_from_its_own_labels(tmp_path):
    from caco_jax.pretrain.change_report import LABEL_COLUMNS

    rows = [  # two locations; item 3 never seen; location b labelled changed through item 2
        (0, 0, "a", 45.5, 7.25, 0, 1, 0.2, 0.1, 2.0, 0),
        (1, 0, "a", 45.5, 7.25, 1, 1, 0.4, 0.3, 1.0, 0),
        (2, 1, "b", -3.0, 120.5, 0, 1, 0.9, 0.1, 9.0, 1),
        (3, 1, "b", -3.0, 120.5, 1, 0, 0.0, 0.0, 0.0, 0),
    ]
    (tmp_path / "change").mkdir()
    with open(tmp_path / "change" / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(LABEL_COLUMNS)
        writer.writerows(rows)
    config = config_lib.for_tasks("change_map")
    config.change_map.kind = "pretraining"
    config.change_map.land_mask = False
    config_lib.validate(config)
    result = change_map.run_task(config_lib.resolve(config), str(tmp_path))
    with open(result["change_map_csv"]) as f:
        table = {row["location_id"]: row for row in csv.DictReader(f)}
    assert set(table) == {"a", "b"}
    assert (float(table["a"]["lat"]), float(table["a"]["lon"])) == (45.5, 7.25)
    np.testing.assert_allclose(
        [float(table["a"][k]) for k in ("d_lt", "d_st", "ratio")], [0.3, 0.2, 1.5]
    )
    np.testing.assert_allclose(  # the unseen item is left out of the means
        [float(table["b"][k]) for k in ("d_lt", "d_st", "ratio")], [0.9, 0.1, 9.0]
    )
    assert (table["a"]["changed"], table["b"]["changed"]) == ("False", "True")
    assert table["b"]["pretraining_changed"] == "True"  # the run's own labels, kept beside
    # A rerun in the same workdir replaces the workdir's own map, whole files only; one written
    # to change_map.output is kept unless change_map.overwrite says otherwise.
    (tmp_path / "change_map" / "change_map.csv").write_text("an earlier run's map")
    again = change_map.run_task(config_lib.resolve(config), str(tmp_path))
    assert again["change_map_csv"] == result["change_map_csv"]
    assert "location_id" in (tmp_path / "change_map" / "change_map.csv").read_text()
    written = sorted(os.listdir(tmp_path / "change_map"))
    assert written == sorted(change_map.LOCATION_FILES)  # no temporary files left
    config.change_map.output = str(tmp_path / "change_map")
    with pytest.raises(FileExistsError, match=r"change_map\.csv already exists \(set change_map"):
        change_map.run_task(config_lib.resolve(config), str(tmp_path))


def test_the_threshold_splits_two_groups_and_labels_are_monotone_in_the_ratio():
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(3)
    low, high = rng.normal(1.0, 0.1, 200), rng.normal(3.0, 0.3, 20)
    ratios = np.concatenate([low, high])
    threshold = change_map.split_threshold(ratios, seed=0)
    assert low.max() < threshold < high.min()
    assert change_map.split_threshold(ratios, seed=0) == threshold  # seeded
    mixture = GaussianMixture(2, random_state=0).fit(ratios[:, None])
    posterior = mixture.predict_proba([[threshold - 1e-3], [threshold]])[:, 1]
    assert posterior[0] < 0.5 <= posterior[1]  # the decision boundary between the means

    # Where a mixture's own labels are not monotone: a narrow component inside a wide one of about
    # the same mean, which claims both tails (checked here for this data). The threshold labels
    # every ratio above it changed and none below.
    rng = np.random.default_rng(0)
    ratios = np.concatenate([rng.normal(0.42, 0.005, 600), rng.normal(0.42, 0.1, 400)])
    mixture = GaussianMixture(2, random_state=0).fit(ratios[:, None])
    own = mixture.predict(ratios[:, None]) == np.argmax(mixture.covariances_.ravel())
    assert own[np.argmin(ratios)] and own[np.argmax(ratios)] and not own.all()
    threshold = change_map.split_threshold(ratios, seed=0)
    assert min(mixture.means_.ravel()) <= threshold <= max(mixture.means_.ravel())
    labels = (ratios > threshold)[np.argsort(ratios)]
    assert not labels[0] and labels[-1] and (np.diff(labels.astype(int)) >= 0).all()

    assert change_map.split_threshold(np.full(5, 0.7)) == np.inf  # one value: nothing changed
    assert change_map.split_threshold(np.array([np.nan, 1.0])) == np.inf


def test_two_scenes_compared_tile_by_tile_on_the_first_ones_grid(tmp_path, archive_and_encoder):
    """Two dates of one place as digital numbers; the second on a grid shifted by half a pixel
    (warped onto the first's), a block of it without data. Per tile: the distance of the
    normalised embeddings, the ratio to the scene's median, the label by the threshold; tiles
    without data left out and counted; rasters, GeoJSON and CSV hold the same numbers."""
    from rasterio.transform import from_origin

    _, encoder = archive_and_encoder  # a 32 px RGB encoder: 4 x 3 tiles of a 128 x 96 scene
    rng = np.random.default_rng(0)
    before = rng.integers(1500, 3500, size=(3, 96, 128), dtype=np.uint16)
    after = before + rng.integers(0, 80, size=before.shape, dtype=np.uint16)
    after[:, 32:64, 64:96] = rng.integers(6000, 9000, size=(3, 32, 32))  # one tile changed
    after[:, :32, :32] = 0  # no data
    write_band_files(tmp_path / "before", before, from_origin(500_000.0, 4_700_000.0, 10.0, 10.0))
    write_band_files(tmp_path / "after", after, from_origin(500_005.0, 4_700_000.0, 10.0, 10.0))
    config = config_lib.for_tasks("change_map")
    config.change_map.before = str(tmp_path / "before")
    config.change_map.after = str(tmp_path / "after")
    config.change_map.encoder = encoder
    config.change_map.before_dn_offset = 0.0
    config.change_map.after_dn_offset = 0.0
    config.change_map.batch_size = 8
    config_lib.validate(config)
    settings = config_lib.resolve(config)
    assert settings.change_map.resolved_kind == "scenes"
    result = change_map.run_task(settings, str(tmp_path / "w"))
    assert (result["tiles"], result["left_out"]) == (12, 1)

    with open(result["change_map_csv"]) as f:
        rows = list(csv.DictReader(f))
    folder = tmp_path / "w" / "change_map"
    early = embed.Embeddings.read(folder / "embeddings_before")
    late = embed.Embeddings.read(folder / "embeddings_after")
    assert (
        [r["id"] for r in rows]
        == early.ids
        == [f"before:{r}:{c}" for r in (0, 32, 64) for c in (0, 32, 64, 96)]
    )
    assert late.ids == [i.replace("before", "after") for i in early.ids]
    normalised = [
        e.embeddings / np.linalg.norm(e.embeddings, axis=1, keepdims=True) for e in (early, late)
    ]
    distance = np.linalg.norm(normalised[0] - normalised[1], axis=1)
    usable = np.ones(12, bool)
    usable[0] = False  # the tile without data
    assert late.nodata[0] == pytest.approx(1.0, abs=0.02) and (late.nodata[1:] < 0.02).all()
    ratio = distance / np.median(distance[usable])
    written = np.array([float(r["ratio"]) for r in rows])
    np.testing.assert_allclose(written[usable], ratio[usable], rtol=1e-5)
    assert np.isnan(written[0]) and rows[0]["changed"] == ""
    threshold = change_map.split_threshold(ratio[usable], seed=0)
    changed = [r["changed"] == "True" for r in rows]
    assert changed == list(usable & (ratio > threshold))
    assert np.argmax(np.where(usable, ratio, -1)) == 6  # the changed tile (row 32, col 64)
    assert changed[6]

    with rasterio.open(result["change_ratio_tif"]) as raster:
        assert raster.crs.to_epsg() == 32633 and raster.shape == (3, 4)
        assert raster.transform == from_origin(500_000.0, 4_700_000.0, 320.0, 320.0)
        np.testing.assert_allclose(raster.read(1).ravel(), written, rtol=1e-6)
    with rasterio.open(result["changed_tif"]) as raster:
        labels = raster.read(1).ravel()
    assert list(labels) == [255] + [int(c) for c in changed[1:]]
    with open(result["change_map_geojson"]) as f:
        collection = json.load(f)
    assert collection["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    ring = collection["features"][6]["geometry"]["coordinates"][0]
    assert ring[:4] == [[500_640.0, 4_699_360.0], [500_960.0, 4_699_360.0],
                        [500_960.0, 4_699_680.0], [500_640.0, 4_699_680.0]]  # fmt: skip
    for png in ("change_map_png", "histograms_png"):
        assert png_pixels(result[png]).std() > 0.05
    # A rerun replaces the workdir's own map; one at change_map.output needs overwrite.
    again = change_map.run_task(settings, str(tmp_path / "w"))
    assert again["change_ratio_tif"] == result["change_ratio_tif"]
    config.change_map.output = str(folder)
    with pytest.raises(FileExistsError, match=r"change_ratio\.tif already exists"):
        change_map.run_task(config_lib.resolve(config), str(tmp_path / "w"))


def test_scene_settings_are_checked_before_any_work():
    config = config_lib.for_tasks("change_map")
    config.change_map.before = "a.tif"
    with pytest.raises(config_lib.SettingsError, match=r"change_map\.after: .*needs both"):
        config_lib.validate(config)
    config.change_map.after = "b.tif"
    config.change_map.kind = "records"
    with pytest.raises(config_lib.SettingsError, match=r"change_map\.kind: 'records' maps"):
        config_lib.validate(config)


def test_the_scene_picture_leaves_out_pixels_without_data(tmp_path):
    """Reflectance with NaN as its nodata value: the quicklook of a scene pair's figure reads it as
    `embed` does (no data, not a NaN to refuse)."""
    from rasterio.transform import from_origin

    from caco_jax.data import geotiff

    values = np.full((3, 40, 40), 0.2, np.float32)
    values[:, :10] = np.nan
    for index, band in enumerate(("B04", "B03", "B02")):
        with rasterio.open(
            tmp_path / f"{band}.tif", "w", driver="GTiff", height=40, width=40, count=1,
            dtype="float32", crs="EPSG:32633", nodata=float("nan"),
            transform=from_origin(500_000.0, 4_700_000.0, 10.0, 10.0),
        ) as dst:  # fmt: skip
            dst.write(values[index], 1)
    (image,) = geotiff.find_images(str(tmp_path), Normalization.rgb())
    picture = change_map.quicklook(image, geotiff.image_grid(image), scale="reflectance")
    assert picture.shape == (40, 40, 3)
    assert (picture[:10] == 0).all() and (picture[10:] > 0).all()


def test_the_scene_picture_of_a_multiband_file_is_in_colour(tmp_path):
    """The bands of a multi-band GeoTIFF come from the encoder's input, not its file name: the
    picture shows B4, B3, B2 as red, green and blue, not its first band in grey."""
    from rasterio.transform import from_origin

    values = np.zeros((3, 64, 64), np.uint16)
    values[:, :, :32] = 500  # dark on the left; red on the right
    values[:, :, 32:] = np.array([3000, 1500, 1200], np.uint16)[:, None, None]
    with rasterio.open(
        tmp_path / "scene.tif", "w", driver="GTiff", height=64, width=64, count=3,
        dtype="uint16", crs="EPSG:32633", transform=from_origin(500_000.0, 4_700_000.0, 10.0, 10.0),
    ) as dst:  # fmt: skip
        dst.write(values)
    pair = change_map.ScenePair.find(
        str(tmp_path / "scene.tif"), str(tmp_path / "scene.tif"), Normalization.rgb()
    )
    assert pair.bands == ("B4", "B3", "B2")
    picture = change_map.quicklook(pair.before, pair.grid, bands=pair.bands, dn_offset=0.0)
    red, green, blue = picture[0, 40]
    assert red > green > blue
