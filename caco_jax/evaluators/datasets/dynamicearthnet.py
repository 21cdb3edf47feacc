"""TFDS builder `dynamic_earthnet`: DynamicEarthNet (Toker et al., CVPR 2022) as users download it.

Three downloads, put in one folder (`manual_dir`; see docs/dynamicearthnet.md), each as its zip
files or extracted in place:

  the dataset (https://mediatum.ub.tum.de/1650201):
  planet.<zone>.zip   planet/<zone>/<grid>/<cube>/PF-SR/<YYYY-MM-DD>.tif   daily PlanetFusion
                      surface reflectance x 10000, 4 bands (blue, green, red, near infrared),
                      1024 x 1024 (and PF-QA/, not read), for every cube of every split
  labels.zip          labels/<cube>_<zone>/Labels/Raster/<tile>/<tile>-<YYYY_MM>_01.tif   monthly
                      labels of the 55 training cubes, 7 uint8 bands, band k = 255 where the
                      pixel is class k (and *.tif.aux.xml, Labels/Vector/, not read)
  the validation and test labels, published later (https://mediatum.ub.tum.de/1738088):
                      dynamicearthnet_test_labels/<cube>_<zone>/Labels/Raster/<tile>/...tif
  the split files (https://vision.in.tum.de/webshare/u/toker/dynnet_training_splits/, or a copy
  that keeps them under split_info/): dynnet_training_splits/ or split_info/ holding train.txt,
                      val.txt, test.txt, one labelled month per line:
                      `<planet PF-SR folder> <label file> <YYYY-MM>`; or a folder given as
                      `split_dir`

Files are found by the cube id and the date in their paths, wherever they are under manual_dir or
in its zip files, so the split files' planet prefix (`/reprocess-cropped/UTM-24000/`, not the
download's `planet/`), label folders named `<cube>-<zone>`, label dates written `YYYY-MM-01`, and
the layout of cube 1417_3281_13 (`labels/<cube>_<zone>/Raster/...`, without `Labels/`) all
resolve. A file that is missing is an error naming the download that holds it.

One example per (cube, month): `location` (cube id), `month` (`YYYY-MM`), `image` (int16 [H, W, 3]:
red, green, blue reflectance x 10000 of the month's first day, the date its label describes) and
`label` (uint8 [H, W]: the class index 0-6 of `CLASSES`, `UNLABELLED` where no band is set; where
several are, the last band wins, as in the official loader's loop). Splits: `train` = train.txt plus
the two cubes the official README restores to it (`RESTORED_TRAIN_CUBES`), `validation` = val.txt,
`test` = test.txt. Pixels are TFDS `Tensor` features with ZLIB encoding in array_record files: no
TensorFlow to build or read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import zipfile

import numpy as np
import tensorflow_datasets as tfds

CLASSES = (
    "impervious surfaces",
    "agriculture",
    "forest and other vegetation",
    "wetlands",
    "soil",
    "water",
    "snow and ice",
)
UNLABELLED = 255  # label value of a pixel whose 7 bands are all unset
LABEL_SET = 255  # a label band's value where the pixel belongs to its class
PLANET_BANDS = ("blue", "green", "red", "nir")  # band order of the PF-SR GeoTIFFs
RGB = ("red", "green", "blue")
DATASET_URL = "https://mediatum.ub.tum.de/1650201"  # planet.<zone>.zip, labels.zip
EVALUATION_LABELS_URL = "https://mediatum.ub.tum.de/1738088"  # validation and test labels
SPLITS_URL = "https://vision.in.tum.de/webshare/u/toker/dynnet_training_splits/"
# The folders the split files come in: the published one, and the one of the copies still served.
SPLIT_FOLDERS = ("dynnet_training_splits", "split_info")
SPLITS_FOLDER = SPLIT_FOLDERS[0]
SPLIT_FILES = {"train": "train.txt", "validation": "val.txt", "test": "test.txt"}
# The official README: "2 cubes from the training set was not available so we exclude them. However
# now they are ready to use, please modify the train.txt accordingly." They count among the paper's
# 55 training locations; each has the 24 labelled months.
RESTORED_TRAIN_CUBES = ("1417_3281_13", "2235_3403_13")
LABELLED_MONTHS = tuple(f"{year}-{month:02d}" for year in (2018, 2019) for month in range(1, 13))

_CUBE = r"(\d+_\d+_\d+)"
_IMAGE_PATH = re.compile(rf"(?:^|/){_CUBE}/PF-SR/(\d{{4}}-\d{{2}})-01\.tif$")
# `Labels/` is absent in the folder of 1417_3281_13 (`labels/1417_3281_13_11N/Raster/...`).
_LABEL_PATH = re.compile(
    rf"(?:^|/){_CUBE}[_-]\d{{1,2}}[NS]/(?:Labels/)?Raster/[^/]+/[^/]*?(\d{{4}})[_-](\d{{2}})[_-]01"
    r"\.tif$"
)
_MONTH = re.compile(r"^\d{4}-\d{2}$")


@dataclasses.dataclass(frozen=True)
class Member:
    """A file of the download: a path on disk, or a member of a zip file."""

    path: str
    archive: str = ""  # the zip file holding `path`, "" for a file on disk

    def __str__(self) -> str:
        return f"{self.archive}:{self.path}" if self.archive else self.path


class DynamicEarthNet(tfds.core.GeneratorBasedBuilder):
    """DynamicEarthNet monthly Planet images with their land-cover labels, one example per month."""

    name = "dynamic_earthnet"
    BUILDER_CONFIGS = [  # noqa: RUF012 (TFDS reads a class attribute list)
        tfds.core.BuilderConfig(
            name="rgb",
            version=tfds.core.Version("1.1.0"),
            release_notes={
                "1.1.0": "the test split; validation and test labels from their own download"
            },
            description="red, green, blue",
        )
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download DynamicEarthNet from {DATASET_URL} (the planet.*.zip files and labels.zip), "
        f"its validation and test labels from {EVALUATION_LABELS_URL}, and the split files "
        f"train.txt, val.txt, test.txt ({SPLITS_URL}) into {SPLITS_FOLDER}/ or split_info/, all "
        "in manual_dir, zipped or extracted."
    )

    def __init__(self, *, split_dir: str = "", **kwargs):
        super().__init__(**kwargs)
        self.split_dir = split_dir  # the split files' folder; "" = one of SPLIT_FOLDERS

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="DynamicEarthNet (Toker et al., CVPR 2022): labelled monthly Planet images",
            features=tfds.features.FeaturesDict(
                {
                    "location": tfds.features.Text(),
                    "month": tfds.features.Text(),
                    "image": tfds.features.Tensor(
                        shape=(None, None, len(RGB)),
                        dtype=np.int16,
                        encoding=tfds.features.Encoding.ZLIB,
                    ),
                    "label": tfds.features.Tensor(
                        shape=(None, None), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
                    ),
                }
            ),
            homepage="https://mediatum.ub.tum.de/1650201",
        )

    def _split_generators(self, dl_manager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        splits = split_months(split_folder(manual_dir, self.split_dir))
        images, labels = index_download(manual_dir)
        return {
            split: self._generate_examples(
                [resolve(cube, month, split, images, labels) for cube, month in months]
            )
            for split, months in splits.items()
        }

    def _generate_examples(self, examples):
        with contextlib.ExitStack() as stack:
            archives = {}

            def open_member(member: Member):
                if not member.archive:
                    return member.path
                if member.archive not in archives:
                    archives[member.archive] = stack.enter_context(zipfile.ZipFile(member.archive))
                return archives[member.archive].read(member.path)

            for cube, month, image_member, label_member in examples:
                image = read_rgb(open_member(image_member), str(image_member))
                label = read_label(open_member(label_member), str(label_member))
                if image.shape[:2] != label.shape:
                    raise ValueError(
                        f"DynamicEarthNet {cube} {month}: image {image.shape[:2]} ({image_member}) "
                        f"and label {label.shape} ({label_member}) differ in size"
                    )
                yield (
                    f"{cube}_{month}",
                    {
                        "location": cube,
                        "month": month,
                        "image": image,
                        "label": label,
                    },
                )


def index_download(manual_dir: str) -> tuple[dict, dict]:
    """{(cube, month): Member} of the first-of-month PF-SR images and of the label rasters, from the
    files under `manual_dir` and the members of its zip files. A file found both extracted and in a
    zip is read from disk; two different files for one (cube, month) are an error."""
    if not os.path.isdir(manual_dir):
        raise FileNotFoundError(f"DynamicEarthNet: the download folder {manual_dir} does not exist")
    found = {"image": ({}, {}), "label": ({}, {})}  # kind -> (on disk, in zip files)

    def add(path: str, member: Member, in_zip: bool) -> None:
        for kind, pattern in (("image", _IMAGE_PATH), ("label", _LABEL_PATH)):
            match = pattern.search(path)
            if match:
                cube, month = match.group(1), "-".join(match.groups()[1:])
                table = found[kind][in_zip]
                if (cube, month) in table:
                    raise ValueError(
                        f"DynamicEarthNet: two {kind} files for {cube} {month}: "
                        f"{table[cube, month]} and {member}"
                    )
                table[cube, month] = member

    for folder, _, files in os.walk(manual_dir):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".zip") and folder == manual_dir:
                try:
                    with zipfile.ZipFile(path) as zipped:
                        for entry in zipped.namelist():
                            add(entry, Member(entry, path), in_zip=True)
                except zipfile.BadZipFile as error:
                    raise ValueError(
                        f"DynamicEarthNet: {path} is not a readable zip ({error})"
                    ) from error
            else:
                add(os.path.relpath(path, manual_dir).replace(os.sep, "/"), Member(path), False)
    return tuple({**in_zip, **on_disk} for on_disk, in_zip in found.values())


def split_folder(manual_dir: str, split_dir: str = "") -> str:
    """The folder of the split files: `split_dir` when given, else the one of `SPLIT_FOLDERS` in
    manual_dir (both present must hold the same files)."""
    if split_dir:
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(
                f"config.dynamicearthnet.split_dir: no folder {split_dir} (it should hold "
                f"{', '.join(SPLIT_FILES.values())})"
            )
        return split_dir
    found = [
        os.path.join(manual_dir, f)
        for f in SPLIT_FOLDERS
        if os.path.isdir(os.path.join(manual_dir, f))
    ]
    if not found:
        raise FileNotFoundError(
            f"DynamicEarthNet: no split files in {manual_dir} (expected "
            f"{' or '.join(f + '/' for f in SPLIT_FOLDERS)} holding "
            f"{', '.join(SPLIT_FILES.values())}, from {SPLITS_URL} or a copy of it; or set "
            "--config.dynamicearthnet.split_dir)"
        )
    for other in found[1:]:
        for name in SPLIT_FILES.values():
            first, second = (os.path.join(folder, name) for folder in (found[0], other))
            if _read_bytes(first) != _read_bytes(second):
                raise ValueError(
                    f"DynamicEarthNet: {first} and {second} differ; keep one of {found} or set "
                    "--config.dynamicearthnet.split_dir"
                )
    return found[0]


def _read_bytes(path: str) -> bytes | None:
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def read_split_file(path: str) -> list[tuple[str, str]]:
    """(cube, month) of each line `<planet PF-SR folder> <label file> <YYYY-MM>` of an official
    split file."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"DynamicEarthNet: missing split file {path} (the split files train.txt, val.txt, "
            f"test.txt: {SPLITS_URL}, or a copy of it)"
        )
    months = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.split()
            parts = [part for part in fields[0].split("/") if part] if fields else []
            if len(fields) != 3 or len(parts) < 2 or parts[-1] != "PF-SR":
                raise ValueError(
                    f"DynamicEarthNet: {path}:{number} is not "
                    f"'<.../<cube>/PF-SR> <label file> <YYYY-MM>': {line.strip()!r}"
                )
            if not _MONTH.match(fields[2]):
                raise ValueError(f"DynamicEarthNet: {path}:{number}: month {fields[2]!r}")
            months.append((parts[-2], fields[2]))
    if not months:
        raise ValueError(f"DynamicEarthNet: {path} lists no month")
    return months


def split_months(folder: str) -> dict[str, list[tuple[str, str]]]:
    """{split: [(cube, month), ...]}: the official split files in `folder`, with
    `RESTORED_TRAIN_CUBES` added to `train` when train.txt does not list them yet."""
    splits = {
        split: read_split_file(os.path.join(folder, name)) for split, name in SPLIT_FILES.items()
    }
    listed = {cube for cube, _ in splits["train"]}
    for cube in RESTORED_TRAIN_CUBES:
        if cube not in listed:
            splits["train"] += [(cube, month) for month in LABELLED_MONTHS]
    cubes = {split: {cube for cube, _ in months} for split, months in splits.items()}
    names = list(cubes)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = sorted(cubes[first] & cubes[second])
            if shared:
                raise ValueError(f"DynamicEarthNet: cubes in both {first} and {second}: {shared}")
    return splits


def resolve(cube: str, month: str, split: str, images: dict, labels: dict):
    """(cube, month, image member, label member); a missing file is an error naming it and the
    download that holds it."""
    if (cube, month) not in images:
        raise FileNotFoundError(
            f"DynamicEarthNet: no image of {cube} {month} (expected "
            f".../{cube}/PF-SR/{month}-01.tif in a planet.<zone>.zip of {DATASET_URL}, zipped or "
            "extracted)"
        )
    if (cube, month) not in labels:
        label = f"{cube}_<zone>/Labels/Raster/<tile>/<tile>-{month.replace('-', '_')}_01.tif"
        if split == "train":
            where = f"labels/{label} in labels.zip of {DATASET_URL}"
        else:
            where = (
                f"dynamicearthnet_test_labels/{label} in the validation and test labels, "
                f"{EVALUATION_LABELS_URL} (labels.zip holds the training labels only)"
            )
        raise FileNotFoundError(
            f"DynamicEarthNet: no label of {split} cube {cube} {month} (expected {where}, zipped "
            "or extracted)"
        )
    return cube, month, images[cube, month], labels[cube, month]


def _read_raster(source, name: str, count: int, dtypes: tuple[str, ...]) -> np.ndarray:
    """[count, H, W] of a GeoTIFF given as a path or as its bytes; wrong band count or dtype is an
    error naming the file."""
    import rasterio
    from rasterio.io import MemoryFile

    try:
        with contextlib.ExitStack() as stack:
            if isinstance(source, bytes):
                raster = stack.enter_context(stack.enter_context(MemoryFile(source)).open())
            else:
                raster = stack.enter_context(rasterio.open(source))
            if raster.count != count or raster.dtypes[0] not in dtypes:
                raise ValueError(
                    f"DynamicEarthNet: {name} has {raster.count} bands of {raster.dtypes[0]}, "
                    f"expected {count} of {' or '.join(dtypes)}"
                )
            return raster.read()
    except rasterio.errors.RasterioIOError as error:
        raise ValueError(f"DynamicEarthNet: cannot read {name}: {error}") from error


def read_rgb(source, name: str) -> np.ndarray:
    """int16 [H, W, 3] (red, green, blue) reflectance x 10000 of a 4-band PF-SR GeoTIFF. uint16
    values above 32767 (reflectance > 3.27, beyond the 1.0 at which every encoder input saturates)
    are clipped to it."""
    bands = _read_raster(source, name, len(PLANET_BANDS), ("int16", "uint16"))
    rgb = np.stack([bands[PLANET_BANDS.index(b)] for b in RGB], axis=-1)
    return np.clip(rgb, -32768, 32767).astype(np.int16)


def read_label(source, name: str) -> np.ndarray:
    """uint8 [H, W] class index of a 7-band label GeoTIFF, `UNLABELLED` where no band is set."""
    bands = _read_raster(source, name, len(CLASSES), ("uint8",))
    label = np.full(bands.shape[1:], UNLABELLED, np.uint8)
    for index, band in enumerate(bands):
        label[band == LABEL_SET] = index
    return label


def prepare(manual_dir: str, data_dir: str, split_dir: str = "") -> str:
    """Builds `<data_dir>/dynamic_earthnet/rgb/<version>` from the download; returns its path."""
    builder = DynamicEarthNet(
        config="rgb", data_dir=data_dir, file_format="array_record", split_dir=split_dir
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.path.abspath(manual_dir))
    )
    return os.fspath(builder.data_dir)
