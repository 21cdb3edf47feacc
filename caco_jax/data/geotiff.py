"""Sentinel-2 scenes as GeoTIFF or JPEG 2000 files, cut into tiles on the archive's uint8 scale.

A source is a file or a folder (searched recursively). A folder whose files are named by band
(``B04.tif``, ``T33TVF_20230612T100031_B04_10m.jp2``, ``B4.tif``, ...) is one scene of single-band
files, resampled bilinearly to the grid of the finest band; other GeoTIFFs are multi-band images
whose bands are named by their descriptions, by ``bands``, or else taken in the encoder's order.
In a folder of band files, other rasters (an L2A folder's TCI, SCL, AOT, WVP) are ignored, with a
note. Images are cut into square ``tile`` px tiles at ``stride`` (the last row and column of tiles
end at the image's edge, so every pixel is covered); an image narrower than that gives tiles of
its narrower side.

uint8 values are used as they are; uint16 values are Sentinel-2 L1C / L2A digital numbers
(reflectance x 10000, less ``dn_offset``: 1000 for processing baseline 04.00 and later), mapped to
the archive's uint8 scale (`layout.to_archive_uint8`).

Values are checked, never silently mapped: a pixel marked nodata (the file's nodata value or mask)
is no data, a tile of nodata only is skipped and counted, and a tile with some carries the share
in `Tile.nodata_fraction`; a NaN among the data, or a value outside the stated scale's range (a
uint16 value above 255 with ``scale="uint8"`` would wrap), is an InputError naming the file and
band (`check_values`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np

from caco_jax.data import layout
from caco_jax.data.normalization import Normalization
from caco_jax.runtime import errors

GEOTIFF_SUFFIXES = (".tif", ".tiff", ".jp2")
SCALES = ("auto", "uint8", "reflectance_10000")
# A band token in a file name: B04, B4, B8A, delimited by _ . - or the ends of the name.
_BAND_TOKEN = re.compile(r"(?:^|[_.-])B(0?[1-9]|1[0-2]|8A)(?=[_.-]|$)")


class InputError(errors.UserError, ValueError):
    """An input that cannot be embedded with this encoder; the message names the file."""


@dataclasses.dataclass
class Tile:
    id: str
    pixels: np.ndarray  # [h, w, C] raw values on the archive's uint8 scale, export band order
    lat: float
    lon: float
    window: int = -1  # the CACo window of archive / records acquisitions; -1 for GeoTIFFs
    nodata_fraction: float = 0.0  # the share of its pixels that a band marks as nodata


def band_name(file_name: str) -> str | None:
    """The Sentinel-2 band a file name names (``T33TVF_..._B04_10m.jp2`` -> ``B4``), or None."""
    stem = os.path.basename(file_name)
    for suffix in GEOTIFF_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    matches = {m.group(1).lstrip("0") for m in _BAND_TOKEN.finditer(stem)}
    return f"B{matches.pop()}" if len(matches) == 1 else None


@dataclasses.dataclass(frozen=True)
class Image:
    """One georeferenced image to tile: its band files (one per band of the encoder's input, in
    that order; a multi-band file appears once per band with its 1-based band index)."""

    name: str
    files: tuple[tuple[str, int], ...]


def find_images(
    source: str, normalization: Normalization, bands: Sequence[str] = ()
) -> list[Image]:
    """The images under ``source`` (a GeoTIFF file or a folder), their bands matched to the
    encoder's input; raises InputError naming the file or folder that does not fit."""
    if os.path.isfile(source):
        return [_multiband_image(source, normalization, bands)]
    if not os.path.isdir(source):
        raise InputError(f"{source}: no such GeoTIFF file or folder")
    images = []
    for folder, subfolders, files in os.walk(source):
        subfolders.sort()
        rasters = sorted(f for f in files if f.lower().endswith(GEOTIFF_SUFFIXES))
        by_band: dict[str, list[str]] = {}
        for name in rasters:
            band = band_name(name)
            if band is not None:
                by_band.setdefault(band, []).append(os.path.join(folder, name))
        if by_band:
            images.append(_band_files_image(folder, by_band, normalization))
            others = [name for name in rasters if band_name(name) is None]
            if others:  # e.g. an L2A folder's TCI, SCL, AOT, WVP rasters
                print(f"embed: {folder}: not a band, ignored: {', '.join(others)}", flush=True)
        else:
            images += [
                _multiband_image(os.path.join(folder, name), normalization, bands)
                for name in rasters
            ]
    if not images:
        raise InputError(f"{source}: no GeoTIFF ({', '.join(GEOTIFF_SUFFIXES)}) found")
    return images


def _band_files_image(folder: str, by_band: dict, normalization: Normalization) -> Image:
    duplicated = {b: f for b, f in by_band.items() if len(f) > 1}
    if duplicated:
        raise InputError(f"{folder}: several files for one band: {duplicated}")
    missing = [b for b in normalization.bands if b not in by_band]
    if missing:
        raise InputError(
            f"{folder}: no file for band(s) {', '.join(missing)} (the encoder takes "
            f"{', '.join(normalization.bands)}; found {', '.join(sorted(by_band))})"
        )
    return Image(folder, tuple((by_band[b][0], 1) for b in normalization.bands))


def _multiband_image(path: str, normalization: Normalization, bands: Sequence[str]) -> Image:
    import rasterio

    with rasterio.open(path) as dataset:
        count, descriptions = dataset.count, dataset.descriptions
    if count != normalization.num_bands:
        raise InputError(
            f"{path}: {count} band(s), but the encoder takes {normalization.num_bands} "
            f"({', '.join(normalization.bands)})"
        )
    names = list(bands) or [d for d in descriptions if d]
    if not names:
        names = list(normalization.bands)  # unnamed bands: assumed in the encoder's order
    names = [band_name(n) or n for n in names]
    if len(names) != count or set(names) != set(normalization.bands):
        raise InputError(
            f"{path}: bands named {names}, expected {count} named {list(normalization.bands)} "
            "(set embed.bands to the file's band order)"
        )
    return Image(path, tuple((path, names.index(b) + 1) for b in normalization.bands))


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis: every ``stride`` px, plus one ending at the edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    return starts if starts[-1] == length - tile else [*starts, length - tile]


def read_tiles(
    image: Image,
    *,
    tile: int,
    stride: int = 0,
    scale: str = "auto",
    dn_offset: float = 0.0,
) -> Iterator[Tile]:
    """The tiles of ``image`` on the grid of its finest band, as archive-scale raw values."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    datasets = [rasterio.open(path) for path, _ in image.files]
    try:
        reference = max(range(len(datasets)), key=lambda i: datasets[i].width)
        grid = datasets[reference]
        for (path, _), dataset in zip(image.files, datasets, strict=True):
            if dataset.crs is None:
                raise InputError(f"{path}: no CRS (expected a georeferenced GeoTIFF)")
            if dataset.crs != grid.crs:
                raise InputError(
                    f"{path}: CRS {dataset.crs} differs from {grid.crs} of "
                    f"{image.files[reference][0]} (the bands of an image must share one grid)"
                )
            # Same footprint to within half a pixel of the finest band.
            if not np.allclose(dataset.bounds, grid.bounds, rtol=0, atol=0.5 * min(grid.res)):
                raise InputError(
                    f"{path}: bounds {tuple(dataset.bounds)} differ from {tuple(grid.bounds)} of "
                    f"{image.files[reference][0]}"
                )
        height, width = grid.height, grid.width
        size = min(tile, height, width)
        stride = stride or size
        h = w = size
        empty = 0
        for row in tile_origins(height, size, stride):
            for col in tile_origins(width, size, stride):
                channels, valid = [], np.ones((h, w), bool)
                for (path, band), dataset in zip(image.files, datasets, strict=True):
                    fx, fy = dataset.width / width, dataset.height / height
                    window = Window(col * fx, row * fy, w * fx, h * fy)
                    values = dataset.read(
                        band, window=window, out_shape=(h, w), resampling=Resampling.bilinear
                    )
                    data = valid_pixels(dataset, band, window, (h, w))
                    check_values(
                        values, data, f"{path} ({_band_label(dataset, path, band)})", scale
                    )
                    valid &= data
                    channels.append(_archive_scale(values, path, scale, dn_offset))
                if not valid.any():
                    empty += 1
                    continue
                lat, lon = _lat_lon(grid, row + h / 2.0, col + w / 2.0)
                yield Tile(
                    id=f"{image.name}:{row}:{col}",
                    pixels=np.stack(channels, axis=-1),
                    lat=lat,
                    lon=lon,
                    nodata_fraction=float(1.0 - valid.mean()),
                )
        if empty:
            print(f"embed: {image.name}: skipped {empty} tile(s) of nodata only", flush=True)
    finally:
        for dataset in datasets:
            dataset.close()


# The raw values each scale maps (`layout.to_archive_uint8` clips digital numbers above 10000).
SCALE_RANGES = {"uint8": (0, 255), "reflectance_10000": (0, 65535)}


def valid_pixels(dataset, band: int, window, shape) -> np.ndarray:
    """bool [h, w]: the pixels of ``window`` that band ``band`` does not mark as nodata (its
    nodata value, a mask band or an alpha band: GDAL's mask), at the tile's grid."""
    from rasterio.enums import Resampling

    mask = dataset.read_masks(band, window=window, out_shape=shape, resampling=Resampling.nearest)
    return mask > 0


def check_values(values: np.ndarray, valid: np.ndarray, where: str, scale: str) -> None:
    """Raises InputError naming ``where`` (a file and band) when its data (``valid`` pixels)
    hold NaN or values outside the range of ``scale`` ("auto": that of the values' type)."""
    data = values[valid]
    if not data.size:
        return
    if np.issubdtype(data.dtype, np.floating) and np.isnan(data).any():
        raise InputError(
            f"{where}: {int(np.isnan(data).sum())} NaN value(s) among the data; mark them as the "
            "file's nodata value (or mask them) to have them skipped"
        )
    if scale == "auto":
        scale = {np.dtype(np.uint8): "uint8", np.dtype(np.uint16): "reflectance_10000"}.get(
            data.dtype, scale
        )
    if scale not in SCALE_RANGES:
        return  # a type without a scale: `_archive_scale` names it
    low, high = SCALE_RANGES[scale]
    smallest, largest = data.min(), data.max()
    if smallest < low or largest > high:
        raise InputError(
            f"{where}: values from {smallest:g} to {largest:g}, outside the {low}-{high} of "
            f"embed.scale={scale!r} (they would wrap or clip); set embed.scale to the values' "
            "scale, or mark invalid values as the file's nodata value"
        )


def _band_label(dataset, path: str, band: int) -> str:
    """A band's name for messages: its description, the band its file name names, or its index."""
    description = dataset.descriptions[band - 1] if dataset.descriptions else None
    return description or band_name(path) or f"band {band}"


def _archive_scale(values: np.ndarray, path: str, scale: str, dn_offset: float) -> np.ndarray:
    if scale == "auto":
        if values.dtype == np.uint8:
            scale = "uint8"
        elif values.dtype == np.uint16:
            scale = "reflectance_10000"
        else:
            raise InputError(
                f"{path}: {values.dtype} values; expected uint8 (the archive's scale) or uint16 "
                "(Sentinel-2 digital numbers), or set embed.scale"
            )
    if scale == "uint8":
        return values.astype(np.uint8)
    return layout.to_archive_uint8(values, offset=dn_offset)


def _lat_lon(dataset, row: float, col: float) -> tuple[float, float]:
    x, y = dataset.transform @ (col, row)
    if not dataset.crs.is_geographic:
        from rasterio.warp import transform

        xs, ys = transform(dataset.crs, "EPSG:4326", [x], [y])
        x, y = xs[0], ys[0]
    return float(y), float(x)


def geotiff_tiles(
    source: str,
    normalization: Normalization,
    *,
    tile: int,
    stride: int = 0,
    bands: Sequence[str] = (),
    scale: str = "auto",
    dn_offset: float = 0.0,
) -> tuple[Iterator[Tile], int]:
    """The tiles of every image under ``source`` and how many there are."""
    images = find_images(source, normalization, bands)
    total = sum(_tile_count(image, tile, stride) for image in images)
    tiles = (
        t
        for image in images
        for t in read_tiles(image, tile=tile, stride=stride, scale=scale, dn_offset=dn_offset)
    )
    return tiles, total


def _tile_count(image: Image, tile: int, stride: int) -> int:
    import rasterio

    shapes = []
    for path, _ in image.files:
        with rasterio.open(path) as dataset:
            shapes.append((dataset.width, dataset.height))
    width, height = max(shapes)
    size = min(tile, height, width)
    stride = stride or size
    return len(tile_origins(height, size, stride)) * len(tile_origins(width, size, stride))
