"""TFDS builder `oscd` for the Onera Satellite Change Detection dataset as users download it.

The download (https://rcdaudt.github.io/oscd/, IEEE DataPort) is three folders or their zip files:

  Onera Satellite Change Detection dataset - Images/
    train.txt, test.txt                 comma-separated city names (14 train, 10 test)
    <city>/imgs_1/<product>_B01.tif ... first date, each band at its native resolution (10, 20 or
                                        60 m): what SeCo's `datasets/oscd_dataset.py` reads
    <city>/imgs_2/...                   second date
    <city>/imgs_1_rect/B01.tif ... B12.tif, B8A.tif   first date, all 13 bands on the 10 m grid
    <city>/imgs_2_rect/...              second date
  Onera Satellite Change Detection dataset - Train Labels/<city>/cm/cm.png (and <city>-cm.tif)
  Onera Satellite Change Detection dataset - Test Labels/<city>/cm/cm.png (and <city>-cm.tif)

One example per city: `city`, `image1` / `image2` (uint16 reflectance [H, W, bands]) and `mask`
(uint8 [H, W], 1 = changed). Pixels are TFDS `Tensor` features with ZLIB encoding and the files are
array_record, so neither building nor reading needs TensorFlow. Configs: `rgb` = (B04, B03, B02),
the bands the paper evaluates, read from `imgs_1/` and `imgs_2/` as SeCo read them (the three are
10 m bands, so their native grid is the 10 m grid); `all_bands` = the 13 bands in band order from
`imgs_1_rect/` and `imgs_2_rect/`, the only folders holding every band on one grid (no official
all-bands recipe exists).
"""

from __future__ import annotations

import glob
import os
import zipfile

import numpy as np
import tensorflow_datasets as tfds

IMAGES_FOLDER = "Onera Satellite Change Detection dataset - Images"
LABEL_FOLDERS = {
    "train": "Onera Satellite Change Detection dataset - Train Labels",
    "test": "Onera Satellite Change Detection dataset - Test Labels",
}
ALL_BANDS = (
    "B01",
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B07",
    "B08",
    "B8A",
    "B09",
    "B10",
    "B11",
    "B12",
)
RGB_BANDS = ("B04", "B03", "B02")
NATIVE_FOLDER = "imgs_{date}"  # <product>_<band>.tif, each band at its native resolution
RECTIFIED_FOLDER = "imgs_{date}_rect"  # <band>.tif, every band on the 10 m grid


class OscdConfig(tfds.core.BuilderConfig):
    def __init__(self, *, bands: tuple[str, ...], folder: str, **kwargs):
        super().__init__(
            version=tfds.core.Version("1.1.0"),
            release_notes={
                "1.1.0": "rgb reads imgs_1/ and imgs_2/ as SeCo did (1.0.0 read imgs_*_rect/)"
            },
            **kwargs,
        )
        self.bands = bands
        self.folder = folder  # "imgs_{date}" or "imgs_{date}_rect"


class Oscd(tfds.core.GeneratorBasedBuilder):
    """OSCD image pairs with their change masks, one example per city."""

    BUILDER_CONFIGS = [  # noqa: RUF012 (TFDS reads a class attribute list)
        OscdConfig(
            name="rgb",
            description="B04, B03, B02 of imgs_1/, imgs_2/ (SeCo's)",
            bands=RGB_BANDS,
            folder=NATIVE_FOLDER,
        ),
        OscdConfig(
            name="all_bands",
            description="all 13 bands of imgs_1_rect/, imgs_2_rect/",
            bands=ALL_BANDS,
            folder=RECTIFIED_FOLDER,
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the three OSCD archives (Images, Train Labels, Test Labels) from "
        "https://rcdaudt.github.io/oscd/ and put the zip files or their extracted folders in "
        "manual_dir."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        channels = len(self.builder_config.bands)
        image = tfds.features.Tensor(
            shape=(None, None, channels), dtype=np.uint16, encoding=tfds.features.Encoding.ZLIB
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description="Onera Satellite Change Detection (Daudt et al., IGARSS 2018).",
            features=tfds.features.FeaturesDict(
                {
                    "city": tfds.features.Text(),
                    "image1": image,
                    "image2": image,
                    "mask": tfds.features.Tensor(
                        shape=(None, None), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
                    ),
                }
            ),
            homepage="https://rcdaudt.github.io/oscd/",
        )

    def _split_generators(self, dl_manager):
        folders = locate_folders(
            os.fspath(dl_manager.manual_dir), os.fspath(dl_manager.download_dir)
        )
        return {
            split: self._generate_examples(folders[IMAGES_FOLDER], folders[labels], split)
            for split, labels in LABEL_FOLDERS.items()
        }

    def _generate_examples(self, images_dir: str, labels_dir: str, split: str):
        for city in city_list(images_dir, split):
            config = self.builder_config
            image1 = read_bands(images_dir, city, config.folder.format(date=1), config.bands)
            image2 = read_bands(images_dir, city, config.folder.format(date=2), config.bands)
            mask = read_change_mask(os.path.join(labels_dir, city, "cm"), city)
            if image1.shape != image2.shape or image1.shape[:2] != mask.shape:
                raise ValueError(
                    f"OSCD city {city!r}: image sizes {image1.shape[:2]} / {image2.shape[:2]} and "
                    f"mask {mask.shape} differ"
                )
            yield city, {"city": city, "image1": image1, "image2": image2, "mask": mask}


def locate_folders(manual_dir: str, scratch_dir: str) -> dict[str, str]:
    """Path of each of the three OSCD folders: in `manual_dir`, or extracted from its zip file
    there."""
    located = {}
    for folder in (IMAGES_FOLDER, *LABEL_FOLDERS.values()):
        path = os.path.join(manual_dir, folder)
        if os.path.isdir(path):
            located[folder] = path
            continue
        archive = f"{path}.zip"
        if not os.path.exists(archive):
            raise FileNotFoundError(
                f"OSCD: neither {folder!r} nor {folder + '.zip'!r} is in {manual_dir}"
            )
        target = os.path.join(scratch_dir, "oscd_extracted")
        try:
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(target)
        except zipfile.BadZipFile as error:
            raise ValueError(f"OSCD: {archive} is not a readable zip file ({error})") from error
        located[folder] = os.path.join(target, folder)
        if not os.path.isdir(located[folder]):
            raise ValueError(f"OSCD: {archive} does not contain the folder {folder!r}")
    return located


def city_list(images_dir: str, split: str) -> list[str]:
    path = os.path.join(images_dir, f"{split}.txt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"OSCD: missing city list {path}")
    with open(path) as f:
        cities = [name.strip() for name in f.read().replace("\n", ",").split(",") if name.strip()]
    if not cities:
        raise ValueError(f"OSCD: {path} lists no city")
    return cities


def band_file(images_dir: str, city: str, folder: str, band: str) -> str:
    """`<folder>/<band>.tif` (the rectified folders) or `<folder>/<product>_<band>.tif` (the
    native ones, SeCo's `read_image`); missing is an error naming the file and the download."""
    folder_dir = os.path.join(images_dir, city, folder)
    if folder.endswith("_rect"):
        paths = [p for p in [os.path.join(folder_dir, f"{band}.tif")] if os.path.exists(p)]
    else:
        paths = sorted(glob.glob(os.path.join(glob.escape(folder_dir), f"*_{band}.tif")))
    if len(paths) == 1:
        return paths[0]
    if len(paths) > 1:
        raise ValueError(f"OSCD city {city!r}: several {band} files in {folder_dir}: {paths}")
    name = f"{band}.tif" if folder.endswith("_rect") else f"<product>_{band}.tif"
    raise FileNotFoundError(
        f"OSCD city {city!r}: no {folder}/{name} in {images_dir} (part of '{IMAGES_FOLDER}.zip')"
    )


def read_bands(images_dir: str, city: str, folder: str, bands) -> np.ndarray:
    """uint16 [H, W, len(bands)] reflectance of one date from `folder` of the city; the bands must
    share one grid."""
    import rasterio

    channels = []
    for band in bands:
        path = band_file(images_dir, city, folder, band)
        try:
            with rasterio.open(path) as source:
                channels.append(source.read(1))
        except rasterio.errors.RasterioIOError as error:
            raise ValueError(f"OSCD: cannot read {path}: {error}") from error
        if channels[-1].shape != channels[0].shape:
            raise ValueError(
                f"OSCD: {path} is {channels[-1].shape}, not {channels[0].shape} like {bands[0]}"
            )
    return np.stack(channels, axis=-1).astype(np.uint16)


def read_change_mask(cm_dir: str, city: str) -> np.ndarray:
    """uint8 [H, W] with 1 = changed, from `cm.png` (what SeCo reads; white = change) or
    `<city>-cm.tif`
    (1 = unchanged, 2 = changed)."""
    png = os.path.join(cm_dir, "cm.png")
    tif = os.path.join(cm_dir, f"{city}-cm.tif")
    if os.path.exists(png):
        from PIL import Image

        with Image.open(png) as image:
            values = np.asarray(image.convert("L"))
        return (values > 127).astype(np.uint8)
    if os.path.exists(tif):
        import rasterio

        with rasterio.open(tif) as source:
            values = source.read(1)
        if not set(np.unique(values).tolist()) <= {1, 2}:
            raise ValueError(f"OSCD: {tif} holds values other than 1 (unchanged) and 2 (changed)")
        return (values == 2).astype(np.uint8)
    raise FileNotFoundError(f"OSCD city {city!r}: no change mask ({png} or {tif})")


def prepare(manual_dir: str, data_dir: str, config_name: str = "rgb") -> str:
    """Builds `<data_dir>/oscd/<config_name>/<version>` from the downloaded archive; returns its
    path."""
    builder = Oscd(config=config_name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.path.abspath(manual_dir))
    )
    return os.fspath(builder.data_dir)
