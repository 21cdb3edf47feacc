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
from caco_jax.data import geotiff, layout, sentinel2
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


L2A_METADATA = """<?xml version="1.0" encoding="UTF-8"?>
<n1:Level-2A_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd">
 <n1:General_Info><Product_Image_Characteristics><BOA_ADD_OFFSET_VALUES_LIST>
  <BOA_ADD_OFFSET band_id="0">-1000</BOA_ADD_OFFSET>
  <BOA_ADD_OFFSET band_id="1">-1000</BOA_ADD_OFFSET>
 </BOA_ADD_OFFSET_VALUES_LIST></Product_Image_Characteristics></n1:General_Info>
</n1:Level-2A_User_Product>
"""


def test_l2a_product_embeds_like_the_numpy_reference(tmp_path, encoder):
    """An L2A product as delivered: bands at their finest resolution (R10m over R20m), masks in
    QI_DATA and the SCL raster passed over, the +1000 offset read from MTD_MSIL2A.xml, digital
    number 0 counted as no data; ids relative to the source; the GeoParquet dataset holds the
    tiles' footprints in longitude/latitude, as geopandas reads them."""
    directory, model = encoder
    product = tmp_path / "S2A_MSIL2A_20230612T100031_N0509_R122_T33TVF.SAFE"
    (product / "MTD_MSIL2A.xml").parent.mkdir()
    (product / "MTD_MSIL2A.xml").write_text(L2A_METADATA)
    image_data = product / "GRANULE" / "L2A_T33TVF" / "IMG_DATA"
    for folder in ("R10m", "R20m"):
        (image_data / folder).mkdir(parents=True)
    (product / "GRANULE" / "L2A_T33TVF" / "QI_DATA").mkdir()
    rng = np.random.default_rng(0)
    digital_numbers = rng.integers(1000, 4000, size=(3, 48, 64), dtype=np.uint16)  # B4, B3, B2
    digital_numbers[1, :4, :8] = 0  # 32 pixels of no data in the first tile
    grid = from_origin(500_000.0, 4_700_000.0, 10.0, 10.0)
    for values, band in zip(digital_numbers, ("B04", "B03", "B02"), strict=True):
        name = f"T33TVF_20230612T100031_{band}_10m.tif"
        write_tif(image_data / "R10m" / name, values[None], "EPSG:32633", grid)
    coarse = from_origin(500_000.0, 4_700_000.0, 20.0, 20.0)
    for name in ("T33TVF_20230612T100031_B02_20m.tif", "T33TVF_20230612T100031_SCL_20m.tif"):
        write_tif(image_data / "R20m" / name, digital_numbers[:1, :24, :32], "EPSG:32633", coarse)
    mask = product / "GRANULE" / "L2A_T33TVF" / "QI_DATA" / "MSK_DETFOO_B02.tif"
    write_tif(mask, digital_numbers[:1], "EPSG:32633", grid)

    result = embed.embed(str(tmp_path), directory, batch_size=8)  # offset from the metadata

    origins = [(0, 0), (0, 32), (16, 0), (16, 32)]  # 48 x 64 px in 32 px tiles, edge-aligned
    name = os.path.relpath(image_data, tmp_path)
    assert result.ids == [f"{name}:{r}:{c}" for r, c in origins]
    np.testing.assert_allclose(result.nodata, [32 / TILE**2, 0, 0, 0])
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

    folder, rows = embed.write_dataset(lambda: result, str(tmp_path / "out" / "embeddings"))
    assert rows == 4 and sorted(os.listdir(folder)) == [
        "_manifest.json",
        "part-00000-of-00001.parquet",
    ]
    read = embed.Embeddings.read(folder)
    assert read.ids == result.ids
    np.testing.assert_array_equal(read.embeddings, result.embeddings)
    np.testing.assert_array_equal(read.nodata, result.nodata)
    geopandas = pytest.importorskip("geopandas")
    frame = geopandas.read_parquet(folder)
    assert frame.crs.equals("OGC:CRS84")
    assert list(frame["id"]) == result.ids
    for (r, c), polygon in zip(origins, frame.geometry, strict=True):
        xs = [500_000.0 + (c + dc) * 10.0 for dc in (0, TILE, TILE, 0)]
        ys = [4_700_000.0 - (r + dr) * 10.0 for dr in (TILE, TILE, 0, 0)]
        corner_lons, corner_lats = reproject("EPSG:32633", "EPSG:4326", xs, ys)
        exterior = np.asarray(polygon.exterior.coords)
        np.testing.assert_allclose(exterior[:4], np.stack([corner_lons, corner_lats], 1))
    with pytest.raises(FileExistsError, match=r"embeddings already holds embed"):
        embed.write_dataset(lambda: result, folder)


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
    saved = embed.Embeddings.read(result["output"])
    origins = [(0, 0), (0, 8), (8, 0), (8, 8)]
    assert saved.ids == [f"stack.tif:{r}:{c}" for r, c in origins]
    rgb = pixels[::-1].transpose(1, 2, 0).astype(np.float64)  # file B2, B3, B4 -> B4, B3, B2
    expected = reference_features(
        model, directory, np.stack([rgb[r : r + TILE, c : c + TILE] for r, c in origins])
    )
    assert np.abs(saved.embeddings - expected).max() < 1e-4
    np.testing.assert_allclose(saved.lat, [50.0 - (r + 16) * 1e-4 for r, _ in origins], atol=1e-12)
    np.testing.assert_allclose(saved.lon, [10.0 + (c + 16) * 1e-4 for _, c in origins], atol=1e-12)
    assert (saved.nodata == 0).all()  # uint8 values without a declared nodata: all data


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
    with pytest.raises(embed.InputError, match=r"B02\.tif: covers 0% of the grid it is read on"):
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


def test_bands_on_shifted_grids_are_warped_onto_the_finest(tmp_path):
    """The real 10, 20 and 60 m bands of a Sentinel-2 scene do not share bounds (B01's start 10 m
    west and end 50 m north of B02's, as in a real L1C product): the coarse bands are warped onto
    the 10 m grid. Every band holds one plane of the world, v = a + b x + c y, which a bilinear
    warp reproduces wherever the band covers the grid."""
    from caco_jax.data import geotiff

    crs = "EPSG:32633"

    def plane(x, y):
        return 20.0 + 0.2 * (x - 435_700.0) + 0.05 * (y - 4_159_900.0)

    def write_band(name, left, bottom, resolution, columns, rows):
        xs = left + (np.arange(columns) + 0.5) * resolution
        ys = bottom + rows * resolution - (np.arange(rows) + 0.5) * resolution
        values = np.round(plane(xs[None, :], ys[:, None])).astype(np.uint8)
        path = str(tmp_path / f"T33_{name}.tif")
        top = bottom + rows * resolution
        write_tif(path, values[None], crs, from_origin(left, top, resolution, resolution))
        return path

    b02 = write_band("B02", 435_730.0, 4_159_990.0, 10.0, 64, 64)
    b05 = write_band("B05", 435_740.0, 4_159_980.0, 20.0, 32, 33)
    b01 = write_band("B01", 435_720.0, 4_160_040.0, 60.0, 11, 10)
    image = geotiff.Image("scene", ((b01, 1), (b02, 1), (b05, 1)))
    (tile,) = geotiff.read_tiles(image, tile=64, scale="uint8")
    xs = 435_730.0 + (np.arange(64) + 0.5) * 10.0
    ys = 4_159_990.0 + 640.0 - (np.arange(64) + 0.5) * 10.0
    expected = plane(xs[None, :], ys[:, None])
    # B01 covers the 10 m grid but its southernmost 50 m; bilinear needs a coarse pixel centre on
    # each side, so 3 px (30 m) are left out at the other edges.
    inside = np.s_[3:59, 3:61]
    for channel, name in ((0, "B01"), (1, "B02"), (2, "B05")):
        error = np.abs(tile.pixels[..., channel][inside] - expected[inside]).max()
        assert error <= 1.0, f"{name}: off by {error} from the plane"
    assert (tile.pixels[59:, :, 0] == 0).all()  # not covered by B01: counted as no data
    assert tile.nodata == pytest.approx(5 / 64, abs=1 / 64)


def test_the_python_encoder_applies_the_same_transform(encoder):
    directory, model = encoder
    digital_numbers = np.random.default_rng(2).integers(900, 5000, size=(3, TILE, TILE, 3))
    encoder_ = embed.Encoder.load(directory, batch_size=8)
    assert encoder_.bands == ("B4", "B3", "B2") and encoder_.image_size == TILE
    features = encoder_(digital_numbers.astype(np.uint16), scale="dn", offset=1000)
    archive_scale = np.floor(np.clip((digital_numbers - 1000.0) / 10000.0, 0, 1) * 255.0)
    assert np.abs(features - reference_features(model, directory, archive_scale)).max() < 1e-4
    with pytest.raises(embed.InputError, match=r"shape \(3, 32, 32, 4\); .*bands B4, B3, B2"):
        encoder_(np.zeros((3, TILE, TILE, 4), np.uint8))


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


def tiles_of(path, scale="auto"):
    (image,) = geotiff.find_images(str(path), Normalization.rgb())
    return list(geotiff.read_tiles(image, tile=TILE, scale=scale, dn_offset=0.0))


def test_pixels_without_data_are_not_values_and_nan_among_the_data_is_refused(tmp_path):
    reflectance = np.full((3, 32, 32), 0.2, np.float32)
    reflectance[1, 5, 7] = np.nan  # one NaN in B3
    write_nodata_tif(tmp_path / "nan.tif", reflectance, nodata=None)
    with pytest.raises(sentinel2.RawValueError, match=r"nan\.tif \(B3\): 1 NaN values"):
        tiles_of(tmp_path / "nan.tif")
    # NaN as the file's nodata value, or -9999 on the reflectance scale: no data, counted, and
    # not refused as a NaN or a negative value.
    for nodata in (float("nan"), -9999.0):
        values = np.where(np.isnan(reflectance), np.float32(nodata), reflectance)
        write_nodata_tif(tmp_path / "nodata.tif", values, nodata=nodata)
        (tile,) = tiles_of(tmp_path / "nodata.tif")
        assert tile.nodata == pytest.approx(1 / TILE**2)
        assert tile.pixels[5, 7, 1] == 0 and (tile.pixels[..., 0] == 51).all()  # 0.2 x 255
    # uint16 digital numbers declared uint8 would wrap modulo 256.
    write_nodata_tif(tmp_path / "dn.tif", np.full((3, 32, 32), 1200, np.uint16), nodata=None)
    with pytest.raises(sentinel2.RawValueError, match=r"dn\.tif \(B4\): uint16 values up to 1200"):
        tiles_of(tmp_path / "dn.tif", scale="uint8")
    assert len(tiles_of(tmp_path / "dn.tif")) == 1  # "auto" reads them as digital numbers
