"""Sentinel-2 scenes as GeoTIFF or JPEG 2000 files, cut into tiles on the archive's uint8 scale.

A source is a file or a folder (searched recursively). A folder whose files are named by band
(``B04.tif``, ``T33TVF_20230612T100031_B04_10m.jp2``, ``B4.tif``, ...) is one scene of single-band
files, resampled bilinearly to the grid of the finest band; other GeoTIFFs are multi-band images
whose bands are named by their descriptions, by ``bands``, or else taken in the encoder's order.
In a folder of band files, other rasters (an L2A folder's TCI, SCL, AOT, WVP) are ignored, with a
note. Images are cut into square ``tile`` px tiles at ``stride`` (the last row and column of tiles
end at the image's edge, so every pixel is covered); an image narrower than that gives tiles of
its narrower side.

Raw values are brought to the archive's uint8 scale by `sentinel2.to_archive_uint8` (``scale``:
uint8 as they are, digital numbers less ``dn_offset``, 1000 for processing baseline 04.00 and
later, or reflectance), which refuses values that cannot be on that scale.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np

from caco_jax.data import sentinel2
from caco_jax.data.normalization import Normalization

GEOTIFF_SUFFIXES = (".tif", ".tiff", ".jp2")
SCALES = sentinel2.SCALES
# A band warped onto an image's grid must cover this much of it (else it shows another place).
MIN_COVERAGE = 0.5
# A band token in a file name: B04, B4, B8A, delimited by _ . - or the ends of the name.
_BAND_TOKEN = re.compile(r"(?:^|[_.-])B(0?[1-9]|1[0-2]|8A)(?=[_.-]|$)")


class InputError(ValueError):
    """An input that cannot be embedded with this encoder; the message names the file."""


@dataclasses.dataclass
class Tile:
    id: str
    pixels: np.ndarray  # [h, w, C] raw values on the archive's uint8 scale, export band order
    lat: float
    lon: float
    window: int = -1  # the CACo window of archive / records acquisitions; -1 for GeoTIFFs


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
    """The tiles of ``image`` on the grid of its finest band, as archive-scale raw values.

    Bands on that grid (the same CRS and footprint, to within half a pixel) are read at its size
    with a bilinear resample (a 20 m band's window is read into the 10 m tile's shape). Bands on
    another grid (shifted bounds, as real Sentinel-2 10, 20 and 60 m bands have, or another CRS)
    are warped onto it by GDAL's bilinear warp (`rasterio.vrt.WarpedVRT`); where such a band does
    not cover the grid its pixels are 0, nodata.
    """
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import Window

    datasets = [rasterio.open(path) for path, _ in image.files]
    opened = list(datasets)
    try:
        for (path, _), dataset in zip(image.files, datasets, strict=True):
            if dataset.crs is None:
                raise InputError(f"{path}: no CRS (expected a georeferenced GeoTIFF)")
        reference = min(range(len(datasets)), key=lambda i: min(datasets[i].res))
        grid = datasets[reference]
        for index, dataset in enumerate(datasets):
            # A band on another grid (another footprint, or another CRS) is warped onto the
            # finest band's: real 10, 20 and 60 m bands do not share exact bounds.
            if not on_grid(dataset, grid):
                covered = coverage(dataset, grid)
                if covered < MIN_COVERAGE:
                    raise InputError(
                        f"{image.files[index][0]}: covers {covered:.0%} of the footprint of "
                        f"{image.files[reference][0]} ({dataset.crs} against {grid.crs}): the "
                        "bands of an image must show one place"
                    )
                datasets[index] = WarpedVRT(
                    dataset,
                    crs=grid.crs,
                    transform=grid.transform,
                    width=grid.width,
                    height=grid.height,
                    resampling=Resampling.bilinear,
                )
                opened.append(datasets[index])
        height, width = grid.height, grid.width
        size = min(tile, height, width)
        stride = stride or size
        h = w = size
        for row in tile_origins(height, size, stride):
            for col in tile_origins(width, size, stride):
                channels = []
                for (path, band), dataset in zip(image.files, datasets, strict=True):
                    fx, fy = dataset.width / width, dataset.height / height
                    window = Window(col * fx, row * fy, w * fx, h * fy)
                    values = dataset.read(
                        band, window=window, out_shape=(h, w), resampling=Resampling.bilinear
                    )
                    channels.append(
                        sentinel2.to_archive_uint8(values, scale, offset=dn_offset, name=path)
                    )
                lat, lon = _lat_lon(grid, row + h / 2.0, col + w / 2.0)
                yield Tile(
                    id=f"{image.name}:{row}:{col}",
                    pixels=np.stack(channels, axis=-1),
                    lat=lat,
                    lon=lon,
                )
    finally:
        for dataset in reversed(opened):
            dataset.close()


def coverage(dataset, grid) -> float:
    """The fraction of ``grid``'s footprint that ``dataset``'s covers (in ``grid``'s CRS)."""
    from rasterio.warp import transform_bounds

    left, bottom, right, top = transform_bounds(dataset.crs, grid.crs, *dataset.bounds)
    g_left, g_bottom, g_right, g_top = grid.bounds
    width = max(0.0, min(right, g_right) - max(left, g_left))
    height = max(0.0, min(top, g_top) - max(bottom, g_bottom))
    return width * height / ((g_right - g_left) * (g_top - g_bottom))


def on_grid(dataset, grid) -> bool:
    """Whether ``dataset`` covers ``grid``'s footprint in its CRS, to within half a pixel of the
    grid (its pixels then line up with the grid's up to their size)."""
    return dataset.crs == grid.crs and np.allclose(
        dataset.bounds, grid.bounds, rtol=0, atol=0.5 * min(grid.res)
    )


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

    grids = []
    for path, _ in image.files:
        with rasterio.open(path) as dataset:
            grids.append((min(dataset.res), dataset.width, dataset.height))
    _, width, height = min(grids)  # the finest band's grid, as `read_tiles`
    size = min(tile, height, width)
    stride = stride or size
    return len(tile_origins(height, size, stride)) * len(tile_origins(width, size, stride))
