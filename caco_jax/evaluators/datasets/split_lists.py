"""The published lists that fix an evaluation's examples: SeCo's splits and BigEarthNet's
cloud/shadow and seasonal-snow patches, read from manual_dir beside the download.

They are part of the protocol, so a missing list is an error naming the files and where to get them.
`--config.eval.download_lists=True` fetches the missing ones from their published addresses into
manual_dir (no checksum is published: a list is checked by parsing it, every name must be an example
of the download). `--config.eval.seeded_split=True` replaces the train/val lists by a seeded random
split, flagged in the metrics file.
"""

from __future__ import annotations

import os
import urllib.request
import warnings

import numpy as np

_SECO_LISTS = "https://storage.googleapis.com/remote_sensing_representations"
_BIGEARTHNET_DOCUMENTS = "http://bigearth.net/static/documents"
# Where each list is published (SeCo's datasets/bigearthnet_dataset.py and the same bucket's
# EuroSAT lists; bigearth.net for the cloud and snow lists).
URLS = {
    "eurosat-train.txt": f"{_SECO_LISTS}/eurosat-train.txt",
    "eurosat-val.txt": f"{_SECO_LISTS}/eurosat-val.txt",
    "bigearthnet-train.txt": f"{_SECO_LISTS}/bigearthnet-train.txt",
    "bigearthnet-val.txt": f"{_SECO_LISTS}/bigearthnet-val.txt",
    "bigearthnet-test.txt": f"{_SECO_LISTS}/bigearthnet-test.txt",
    **{
        name: f"{_BIGEARTHNET_DOCUMENTS}/{name}"
        for name in ("patches_with_cloud_and_shadow.csv", "patches_with_seasonal_snow.csv")
    },
}
EUROSAT_SPLITS = ("eurosat-train.txt", "eurosat-val.txt")
BIGEARTHNET_SPLITS = ("bigearthnet-train.txt", "bigearthnet-val.txt")
BIGEARTHNET_EXCLUDED = ("patches_with_cloud_and_shadow.csv", "patches_with_seasonal_snow.csv")


def read_names(path: str) -> list[str]:
    """Names one per line, file extension dropped (SeCo lists `Forest_12.jpg`); a CSV keeps its
    first column."""
    with open(path) as f:
        names = [line.split(",")[0].strip() for line in f if line.strip()]
    return [os.path.splitext(n)[0] if n.endswith((".jpg", ".tif")) else n for n in names]


def locate(manual_dir: str, files, *, download: bool) -> dict[str, str]:
    """{file: path} of the lists in manual_dir, fetching the missing ones first when `download`."""
    paths = {f: os.path.join(manual_dir, f) for f in files}
    missing = [f for f, p in paths.items() if not os.path.exists(p)]
    if missing and download:
        for file in missing:
            fetch(URLS[file], paths[file])
        missing = []
    if missing:
        where = "; ".join(f"{f}: {URLS[f]}" for f in missing)
        raise FileNotFoundError(
            f"config.eval.manual_dir={manual_dir!r} lacks {', '.join(missing)} (get them from "
            f"{where}, or pass --config.eval.download_lists=True; --config.eval.seeded_split=True "
            "uses a seeded split instead of the official lists)"
        )
    return paths


def fetch(url: str, path: str) -> None:
    """Downloads `url` to `path` (through a temporary file, so a failed fetch leaves nothing)."""
    temporary = f"{path}.download-{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(temporary, "wb") as f:
            f.write(response.read())
    except OSError as error:
        raise OSError(f"cannot download {url} to {path}: {error}") from error
    os.replace(temporary, path)


def indices(path: str, index: dict[str, int], dataset: str) -> np.ndarray:
    """Indices of the examples a list names, in the list's order (the official validation loaders
    do not shuffle, so their batches are consecutive runs of the list); a name not in the download
    is an error."""
    listed = read_names(path)
    missing = [name for name in listed if name not in index]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} of its {len(listed)} names are not in {dataset}, e.g. "
            f"{missing[:3]} (a truncated or wrong download of the list?)"
        )
    return np.array([index[name] for name in listed], np.int64)


def seeded_split(count: int, seed: int, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: a seeded 60 % / 20 % of `count` (the proportions of SeCo's splits)."""
    warnings.warn(
        f"{dataset}: config.eval.seeded_split=True: seeded random split (60 % train, 20 % val, "
        f"seed {seed}), not the official lists; the numbers are not the paper's protocol",
        stacklevel=2,
    )
    order = np.random.default_rng(seed).permutation(count)
    train_end = round(count * 0.6)
    val_end = train_end + round(count * 0.2)
    return np.sort(order[:train_end]), np.sort(order[train_end:val_end])
