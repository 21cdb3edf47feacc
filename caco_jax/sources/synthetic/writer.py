"""Writes a synthetic archive to disk in the published archive layout (caco_jax/data/layout.py).

One folder per location; in it one folder per acquisition, named like an Earth Engine Sentinel-2
product id, holding 12 uint8 JPEG GeoTIFFs at 10/20/60 m and a `metadata.json`, with the RGB
preview `<acquisition>.tif` beside it; `.DS_Store` and `._*` files as hand-made archives have them.
The archive comes as a folder, as one `.tar.gz` (like `caco10k.tar.gz`) or as that file cut into
parts (like the 1M archive), with its ground truth beside it.

The same arguments give the same bytes, tar member order and mtimes included, whatever the number
of worker processes.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import gzip
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping

import numpy as np

from caco_jax.data import layout
from caco_jax.runtime import workers
from caco_jax.sources.synthetic import ground_truth
from caco_jax.sources.synthetic.plan import Acquisition, LocationPlan, plan_locations
from caco_jax.sources.synthetic.render import render_location

FORMS = ("folder", "tar.gz", "parts")
NUM_PARTS = 4  # the 1M archive ships as clean_1m_geography_part0..3
STAGING_PREFIX = ".synthetic-staging-"  # hidden: readers skip it as a stray name

# SeCo's downloader asks GDAL for JPEG without a quality, so GDAL's default applies.
_JPEG_QUALITY = 75
_TAR_MTIME = int(datetime.datetime(2023, 6, 18, tzinfo=datetime.UTC).timestamp())  # CVPR 2023

# Written into real archives by macOS; readers must skip them.
_STRAY_FILES = {
    ".DS_Store": b"\x00\x00\x00\x01Bud1" + bytes(2040),
    "._000000": b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4),
}


def write_archive(
    output_dir: str,
    *,
    num_locations: int,
    seed: int = 0,
    change_fraction: float = 0.3,
    name: str = ground_truth.DEFAULT_NAME,
    form: str = "folder",
    acquisitions_per_window: tuple[int, int] = (5, 5),
    acquisitions_by_location: Mapping[int, tuple[int, int]] | None = None,
    stray_files: bool = True,
    num_workers: int = 1,
    overwrite: bool = False,
) -> str:
    """Writes a synthetic archive in the published layout and its ground truth beside it.

    Args:
      output_dir: folder to write into (created if missing).
      num_locations: number of location folders `000000`, `000001`, ...
      seed: everything (coordinates, land cover, change, dates, pixels) is a function of it.
      change_fraction: share of locations whose land cover changes between the windows.
      name: top folder name, like `clean_10k_geography`.
      form: "folder" writes `<name>/`; "tar.gz" writes `<name>.tar.gz` that extracts to `<name>/`;
        "parts" writes that tar.gz cut byte-wise into `<name>_part0` .. `<name>_part3`.
      acquisitions_per_window: (early, late) acquisitions of every location.
      acquisitions_by_location: {location index: (early, late)} overrides, e.g. to make a location
        with too few acquisitions for the reader's tests.
      stray_files: add `.DS_Store` and `._000000` files as real archives have them.
      num_workers: processes that render locations; the bytes do not depend on it.
      overwrite: replace an earlier archive of this name (in any form) and its ground truth
        instead of raising FileExistsError.

    Returns:
      The archive's path: the folder, the .tar.gz, or the first part.

    The outputs appear atomically: everything is written into a hidden temporary folder in
    `output_dir` and renamed into place, the ground truth CSV last, so a present CSV means a
    complete archive.
    """
    entries = archive_entries(name, form)
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"name must be a plain folder name, got {name!r}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    plans = plan_locations(
        num_locations,
        seed=seed,
        change_fraction=change_fraction,
        acquisitions_per_window=acquisitions_per_window,
        acquisitions_by_location=acquisitions_by_location,
    )
    os.makedirs(output_dir, exist_ok=True)
    # Any earlier archive of this name, in any form: two archives side by side would be ambiguous.
    earlier = [
        entry
        for other_form in FORMS
        for entry in archive_entries(name, other_form)
        if os.path.lexists(os.path.join(output_dir, entry))
    ]
    if earlier and not overwrite:
        raise FileExistsError(
            f"{output_dir}: {sorted(set(earlier))} already exist (overwrite=True)"
        )

    truth_name = ground_truth.ground_truth_name(name)
    staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{name}-", dir=output_dir)
    try:
        root = os.path.join(staging, name)
        os.makedirs(root)
        _write_locations(root, plans, seed, num_workers)
        if stray_files:
            _write_stray_files(root)
        if form != "folder":
            tar_path = os.path.join(staging, f"{name}.tar.gz")
            _write_tar_gz(root, tar_path)
            shutil.rmtree(root)
            if form == "parts":
                _split(tar_path, part_names(name))
                os.remove(tar_path)
        ground_truth.write_ground_truth(
            os.path.join(staging, truth_name), [plan.ground_truth() for plan in plans]
        )
        # The ground truth goes first and comes back last: it marks a complete archive.
        for entry in sorted(set(earlier), key=lambda e: e != truth_name):
            _remove(os.path.join(output_dir, entry))
        for entry in entries:
            os.replace(os.path.join(staging, entry), os.path.join(output_dir, entry))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(output_dir, entries[0])


def archive_entries(name: str, form: str) -> list[str]:
    """The names `write_archive` creates in the output folder for this form, ground truth last."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    archive = {"folder": [name], "tar.gz": [f"{name}.tar.gz"], "parts": part_names(name)}[form]
    return [*archive, ground_truth.ground_truth_name(name)]


def part_names(name: str) -> list[str]:
    """File names of the split archive; sorted name order is byte order."""
    return [f"{name}_part{i}" for i in range(NUM_PARTS)]


def remove_staging_folders(output_dir: str, name: str) -> None:
    """Removes what interrupted writes of the archive `name` left in `output_dir`."""
    if os.path.isdir(output_dir):
        for entry in os.listdir(output_dir):
            if entry.startswith(f"{STAGING_PREFIX}{name}-"):
                shutil.rmtree(os.path.join(output_dir, entry), ignore_errors=True)


def write_preview(path: str, rgb: np.ndarray, box: layout.GeoBox) -> None:
    """The RGB preview SeCo's downloader writes beside each acquisition folder: (B4, B3, B2)
    stretched from [0, 0.3] reflectance to [0, 255], a 3-band uint8 JPEG GeoTIFF."""
    stretched = np.clip(rgb.astype(np.float32) / 0.3, 0, 255).astype(np.uint8)
    layout.write_preview_geotiff(path, stretched, box, jpeg_quality=_JPEG_QUALITY)


def metadata(acquisition: Acquisition, cloud_percentage: float) -> dict:
    """The Earth Engine image properties of `metadata.json` that readers use: the cloud estimate
    (layout.CLOUD_PROPERTY), and the identity and time every published file has."""
    sensing = acquisition.sensing.replace(tzinfo=datetime.UTC)
    return {
        layout.CLOUD_PROPERTY: cloud_percentage,
        "system:index": acquisition.product_id,
        "system:time_start": int(sensing.timestamp() * 1000),
    }


def _write_locations(root: str, plans: list[LocationPlan], seed: int, num_workers: int) -> None:
    if num_workers == 1:
        for plan in plans:
            _write_location(root, plan, seed)
        return
    # spawn, not fork: the caller may have started JAX's threads.
    context = workers.context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        for _ in pool.map(_write_location, [root] * len(plans), plans, [seed] * len(plans)):
            pass


def _write_location(root: str, plan: LocationPlan, seed: int) -> None:
    """Renders and writes one location folder."""
    import rasterio
    import threadpoolctl

    box = layout.GeoBox.around(plan.lat, plan.lon)
    location_dir = os.path.join(root, plan.location_id)
    os.makedirs(location_dir)
    # The matrix products are small: BLAS threads only contend (10x slower on a busy machine).
    # One GDAL environment for all files saves setting one up per file.
    with threadpoolctl.threadpool_limits(1), rasterio.Env():
        for rendered in render_location(plan, seed):
            folder = os.path.join(location_dir, rendered.acquisition.product_id)
            os.makedirs(folder)
            for band, pixels in rendered.bands.items():
                path = os.path.join(folder, layout.band_file(band))
                layout.write_band_geotiff(path, pixels, box, jpeg_quality=_JPEG_QUALITY)
            with open(os.path.join(folder, layout.METADATA_FILE), "w") as f:
                json.dump(metadata(rendered.acquisition, rendered.cloud_percentage), f)
            rgb = np.stack([rendered.bands[b] for b in layout.RGB_BANDS])
            write_preview(folder + ".tif", rgb, box)


def _write_stray_files(root: str) -> None:
    """The macOS droppings that real hand-made archives contain."""
    for name, content in _STRAY_FILES.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(content)
    first_location = os.path.join(root, "000000")
    if os.path.isdir(first_location):
        with open(os.path.join(first_location, ".DS_Store"), "wb") as f:
            f.write(_STRAY_FILES[".DS_Store"])


def _write_tar_gz(folder: str, destination: str) -> None:
    """Tars `folder` as its own top-level entry, reproducibly: sorted members, fixed mtimes and
    owners, and a gzip header without a name or time."""
    top = os.path.basename(folder)
    with (
        open(destination, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as zipped,
        tarfile.open(fileobj=zipped, mode="w", format=tarfile.GNU_FORMAT) as tar,
    ):
        for path, arcname in _walk_sorted(folder, top):
            info = tar.gettarinfo(path, arcname)
            info.mtime = _TAR_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o755 if info.isdir() else 0o644
            if info.isdir():
                tar.addfile(info)
            else:
                with open(path, "rb") as f:
                    tar.addfile(info, f)


def _walk_sorted(path: str, arcname: str):
    yield path, arcname
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            yield from _walk_sorted(os.path.join(path, name), f"{arcname}/{name}")


def _split(path: str, names: list[str]) -> None:
    """Cuts a file byte-wise into len(names) nearly equal parts beside it."""
    chunk = -(-os.path.getsize(path) // len(names))
    with open(path, "rb") as source:
        for name in names:
            output = os.path.join(os.path.dirname(path), name)
            with open(output, "wb") as f:
                remaining = chunk
                while remaining > 0 and (block := source.read(min(remaining, 1 << 22))):
                    f.write(block)
                    remaining -= len(block)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)
