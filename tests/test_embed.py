"""Embeddings of Sentinel-2 GeoTIFFs: the numbers equal the encoder applied to pixels normalised
independently in numpy from the export's recorded normalisation; tiles carry their centres; bad
inputs are errors naming the file."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import rasterio
from flax import nnx
from rasterio.transform import from_origin
from rasterio.warp import transform as reproject

from caco_jax import config as config_lib
from caco_jax.data import geotiff, layout
from caco_jax.data.normalization import EXPORT_KEY, Normalization
from caco_jax.evaluators import common
from caco_jax.models import export
from caco_jax.products import embed

TILE = 32


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    model = common.random_encoder(18, 3, seed=7)
    metadata = {EXPORT_KEY: Normalization.rgb().to_json(), "image_size": TILE}
    directory = export.save_encoder(tmp_path_factory.mktemp("enc") / "encoder", model, metadata)
    return str(directory), model


def write_tif(path, bands, crs, transform, descriptions=None):
    count, height, width = bands.shape
    with rasterio.open(
        path, "w", driver="GTiff", height=height, width=width, count=count, dtype=bands.dtype,
        crs=crs, transform=transform,
    ) as dst:  # fmt: skip
        dst.write(bands)
        for index, text in enumerate(descriptions or (), start=1):
            dst.set_band_description(index, text)


def reference_features(model, directory, raw_tiles):
    """The encoder on tiles normalised in numpy from the numbers the export records."""
    record = export.read_metadata(directory)[EXPORT_KEY]
    low, high = np.array(record["stretch_low"]), np.array(record["stretch_high"])
    stretched = np.floor(np.clip((raw_tiles - low) / (high - low), 0, 1) * 255) / 255
    x = (stretched - np.array(record["mean"])) / np.array(record["std"])
    return np.asarray(nnx.jit(lambda m, v: m(v))(model, jnp.asarray(x, jnp.float32)))


def test_l2a_band_files_embed_like_the_numpy_reference(tmp_path, encoder):
    directory, model = encoder
    scene = tmp_path / "S2A_MSIL2A_20230612" / "R10m"
    scene.mkdir(parents=True)
    rng = np.random.default_rng(0)
    digital_numbers = rng.integers(1000, 4000, size=(3, 48, 64), dtype=np.uint16)  # B4, B3, B2
    grid = from_origin(500_000.0, 4_700_000.0, 10.0, 10.0)
    for values, band in zip(digital_numbers, ("B04", "B03", "B02"), strict=True):
        write_tif(
            scene / f"T33TVF_20230612T100031_{band}_10m.tif", values[None], "EPSG:32633", grid
        )
    write_tif(scene / "T33TVF_20230612T100031_SCL_20m.tif", digital_numbers[:1], "EPSG:32633", grid)

    result = embed.embed(str(tmp_path), directory, dn_offset=1000.0, batch_size=8)

    origins = [(0, 0), (0, 32), (16, 0), (16, 32)]  # 48 x 64 px in 32 px tiles, edge-aligned
    assert result.ids == [f"{scene}:{r}:{c}" for r, c in origins]
    archive_scale = np.floor(np.clip((digital_numbers - 1000.0) / 10000.0, 0, 1) * 255.0)
    tiles = np.stack(
        [archive_scale[:, r : r + TILE, c : c + TILE].transpose(1, 2, 0) for r, c in origins]
    )
    expected = reference_features(model, directory, tiles)
    difference = np.abs(result.embeddings - expected).max()
    print(f"embeddings vs numpy reference: max abs difference {difference:.2e}")
    assert difference < 1e-4
    xs = [500_000.0 + (c + TILE / 2) * 10.0 for _, c in origins]
    ys = [4_700_000.0 - (r + TILE / 2) * 10.0 for r, _ in origins]
    lons, lats = reproject("EPSG:32633", "EPSG:4326", xs, ys)
    np.testing.assert_allclose(result.lat, lats, atol=1e-9)
    np.testing.assert_allclose(result.lon, lons, atol=1e-9)

    paths = result.write(str(tmp_path / "out" / "embeddings"))
    saved = np.load(paths["npz"])
    np.testing.assert_array_equal(saved["embeddings"], result.embeddings)
    import pyarrow.parquet as pq

    table = pq.read_table(paths["parquet"])
    assert table.column("id").to_pylist() == result.ids
    np.testing.assert_array_equal(
        np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), result.embeddings
    )


def test_multiband_file_is_ordered_by_its_band_descriptions(tmp_path, encoder):
    directory, model = encoder
    pixels = np.random.default_rng(1).integers(0, 256, size=(3, 40, 40), dtype=np.uint8)
    path = tmp_path / "stack.tif"
    write_tif(path, pixels, "EPSG:4326", from_origin(10.0, 50.0, 1e-4, 1e-4), ["B2", "B3", "B4"])
    config = config_lib.for_tasks("embed")
    config.embed.source = str(path)
    config.embed.encoder = directory
    config.embed.batch_size = 8  # as the test above: one compile
    config_lib.validate(config)
    result = embed.run_task(config_lib.resolve(config), str(tmp_path))
    saved = np.load(result["npz"])
    origins = [(0, 0), (0, 8), (8, 0), (8, 8)]
    rgb = pixels[::-1].transpose(1, 2, 0).astype(np.float64)  # file B2, B3, B4 -> B4, B3, B2
    expected = reference_features(
        model, directory, np.stack([rgb[r : r + TILE, c : c + TILE] for r, c in origins])
    )
    assert np.abs(saved["embeddings"] - expected).max() < 1e-4
    np.testing.assert_allclose(
        saved["lat"], [50.0 - (r + 16) * 1e-4 for r, _ in origins], atol=1e-12
    )
    np.testing.assert_allclose(
        saved["lon"], [10.0 + (c + 16) * 1e-4 for _, c in origins], atol=1e-12
    )


def test_bad_inputs_name_the_file_and_what_was_expected(tmp_path, encoder):
    directory, _ = encoder
    grid = from_origin(500_000.0, 4_700_000.0, 10.0, 10.0)
    values = np.zeros((1, 40, 40), np.uint16)
    scene = tmp_path / "scene"
    scene.mkdir()
    write_tif(scene / "B04.tif", values, "EPSG:32633", grid)
    write_tif(scene / "B03.tif", values, "EPSG:32633", grid)
    with pytest.raises(
        embed.InputError, match=r"scene: no file for band\(s\) B2 .*takes B4, B3, B2"
    ):
        embed.embed(str(scene), directory)
    write_tif(scene / "B02.tif", values, "EPSG:32632", grid)
    with pytest.raises(embed.InputError, match=r"B02\.tif: CRS EPSG:32632 differs from EPSG:32633"):
        embed.embed(str(scene), directory)
    four = tmp_path / "four.tif"
    write_tif(four, np.zeros((4, 40, 40), np.uint8), "EPSG:4326", from_origin(0, 1, 1e-4, 1e-4))
    with pytest.raises(embed.InputError, match=r"four\.tif: 4 band\(s\), but the encoder takes 3"):
        embed.embed(str(four), directory)


def test_archive_acquisitions_become_whole_tiles_in_the_encoders_band_order(tmp_path):
    from caco_jax.sources import synthetic

    path = synthetic.write_archive(str(tmp_path), num_locations=2, seed=0, stray_files=False)
    mixed = Normalization(
        bands=("B4", "B11"), low=(0.0, 0.0), high=(255.0, 255.0), mean=(0.5, 0.5), std=(0.2, 0.2)
    )
    tiles, _ = embed.archive_tiles(path, mixed)
    tiles = list(tiles)
    assert len(tiles) == 20 and [t.window for t in tiles[:10]] == [0] * 5 + [1] * 5
    first = tiles[0]
    location = os.path.join(path, "000000")
    acquisition = os.path.join(location, sorted(os.listdir(location))[0])
    date = layout.sensing_time(os.path.basename(acquisition)).isoformat()
    assert first.id == f"000000/{date}"
    with rasterio.open(os.path.join(acquisition, "B4.tif")) as b4:
        np.testing.assert_array_equal(first.pixels[..., 0], b4.read(1))
        centre = b4.transform @ (b4.width / 2, b4.height / 2)
    with rasterio.open(os.path.join(acquisition, "B11.tif")) as b11:
        coarse = b11.read(1)
    assert first.pixels.shape == (264, 264, 2) and coarse.shape == (132, 132)
    # B11 (20 m) upsampled to the 10 m grid: each 2 x 2 block averages back to about the original.
    blocks = first.pixels[..., 1].astype(float).reshape(132, 2, 132, 2).mean(axis=(1, 3))
    assert np.abs(blocks - coarse).mean() < 2.0
    np.testing.assert_allclose((first.lat, first.lon), (centre[1], centre[0]), atol=1e-5)


def write_nodata_tif(path, bands, nodata):
    count, height, width = bands.shape
    with rasterio.open(
        path, "w", driver="GTiff", height=height, width=width, count=count, dtype=bands.dtype,
        crs="EPSG:32633", transform=from_origin(500_000.0, 4_700_000.0, 10.0, 10.0),
        nodata=nodata,
    ) as dst:  # fmt: skip
        dst.write(bands)
        for index, name in enumerate(("B4", "B3", "B2"), start=1):
            dst.set_band_description(index, name)


def test_nodata_tiles_are_skipped_and_partial_ones_flagged_in_the_output(tmp_path, encoder, capsys):
    directory, _ = encoder
    values = np.random.default_rng(2).integers(1000, 4000, size=(3, 32, 64), dtype=np.uint16)
    values[:, :, :32] = 0  # the left tile: nodata only (outside the swath)
    values[:, :16, 32:] = 0  # the right tile: its top half
    write_nodata_tif(tmp_path / "scene.tif", values, nodata=0)
    result = embed.embed(str(tmp_path / "scene.tif"), directory, batch_size=8)
    assert result.ids == [f"{tmp_path / 'scene.tif'}:0:32"]
    np.testing.assert_allclose(result.nodata_fraction, [0.5])
    assert "scene.tif: skipped 1 tile(s) of nodata only" in capsys.readouterr().out
    saved = np.load(result.write(str(tmp_path / "out"))["npz"])
    np.testing.assert_allclose(saved["nodata_fraction"], [0.5])


def tiles_of(path, scale="auto"):
    (image,) = geotiff.find_images(str(path), Normalization.rgb())
    return list(geotiff.read_tiles(image, tile=TILE, scale=scale))


def test_nan_and_values_outside_the_stated_scale_are_refused_naming_the_band(tmp_path):
    reflectance = np.full((3, 32, 32), 0.2, np.float32) * 10_000
    reflectance[1, 5, 7] = np.nan  # one NaN in B3
    write_nodata_tif(tmp_path / "nan.tif", reflectance, nodata=None)
    with pytest.raises(geotiff.InputError) as refused:
        tiles_of(tmp_path / "nan.tif", scale="reflectance_10000")
    assert str(refused.value).startswith(f"{tmp_path / 'nan.tif'} (B3): 1 NaN value(s)")
    # NaN as the file's nodata value is no data, not an error.
    write_nodata_tif(tmp_path / "nan_nodata.tif", reflectance, nodata=float("nan"))
    (tile,) = tiles_of(tmp_path / "nan_nodata.tif", scale="reflectance_10000")
    assert tile.nodata_fraction == pytest.approx(1 / (32 * 32))
    # uint16 digital numbers declared uint8: they would wrap modulo 256.
    numbers = np.full((3, 32, 32), 1200, np.uint16)
    write_nodata_tif(tmp_path / "dn.tif", numbers, nodata=None)
    with pytest.raises(geotiff.InputError) as refused:
        tiles_of(tmp_path / "dn.tif", scale="uint8")
    assert str(refused.value).startswith(
        f"{tmp_path / 'dn.tif'} (B4): values from 1200 to 1200, outside the 0-255 of "
        "embed.scale='uint8'"
    )
    assert len(tiles_of(tmp_path / "dn.tif")) == 1  # "auto" reads them as digital numbers
    negative = np.full((3, 32, 32), -5.0, np.float32)
    write_nodata_tif(tmp_path / "negative.tif", negative, nodata=None)
    with pytest.raises(geotiff.InputError, match=r"outside the 0-65535 of embed.scale="):
        tiles_of(tmp_path / "negative.tif", scale="reflectance_10000")
