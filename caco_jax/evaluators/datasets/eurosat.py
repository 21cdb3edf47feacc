"""TFDS builder `eurosat_download`: EuroSAT as users download it (no TensorFlow to build or read).

The downloads (https://github.com/phelber/EuroSAT, Zenodo 7711810), left as they are in manual_dir:

  rgb        EuroSAT_RGB.zip   EuroSAT_RGB/<Class>/<Class>_<n>.jpg    (64x64 RGB JPEG)
             EuroSAT.zip       2750/<Class>/<Class>_<n>.jpg           (the older RGB release)
  all_bands  EuroSAT_MS.zip    EuroSAT_MS/<Class>/<Class>_<n>.tif     (64x64 13-band uint16 L1C)
             EuroSATallBands.zip  ds/images/remote_sensing/otherDatasets/sentinel_2/tif/<Class>/...

or any of them extracted anywhere under manual_dir. One `train` split with every image (TFDS
orders the records by a hash of the name): `name` (`<Class>_<n>`, the key of SeCo's split lists),
`label` (the ten classes in name order, as SeCo's `EurosatDataset` indexes the class folders) and
`image` (uint8 [64, 64, 3] for `rgb`, uint16 [64, 64, 13] in `MS_BANDS` order for `all_bands`).
"""

from __future__ import annotations

import os
import re
import zipfile

import numpy as np
import tensorflow_datasets as tfds

CLASSES = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
)  # fmt: skip
# Band order of the multispectral GeoTIFFs: B1..B12 (with B10), then B8A.
MS_BANDS = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A",
)  # fmt: skip
RGB_BANDS = ("B04", "B03", "B02")
IMAGE_SIZE = 64
DOWNLOADS = {
    "rgb": ("EuroSAT_RGB.zip", "EuroSAT.zip"),
    "all_bands": ("EuroSAT_MS.zip", "EuroSATallBands.zip"),
}
_EXTENSION = {"rgb": ".jpg", "all_bands": ".tif"}
_MEMBER = re.compile(r"(?:^|/)(?P<cls>[A-Za-z]+)/(?P<name>(?P=cls)_[0-9]+)\.(?:jpg|tif)$")


class EurosatDownloadConfig(tfds.core.BuilderConfig):
    def __init__(self, *, bands: tuple[str, ...], **kwargs):
        super().__init__(version=tfds.core.Version("1.0.0"), **kwargs)
        self.bands = bands


class EurosatDownload(tfds.core.GeneratorBasedBuilder):
    """EuroSAT land-cover images with their class, read from the downloaded zip or folder."""

    BUILDER_CONFIGS = [  # noqa: RUF012 (TFDS reads a class attribute list)
        EurosatDownloadConfig(name="rgb", description="EuroSAT_RGB JPEGs", bands=RGB_BANDS),
        EurosatDownloadConfig(name="all_bands", description="EuroSAT_MS, 13 bands", bands=MS_BANDS),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put EuroSAT_RGB.zip (config rgb) or EuroSAT_MS.zip (config all_bands) from "
        "https://zenodo.org/records/7711810 in manual_dir, zipped or extracted."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        bands = self.builder_config.bands
        dtype = np.uint8 if self.builder_config.name == "rgb" else np.uint16
        return tfds.core.DatasetInfo(
            builder=self,
            description="EuroSAT (Helber et al., 2019), as downloaded.",
            features=tfds.features.FeaturesDict(
                {
                    "name": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=CLASSES),
                    "image": tfds.features.Tensor(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, len(bands)),
                        dtype=dtype,
                        encoding=tfds.features.Encoding.ZLIB,
                    ),
                }
            ),
            homepage="https://github.com/phelber/EuroSAT",
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(os.fspath(dl_manager.manual_dir))}

    def _generate_examples(self, manual_dir: str):
        config = self.builder_config.name
        decode = _decode_jpeg if config == "rgb" else _decode_geotiff
        for name, path, read in find_images(manual_dir, config):
            image = decode(read(), path)
            label = CLASSES.index(name.split("_")[0])
            yield name, {"name": name, "label": label, "image": image}


def find_images(manual_dir: str, config: str):
    """(name, path, read) of every image of `config` in manual_dir, in name order: from the first
    download zip present, else from the files under manual_dir."""
    zips = [os.path.join(manual_dir, f) for f in DOWNLOADS[config]]
    zips = [z for z in zips if os.path.exists(z)]
    if zips:
        return _zip_images(zips[0])
    found = {}
    for folder, _, files in os.walk(manual_dir):
        for file in files:
            path = os.path.join(folder, file)
            match = _MEMBER.search(path.replace(os.sep, "/"))
            if match and file.endswith(_EXTENSION[config]) and match["cls"] in CLASSES:
                if match["name"] in found:
                    raise ValueError(
                        f"EuroSAT: {match['name']} is both {found[match['name']]} and {path}; "
                        "keep one copy of the download in manual_dir"
                    )
                found[match["name"]] = path
    if not found:
        raise FileNotFoundError(
            f"EuroSAT {config}: manual_dir {manual_dir} holds none of "
            f"{', '.join(DOWNLOADS[config])} and no extracted "
            f"<Class>/<Class>_<n>{_EXTENSION[config]} images"
        )

    def reader(path):
        def read():
            with open(path, "rb") as f:
                return f.read()

        return read

    return [(name, found[name], reader(found[name])) for name in sorted(found, key=_name_key)]


def _zip_images(path: str):
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise ValueError(f"EuroSAT: {path} is not a readable zip file ({error})") from error
    members = {}
    for member in archive.namelist():
        match = _MEMBER.search(member)
        if match and match["cls"] in CLASSES:
            members[match["name"]] = member
    if not members:
        raise ValueError(f"EuroSAT: {path} holds no <Class>/<Class>_<n>.jpg|tif images")
    return [
        (name, f"{path}:{members[name]}", lambda m=members[name]: archive.read(m))
        for name in sorted(members, key=_name_key)
    ]


def _name_key(name: str):
    cls, number = name.rsplit("_", 1)
    return cls, int(number)


def _decode_jpeg(data: bytes, path: str) -> np.ndarray:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("RGB"))
    except OSError as error:
        raise ValueError(f"EuroSAT: cannot decode {path}: {error}") from error
    if pixels.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"EuroSAT: {path} is {pixels.shape}, not (64, 64, 3)")
    return pixels


def _decode_geotiff(data: bytes, path: str) -> np.ndarray:
    import rasterio
    from rasterio.io import MemoryFile

    try:
        with MemoryFile(data) as memory, memory.open() as source:
            pixels = source.read()
    except rasterio.errors.RasterioIOError as error:
        raise ValueError(f"EuroSAT: cannot read {path}: {error}") from error
    expected = (len(MS_BANDS), IMAGE_SIZE, IMAGE_SIZE)
    if pixels.shape != expected or pixels.dtype != np.uint16:
        raise ValueError(
            f"EuroSAT: {path} is {pixels.dtype}{pixels.shape}, not uint16{expected} "
            f"(bands {', '.join(MS_BANDS)})"
        )
    return np.moveaxis(pixels, 0, -1)
