"""Writes a downloaded location in the published archive layout, atomically.

A location is written into `<archive>/.partial-<location_id>/` and renamed to
`<archive>/<location_id>/` only once every file is written and flushed to disk, so a location folder
that exists is complete, and an interrupted one is a dot-folder that readers ignore and the next run
replaces.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np

from caco_jax.data import layout
from caco_jax.sources.download.client import Acquisition

PARTIAL_PREFIX = ".partial-"
# SeCo's RGB preview: the uint8 bands stretched from [0, 0.3 * 255] to [0, 255].
PREVIEW_MAX = 0.3 * 255.0


@dataclasses.dataclass(frozen=True)
class Image:
    """One acquisition of one location: its 12 bands as uint8 arrays and their footprint."""

    acquisition: Acquisition
    bands: dict[str, np.ndarray]
    box: layout.GeoBox


def is_complete(archive_dir: str, location_id: str) -> bool:
    return os.path.isdir(os.path.join(archive_dir, location_id))


def remove_partials(archive_dir: str) -> list[str]:
    """Deletes what interrupted runs left behind; returns the location ids concerned."""
    if not os.path.isdir(archive_dir):
        return []
    removed = []
    for name in sorted(os.listdir(archive_dir)):
        if name.startswith(PARTIAL_PREFIX):
            shutil.rmtree(os.path.join(archive_dir, name))
            removed.append(name[len(PARTIAL_PREFIX) :])
    return removed


def write_location(
    archive_dir: str, location_id: str, images: list[Image], preview: bool = True
) -> str:
    """Writes the images of one location and publishes the folder; returns its path."""
    final = os.path.join(archive_dir, location_id)
    if os.path.exists(final):
        raise FileExistsError(f"{final} exists already: refusing to overwrite a finished location")
    partial = os.path.join(archive_dir, PARTIAL_PREFIX + location_id)
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    written = []
    for image in images:
        product_id = image.acquisition.product_id
        if not layout.is_acquisition_name(product_id) or os.sep in product_id:
            raise ValueError(f"location {location_id}: bad product id {product_id!r}")
        folder = os.path.join(partial, product_id)
        os.makedirs(folder)
        for band in layout.BANDS:
            path = os.path.join(folder, layout.band_file(band))
            layout.write_band_geotiff(path, image.bands[band], image.box)
            written.append(path)
        path = os.path.join(folder, layout.METADATA_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(image.acquisition.properties, f, default=str)
        written.append(path)
        if preview:
            path = os.path.join(partial, f"{product_id}.tif")
            _write_preview(path, image)
            written.append(path)
    for path in written:
        _fsync(path)
    _fsync_dir(partial)
    os.rename(partial, final)
    _fsync_dir(archive_dir)
    return final


def _write_preview(path: str, image: Image) -> None:
    rgb = np.stack([image.bands[band] for band in layout.RGB_BANDS]).astype(np.float32)
    rgb = (np.clip(rgb, 0.0, PREVIEW_MAX) / PREVIEW_MAX * 255.0).astype(np.uint8)
    layout.write_preview_geotiff(path, rgb, image.box)


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
