"""Change maps from an encoder alone: per-location statistics as documented, at the centres of the
locations' GeoTIFF footprints, written as CSV, GeoJSON and figures."""

import csv
import json
import os

import numpy as np
import pytest
import rasterio

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
    if changed.any() and (~changed).any():  # the mixture splits the ratios at one threshold
        assert ratios[changed].min() > ratios[~changed].max()
    written = change_map.ChangeMap(
        [r["location_id"] for r in rows],
        *(np.array([float(r[k]) for r in rows]) for k in ("lat", "lon", "d_lt", "d_st", "ratio")),
        changed,
    )
    check_figures(written, result)


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
    histograms = change_map.histogram_figure(result)
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
    # A rerun in the same workdir replaces the workdir's own map, whole files only; one written
    # to change_map.output is kept unless change_map.overwrite says otherwise.
    (tmp_path / "change_map" / "change_map.csv").write_text("an earlier run's map")
    again = change_map.run_task(config_lib.resolve(config), str(tmp_path))
    assert again["change_map_csv"] == result["change_map_csv"]
    assert "location_id" in (tmp_path / "change_map" / "change_map.csv").read_text()
    assert sorted(os.listdir(tmp_path / "change_map")) == sorted(change_map.FILES)  # no temp
    config.change_map.output = str(tmp_path / "change_map")
    with pytest.raises(FileExistsError, match=r"change_map\.csv already exists \(set change_map"):
        change_map.run_task(config_lib.resolve(config), str(tmp_path))
