"""TFDS builder `bigearthnet_download` for BigEarthNet-S2 v1.0 as users download it.

The download (https://bigearth.net, `BigEarthNet-S2-v1.0.tar.gz`, ~66 GB; SeCo's code names it
`BigEarthNet-v1.0.tar.gz`) stays as it is in manual_dir; it is streamed, never extracted (the
extracted folder `BigEarthNet-v1.0/` works too):

  BigEarthNet-v1.0/<patch>/<patch>_B01.tif ... _B12.tif, _B8A.tif   uint16 L2A, 120 / 60 / 20 px
  BigEarthNet-v1.0/<patch>/<patch>_labels_metadata.json            {"labels": [43-class names], ...}

One `train` split with every patch: `name` (the patch folder, the key of SeCo's split lists),
`labels` (the 43 original label names) and `image`, uint16 [120, 120, bands]: (B04, B03, B02) for
config `rgb`, the 12 bands in `layout.BANDS` order for `all_bands`, the 20 m and 60 m bands
repeated onto the 10 m grid (nearest neighbour: the raw values are kept exactly). No TensorFlow and
no Apache Beam: the main process streams the tar, worker processes decode the GeoTIFFs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tarfile

import numpy as np
import tensorflow_datasets as tfds

# The 43 labels of BigEarthNet v1.0 in alphabetical order (SeCo's `LABELS`).
LABELS = (
    "Agro-forestry areas", "Airports", "Annual crops associated with permanent crops", "Bare rock",
    "Beaches, dunes, sands", "Broad-leaved forest", "Burnt areas", "Coastal lagoons",
    "Complex cultivation patterns", "Coniferous forest", "Construction sites",
    "Continuous urban fabric", "Discontinuous urban fabric", "Dump sites", "Estuaries",
    "Fruit trees and berry plantations", "Green urban areas", "Industrial or commercial units",
    "Inland marshes", "Intertidal flats",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Mineral extraction sites", "Mixed forest", "Moors and heathland", "Natural grassland",
    "Non-irrigated arable land", "Olive groves", "Pastures", "Peatbogs",
    "Permanently irrigated land", "Port areas", "Rice fields",
    "Road and rail networks and associated land", "Salines", "Salt marshes",
    "Sclerophyllous vegetation", "Sea and ocean", "Sparsely vegetated areas",
    "Sport and leisure facilities", "Transitional woodland/shrub", "Vineyards", "Water bodies",
    "Water courses",
)  # fmt: skip
ALL_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
RGB_BANDS = ("B04", "B03", "B02")
BAND_PIXELS = {
    **dict.fromkeys(("B02", "B03", "B04", "B08"), 120),
    **dict.fromkeys(("B05", "B06", "B07", "B8A", "B11", "B12"), 60),
    **dict.fromkeys(("B01", "B09"), 20),
}
IMAGE_SIZE = 120
FOLDER = "BigEarthNet-v1.0"
DOWNLOADS = ("BigEarthNet-S2-v1.0.tar.gz", "BigEarthNet-v1.0.tar.gz")
LABELS_SUFFIX = "_labels_metadata.json"


class BigearthnetDownloadConfig(tfds.core.BuilderConfig):
    def __init__(self, *, bands: tuple[str, ...], **kwargs):
        super().__init__(version=tfds.core.Version("1.0.0"), **kwargs)
        self.bands = bands


class BigearthnetDownload(tfds.core.GeneratorBasedBuilder):
    """BigEarthNet-S2 patches with their labels, streamed from the downloaded tar.gz."""

    BUILDER_CONFIGS = [  # noqa: RUF012 (TFDS reads a class attribute list)
        BigearthnetDownloadConfig(name="rgb", description="B04, B03, B02", bands=RGB_BANDS),
        BigearthnetDownloadConfig(name="all_bands", description="12 bands", bands=ALL_BANDS),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put BigEarthNet-S2-v1.0.tar.gz from https://bigearth.net in manual_dir (not extracted)."
    )

    def __init__(self, *, num_workers: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.num_workers = num_workers

    def _info(self) -> tfds.core.DatasetInfo:
        bands = self.builder_config.bands
        return tfds.core.DatasetInfo(
            builder=self,
            description="BigEarthNet-S2 v1.0 (Sumbul et al., 2019), as downloaded.",
            features=tfds.features.FeaturesDict(
                {
                    "name": tfds.features.Text(),
                    "labels": tfds.features.Sequence(tfds.features.ClassLabel(names=LABELS)),
                    "image": tfds.features.Tensor(
                        shape=(IMAGE_SIZE, IMAGE_SIZE, len(bands)),
                        dtype=np.uint16,
                        encoding=tfds.features.Encoding.ZLIB,
                    ),
                }
            ),
            homepage="https://bigearth.net",
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(os.fspath(dl_manager.manual_dir))}

    def _generate_examples(self, manual_dir: str):
        bands = self.builder_config.bands
        patches = read_patches(manual_dir, bands)
        workers = self.num_workers or os.cpu_count() or 1
        if workers == 1:
            decoded = (decode_patch(patch, files, bands) for patch, files in patches)
            yield from ((name, example) for name, example in decoded)
            return
        jobs = ((patch, files, bands) for patch, files in patches)
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            yield from pool.imap(_decode_job, jobs, chunksize=16)


def find_download(manual_dir: str) -> tuple[str, str]:
    """('tar', path) of the downloaded tar.gz, or ('folder', path) of the extracted folder."""
    for name in DOWNLOADS:
        path = os.path.join(manual_dir, name)
        if os.path.exists(path):
            return "tar", path
    for folder in (os.path.join(manual_dir, FOLDER), manual_dir):
        if os.path.isdir(folder) and any(
            os.path.exists(os.path.join(folder, entry, entry + LABELS_SUFFIX))
            for entry in sorted(os.listdir(folder))[:10]
        ):
            return "folder", folder
    raise FileNotFoundError(
        f"BigEarthNet: manual_dir {manual_dir} holds neither {' nor '.join(DOWNLOADS)} nor the "
        f"extracted {FOLDER}/<patch>/ folders"
    )


def read_patches(manual_dir: str, bands):
    """Yields (patch name, {file name: bytes}) with the files of `bands` and the labels JSON."""
    form, path = find_download(manual_dir)
    wanted = {f"_{b}.tif" for b in bands} | {LABELS_SUFFIX}

    def needed(patch: str, file: str) -> bool:
        return file.startswith(patch + "_") and file[len(patch) :] in wanted

    if form == "folder":
        for patch in sorted(os.listdir(path)):
            folder = os.path.join(path, patch)
            if not os.path.isdir(folder):
                continue
            files = {}
            for file in sorted(os.listdir(folder)):
                if needed(patch, file):
                    with open(os.path.join(folder, file), "rb") as f:
                        files[file] = f.read()
            yield patch, files
        return
    done, current, files = set(), None, {}
    try:
        with tarfile.open(path, mode="r|gz") as stream:
            for member in stream:
                parts = member.name.strip("/").split("/")
                if not member.isfile() or len(parts) < 2:
                    continue
                patch, file = parts[-2], parts[-1]
                if not needed(patch, file):
                    continue
                if patch != current:
                    if current is not None:
                        done.add(current)
                        yield current, files
                    if patch in done:
                        raise ValueError(
                            f"BigEarthNet: {path}: the files of patch {patch} are not contiguous"
                        )
                    current, files = patch, {}
                files[file] = stream.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ValueError(f"BigEarthNet: {path} is truncated or corrupt ({error})") from error
    if current is not None:
        yield current, files


def _decode_job(job):
    return decode_patch(*job)


def decode_patch(patch: str, files: dict, bands) -> tuple[str, dict]:
    """(name, example) of one patch: its labels and uint16 [120, 120, bands] image."""
    from rasterio.io import MemoryFile

    labels_file = patch + LABELS_SUFFIX
    if labels_file not in files:
        raise ValueError(f"BigEarthNet patch {patch}: no {labels_file}")
    try:
        labels = json.loads(files[labels_file])["labels"]
    except (ValueError, KeyError) as error:
        raise ValueError(f"BigEarthNet patch {patch}: {labels_file} has no labels list") from error
    unknown = [label for label in labels if label not in LABELS]
    if unknown:
        raise ValueError(f"BigEarthNet patch {patch}: unknown labels {unknown}")
    channels = []
    for band in bands:
        file = f"{patch}_{band}.tif"
        if file not in files:
            raise ValueError(f"BigEarthNet patch {patch}: no {file}")
        with MemoryFile(files[file]) as memory, memory.open() as source:
            values = source.read(1)
        size = BAND_PIXELS[band]
        if values.shape != (size, size):
            raise ValueError(
                f"BigEarthNet patch {patch}: {file} is {values.shape}, not ({size}, {size})"
            )
        repeat = IMAGE_SIZE // size
        channels.append(np.repeat(np.repeat(values, repeat, axis=0), repeat, axis=1))
    image = np.stack(channels, axis=-1).astype(np.uint16)
    return patch, {"name": patch, "labels": labels, "image": image}
