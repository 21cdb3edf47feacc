"""The evaluation datasets' downloads in miniature, in their published layouts and formats (member
paths, JPEG / GeoTIFF dtypes and sizes, label JSON and rasters, split files): EuroSAT, BigEarthNet,
OSCD and DynamicEarthNet."""

import io
import json
import os
import shutil
import tarfile
import zipfile

import numpy as np
import rasterio
from PIL import Image
from rasterio.io import MemoryFile

from caco_jax.evaluators.datasets import bigearthnet as bigearthnet_builder
from caco_jax.evaluators.datasets import dynamicearthnet as dynamicearthnet_builder
from caco_jax.evaluators.datasets import eurosat as eurosat_builder
from caco_jax.evaluators.datasets import oscd as oscd_builder

EUROSAT_PER_CLASS = 4
BIGEARTHNET_PATCHES = 24


# --------------------------------------------------------------------------------------------------
# EuroSAT, BigEarthNet.


def geotiff_bytes(bands_first: np.ndarray) -> bytes:
    """A GeoTIFF of [bands, H, W] (dtype kept), written by GDAL like the published files."""
    count, height, width = bands_first.shape
    with MemoryFile() as memory:
        with memory.open(
            driver="GTiff", height=height, width=width, count=count, dtype=bands_first.dtype.name,
            crs="EPSG:32632", transform=rasterio.transform.from_origin(500000, 5000000, 10, 10),
        ) as dst:  # fmt: skip
            dst.write(bands_first)
        return memory.read()


def eurosat_pixels(label: int, n: int, channels: int, dtype) -> np.ndarray:
    """A class-coloured image with noise: the classes are separable."""
    rng = np.random.default_rng(100 * label + n)
    top = 255 if dtype == np.uint8 else 3000
    colour = np.linspace(0.1, 0.9, channels)[::-1] * top * (label + 1) / 10
    noise = rng.normal(0, top / 40, (64, 64, channels))
    return np.clip(colour + noise, 0, top).astype(dtype)


def write_eurosat_rgb_zip(folder) -> dict:
    """EuroSAT_RGB.zip: EuroSAT_RGB/<Class>/<Class>_<n>.jpg, 64x64 RGB JPEGs; {name: JPEG}."""
    written = {}
    with zipfile.ZipFile(folder / "EuroSAT_RGB.zip", "w") as archive:
        for label, cls in enumerate(eurosat_builder.CLASSES):
            for n in range(1, EUROSAT_PER_CLASS + 1):
                buffer = io.BytesIO()
                Image.fromarray(eurosat_pixels(label, n, 3, np.uint8)).save(buffer, "JPEG")
                archive.writestr(f"EuroSAT_RGB/{cls}/{cls}_{n}.jpg", buffer.getvalue())
                written[f"{cls}_{n}"] = buffer.getvalue()
    return written


def write_eurosat_ms_folder(folder) -> dict:
    """Extracted EuroSAT_MS.zip: EuroSAT_MS/<Class>/<Class>_<n>.tif, 13-band uint16 64x64."""
    written = {}
    for label, cls in enumerate(eurosat_builder.CLASSES):
        (folder / "EuroSAT_MS" / cls).mkdir(parents=True)
        for n in range(1, EUROSAT_PER_CLASS + 1):
            pixels = eurosat_pixels(label, n, 13, np.uint16)
            path = folder / "EuroSAT_MS" / cls / f"{cls}_{n}.tif"
            path.write_bytes(geotiff_bytes(np.moveaxis(pixels, -1, 0)))
            written[f"{cls}_{n}"] = pixels
    return written


def write_eurosat_lists(folder):
    """SeCo's lists name the RGB JPEGs: n = 1..3 train, n = 4 val."""
    names = [f"{c}_{n}.jpg" for c in eurosat_builder.CLASSES for n in range(1, 5)]
    (folder / "eurosat-train.txt").write_text("\n".join(n for n in names if n[-5] != "4") + "\n")
    (folder / "eurosat-val.txt").write_text("\n".join(n for n in names if n[-5] == "4") + "\n")


def bigearthnet_name(n: int) -> str:
    return f"S2A_MSIL2A_20170613T101031_{n}_48"


def bigearthnet_patches():
    """{patch: ({file: bytes}, labels, {band: uint16 pixels})} at the published sizes."""
    rng = np.random.default_rng(1)
    patches = {}
    for n in range(BIGEARTHNET_PATCHES):
        name = bigearthnet_name(n)
        labels = sorted(rng.choice(bigearthnet_builder.LABELS, size=2, replace=False).tolist())
        files, pixels = {}, {}
        for band in bigearthnet_builder.ALL_BANDS:
            size = bigearthnet_builder.BAND_PIXELS[band]
            pixels[band] = rng.integers(0, 4000, (size, size)).astype(np.uint16)
            files[f"{name}_{band}.tif"] = geotiff_bytes(pixels[band][None])
        metadata = {"labels": labels, "coordinates": {}, "projection": "", "tile_source": "",
                    "acquisition_date": "2017-06-13 10:10:31"}  # fmt: skip
        files[f"{name}_labels_metadata.json"] = json.dumps(metadata).encode()
        patches[name] = (files, labels, pixels)
    return patches


def write_bigearthnet(folder, patches, *, as_tar: bool):
    """BigEarthNet-S2-v1.0.tar.gz (BigEarthNet-v1.0/<patch>/<patch>_<band>.tif, labels JSON), or
    the extracted folder."""
    if as_tar:
        with tarfile.open(folder / "BigEarthNet-S2-v1.0.tar.gz", "w:gz") as archive:
            for name, (files, _, _) in patches.items():
                for file, data in files.items():
                    info = tarfile.TarInfo(f"BigEarthNet-v1.0/{name}/{file}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    else:
        for name, (files, _, _) in patches.items():
            (folder / "BigEarthNet-v1.0" / name).mkdir(parents=True)
            for file, data in files.items():
                (folder / "BigEarthNet-v1.0" / name / file).write_bytes(data)


def write_bigearthnet_lists(folder):
    names = [bigearthnet_name(n) for n in range(BIGEARTHNET_PATCHES)]
    (folder / "bigearthnet-train.txt").write_text("\n".join(names[:16]) + "\n")
    (folder / "bigearthnet-val.txt").write_text("\n".join(names[16:]) + "\n")
    (folder / "patches_with_cloud_and_shadow.csv").write_text(f"{names[0]}\n{names[17]}\n")
    (folder / "patches_with_seasonal_snow.csv").write_text(f"{names[1]}\n")


# --------------------------------------------------------------------------------------------------
# OSCD.


# OSCD's band resolutions (m): the native folders imgs_1/, imgs_2/ hold each band at its own.
OSCD_BAND_METRES = {"B01": 60, "B05": 20, "B06": 20, "B07": 20, "B8A": 20, "B09": 60, "B10": 60,
                    "B11": 20, "B12": 20}  # fmt: skip


def write_oscd_band(path, values):
    with rasterio.open(
        path, "w", driver="GTiff", height=values.shape[0], width=values.shape[1], count=1,
        dtype="uint16",
    ) as dst:  # fmt: skip
        dst.write(values, 1)


def write_fake_oscd(root, size=(70, 100), band_names=oscd_builder.RGB_BANDS):
    """The Onera archive's layout: city lists; per city and date both image folders, as in the
    download: imgs_<d>/<product>_<band>.tif at each band's native resolution (what SeCo reads)
    and imgs_<d>_rect/<band>.tif, every band on the 10 m grid, whose values here differ from the
    native ones (shifted by a pixel, brighter), so a test sees which folder was read; labels as
    cm.png for train cities and <city>-cm.tif for the test city. Returns {(city, date, "native" |
    "rect"): {band: uint16 pixels as that folder holds them}, (city, "mask"): mask}."""
    rng = np.random.default_rng(0)
    images_dir = root / oscd_builder.IMAGES_FOLDER
    images_dir.mkdir(parents=True)
    (images_dir / "train.txt").write_text("alpha,beta")
    (images_dir / "test.txt").write_text("gamma\n")
    written = {}
    for city, split in (("alpha", "train"), ("beta", "train"), ("gamma", "test")):
        for date in (1, 2):
            native_dir = images_dir / city / f"imgs_{date}"
            rect_dir = images_dir / city / f"imgs_{date}_rect"
            native_dir.mkdir(parents=True)
            rect_dir.mkdir(parents=True)
            native, rect = {}, {}
            for band in band_names:
                factor = OSCD_BAND_METRES.get(band, 10) // 10
                values = rng.integers(0, 4000, size).astype(np.uint16)
                native[band] = values[::factor, ::factor]
                rect[band] = (np.roll(values, 1, axis=1) + 7).astype(np.uint16)
                write_oscd_band(rect_dir / f"{band}.tif", rect[band])
                write_oscd_band(
                    native_dir / f"S2A_OPER_MSI_L1C_{city}_{date}_{band}.tif", native[band]
                )
            written[city, date, "native"], written[city, date, "rect"] = native, rect
        mask = np.zeros(size, np.uint8)
        mask[10:40, 20:60] = 1
        written[city, "mask"] = mask
        cm_dir = root / oscd_builder.LABEL_FOLDERS[split] / city / "cm"
        cm_dir.mkdir(parents=True)
        if split == "train":
            Image.fromarray(mask * 255).save(cm_dir / "cm.png")
        else:
            with rasterio.open(
                cm_dir / f"{city}-cm.tif", "w", driver="GTiff", height=size[0], width=size[1],
                count=1, dtype="uint8",
            ) as dst:  # fmt: skip
                dst.write(mask + 1, 1)
    return written


# --------------------------------------------------------------------------------------------------
# DynamicEarthNet.

PLANET_SIZE = 64  # the real images are 1024 x 1024

# (cube, zone, planet grid folder, label tile, label folder separator, label date separator, dtype)
CUBES = {
    "1311_3077_13": ("10N", "26E-183N", "10N-122W-40N-L3H-SR", "_", "_", "int16"),
    # Label folder named with a hyphen and dates with hyphens, as some are in the download.
    "2196_3885_13": ("17N", "9E-42N", "17N-83W-9N-L3H-SR", "-", "-", "uint16"),
    "1330_3107_13": ("10N", "26E-184N", "10N-121W-39N-L3H-SR", "_", "_", "int16"),
    "1487_3335_13": ("11N", "13E-190N", "11N-116W-32N-L3H-SR", "-", "_", "int16"),
    # The two cubes the official README restores to train.txt; 1417_3281_13's label folder has no
    # Labels/ level (labels/1417_3281_13_11N/Raster/...).
    "1417_3281_13": ("11N", "13E-187N", "11N-117W-33N-L3H-SR", "_", "_", "int16"),
    "2235_3403_13": ("17N", "10E-39N", "17N-81W-30N-L3H-SR", "_", "_", "int16"),
}
NO_LABELS_LEVEL = ("1417_3281_13",)
TRAIN_LISTED = {"1311_3077_13": ("2018-01", "2018-02"), "2196_3885_13": ("2018-01", "2019-12")}
VALIDATION = {"1330_3107_13": ("2018-03", "2019-07")}
TEST = {"1487_3335_13": ("2018-05", "2019-02")}
# The validation and test labels are their own download (mediaTUM 1738088).
EVALUATION_LABELS = "dynamicearthnet_test_labels"


def planet_folder(cube):
    zone, grid = CUBES[cube][:2]
    return f"planet/{zone}/{grid}/{cube}"


def label_file(cube, month, top="labels"):
    """The label's path in its download: labels/ (labels.zip) or EVALUATION_LABELS/."""
    zone, _, tile, folder_sep, date_sep, _ = CUBES[cube]
    date = month.replace("-", date_sep) + f"{date_sep}01"
    labels_level = "" if cube in NO_LABELS_LEVEL else "Labels/"
    return f"{top}/{cube}{folder_sep}{zone}/{labels_level}Raster/{tile}/{tile}-{date}.tif"


def split_line(cube, month):
    """A line of the official split files: their planet prefix, label paths as labels/<cube>_<zone>
    whatever the download names the folder, and (torchgeo's test files have one) a doubled
    slash, which reads like one."""
    zone, _, tile, *_ = CUBES[cube]
    return (
        f"/reprocess-cropped/UTM-24000/{planet_folder(cube)[7:]}//PF-SR "
        f"/labels/{cube}_{zone}/Labels/Raster/{tile}/{tile}-{month.replace('-', '_')}_01.tif "
        f"{month}"
    )


def write_tif(path, bands):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with rasterio.open(
        path, "w", driver="GTiff", height=bands.shape[1], width=bands.shape[2],
        count=bands.shape[0], dtype=bands.dtype.name, crs="EPSG:32610",
        transform=rasterio.transform.from_origin(500000, 4000000, 3, 3), compress="lzw",
    ) as dst:  # fmt: skip
        dst.write(bands)


def fake_month(rng, dtype):
    """A 4-band BGRN image and a 7-band one-hot label whose classes are visible in the image, with
    unlabelled, snow and doubly labelled pixels."""
    classes = rng.integers(0, 7, (PLANET_SIZE // 8, PLANET_SIZE // 8)).repeat(8, 0).repeat(8, 1)
    label = np.zeros((7, PLANET_SIZE, PLANET_SIZE), np.uint8)
    for c in range(7):
        label[c][classes == c] = 255
    label[:, :2, :3] = 0  # unlabelled
    label[:, 5, 5] = 0
    label[1, 5, 5] = label[4, 5, 5] = 255  # two bands set: the last one wins
    brightness = np.array([300, 900, 1500, 2100, 2700, 3300, 9000])[classes]
    bgrn = brightness[None] * np.array([0.6, 0.8, 1.0, 1.4])[:, None, None]
    bgrn = (bgrn + rng.normal(0, 100, bgrn.shape)).clip(0, 30000).astype(dtype)
    if dtype == "uint16":
        bgrn[2, 0, 0] = 40000  # red above int16: clipped to 32767
    return bgrn, label


def write_download(root, rng=None, split_folder=dynamicearthnet_builder.SPLITS_FOLDER):
    """The DynamicEarthNet downloads in their published layouts, extracted: planet/ and labels/
    (the training labels only) of mediaTUM 1650201, EVALUATION_LABELS/ (the validation and test
    labels, mediaTUM 1738088) and the split files in `split_folder`; returns {(cube, month):
    (expected rgb int16, expected label)} of every split month."""
    rng = rng or np.random.default_rng(0)
    months = {**TRAIN_LISTED, **VALIDATION, **TEST}
    for cube in dynamicearthnet_builder.RESTORED_TRAIN_CUBES:
        months[cube] = dynamicearthnet_builder.LABELLED_MONTHS
    expected = {}
    for cube, cube_months in months.items():
        top = "labels" if cube not in {**VALIDATION, **TEST} else EVALUATION_LABELS
        for month in cube_months:
            bgrn, label = fake_month(rng, CUBES[cube][5])
            write_tif(os.path.join(root, planet_folder(cube), "PF-SR", f"{month}-01.tif"), bgrn)
            write_tif(
                os.path.join(root, planet_folder(cube), "PF-QA", f"{month}-01.tif"),
                np.zeros((1, PLANET_SIZE, PLANET_SIZE), np.int16),
            )
            write_tif(os.path.join(root, label_file(cube, month, top)), label)
            with open(os.path.join(root, label_file(cube, month, top)) + ".aux.xml", "w") as f:
                f.write("<PAMDataset/>")
            rgb = np.clip(np.moveaxis(bgrn[[2, 1, 0]], 0, -1), 0, 32767).astype(np.int16)
            classes = np.full((PLANET_SIZE, PLANET_SIZE), 255, np.uint8)
            for c in range(7):
                classes[label[c] == 255] = c
            expected[cube, month] = (rgb, classes)
    # Days other than the first, and a vector label, are in the download but not read.
    write_tif(
        os.path.join(root, planet_folder("1311_3077_13"), "PF-SR", "2018-01-02.tif"),
        np.full((4, PLANET_SIZE, PLANET_SIZE), 7, np.int16),
    )
    vector = os.path.join(
        root, "labels/1311_3077_13_10N/Labels/Vector/Water/x/x-2018_01_01.geojson"
    )
    os.makedirs(os.path.dirname(vector))
    with open(vector, "w") as f:
        f.write("{}")
    splits = os.path.join(root, split_folder)
    os.makedirs(splits)
    for name, listed in (("train.txt", TRAIN_LISTED), ("val.txt", VALIDATION), ("test.txt", TEST)):
        lines = [split_line(cube, month) for cube, months in listed.items() for month in months]
        with open(os.path.join(splits, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return expected


def zip_folder(source_root, folder, archive_path):
    """`folder` of `source_root` as a zip whose members start with `folder/`."""
    with zipfile.ZipFile(archive_path, "w") as archive:
        for parent, _, files in os.walk(os.path.join(source_root, folder)):
            for name in files:
                path = os.path.join(parent, name)
                archive.write(path, os.path.relpath(path, source_root))


def zip_download(extracted, zipped, split_folder="split_info"):
    """The same downloads as mediaTUM serves them: one planet.<zone>.zip per zone, labels.zip and
    the validation/test labels' zip; the split files in `split_folder` (the copies still served
    keep them under split_info/)."""
    os.makedirs(zipped)
    (source,) = [
        f
        for f in dynamicearthnet_builder.SPLIT_FOLDERS
        if os.path.isdir(os.path.join(extracted, f))
    ]
    shutil.copytree(os.path.join(extracted, source), os.path.join(zipped, split_folder))
    for zone in sorted({zone for zone, *_ in CUBES.values()}):
        zip_folder(extracted, f"planet/{zone}", os.path.join(zipped, f"planet.{zone}.zip"))
    zip_folder(extracted, "labels", os.path.join(zipped, "labels.zip"))
    zip_folder(extracted, EVALUATION_LABELS, os.path.join(zipped, f"{EVALUATION_LABELS}.zip"))
