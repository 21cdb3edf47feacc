"""Sentinel-2 scenes as GeoTIFF or JPEG 2000 files, cut into tiles on the archive's uint8 scale.

A source is a file or a folder (searched recursively). A folder whose files are named by band
(``B04.tif``, ``T33TVF_20230612T100031_B04_10m.jp2``, ``B4.tif``, ...) is one scene of single-band
files; so is an L2A product's ``IMG_DATA`` folder, whose ``R10m``, ``R20m`` and ``R60m`` folders
give each band at its finest resolution (in a ``.SAFE`` product, the mask and preview folders are
passed over). Other GeoTIFFs are multi-band images whose bands are
named by their descriptions, by ``bands``, or else taken in the encoder's order. In a folder of
band files, other rasters (an L2A folder's TCI, SCL, AOT, WVP) are ignored, with a note.

An image is read on one grid: its finest band's, or one given (the first date's, for a change
map). Bands on that grid are read with a bilinear resample (a 20 m band's window into the 10 m
tile's shape); bands on another grid are warped onto it. Images are cut into square ``tile`` px
tiles at ``stride`` (the last row and column of tiles end at the image's edge, so every pixel is
covered); an image narrower than that gives tiles of its narrower side.

Raw values are brought to the archive's uint8 scale by `sentinel2.to_archive_uint8` (``scale``:
uint8 as they are, digital numbers less ``dn_offset``, or reflectance), which refuses values that
cannot be on that scale. ``dn_offset`` `AUTO_OFFSET` takes the offset from the product's metadata
(`sentinel2.product_offset`). Pixels without data (the file's nodata value; digital number 0, the
Sentinel-2 no-data value; where a warped band does not reach) are counted per tile
(`Tile.nodata`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np

from caco_jax.data import sentinel2
from caco_jax.data.normalization import Normalization
from caco_jax.runtime import errors

GEOTIFF_SUFFIXES = (".tif", ".tiff", ".jp2")
SCALES = sentinel2.SCALES
AUTO_OFFSET = -1.0  # dn_offset: from the product's metadata where found, else 0
# A band warped onto an image's grid must cover this much of it (else it shows another place).
MIN_COVERAGE = 0.5
# An L2A product's IMG_DATA folders, finest first.
L2A_RESOLUTION_FOLDERS = ("R10m", "R20m", "R60m")
# Folders of a Sentinel-2 product (.SAFE) that hold masks, previews and auxiliary rasters.
PRODUCT_FOLDERS_SKIPPED = ("QI_DATA", "AUX_DATA", "DATASTRIP", "HTML", "rep_info")
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
    row: int = -1  # GeoTIFF tiles: the first pixel's row and column on the image's grid
    col: int = -1
    nodata: float = 0.0  # the fraction of pixels without data in some band
    footprint: tuple | None = None  # GeoTIFF tiles: closed ring of (lon, lat) corners


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
    that order; a multi-band file appears once per band with its 1-based band index), its name
    relative to the source (the tiles' ids start with it) and the digital-number offset its
    product's metadata records (None: no metadata found)."""

    name: str
    files: tuple[tuple[str, int], ...]
    dn_offset: float | None = None


@dataclasses.dataclass(frozen=True)
class Grid:
    """The pixel grid tiles are cut on: a CRS, an affine transform and a size."""

    crs: object  # rasterio.crs.CRS
    transform: object  # affine.Affine
    width: int
    height: int

    @classmethod
    def of(cls, dataset) -> Grid:
        return cls(dataset.crs, dataset.transform, dataset.width, dataset.height)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        from rasterio.transform import array_bounds

        return array_bounds(self.height, self.width, self.transform)  # west, south, east, north

    @property
    def res(self) -> tuple[float, float]:
        return abs(self.transform.a), abs(self.transform.e)


def find_images(
    source: str, normalization: Normalization, bands: Sequence[str] = ()
) -> list[Image]:
    """The images under ``source`` (a GeoTIFF file or a folder), their bands matched to the
    encoder's input; raises InputError naming the file or folder that does not fit."""
    source = os.fspath(source)
    if os.path.isfile(source):
        return [_multiband_image(source, os.path.basename(source), normalization, bands)]
    if not os.path.isdir(source):
        raise InputError(f"{source}: no such GeoTIFF file or folder")

    def relative(path):
        name = os.path.relpath(path, source)
        return os.path.basename(os.path.abspath(source)) if name == "." else name

    images = []
    for folder, subfolders, files in os.walk(source):
        subfolders.sort()
        if ".SAFE" in os.path.abspath(folder):  # a product: its band images only
            subfolders[:] = [f for f in subfolders if f not in PRODUCT_FOLDERS_SKIPPED]
        by_band: dict[str, list[str]] = {}
        others = []
        levels = [f for f in L2A_RESOLUTION_FOLDERS if f in subfolders]
        if levels:  # an L2A IMG_DATA folder: each band from its finest resolution folder
            subfolders[:] = [f for f in subfolders if f not in levels]
            for level in levels:
                for name in sorted(os.listdir(os.path.join(folder, level))):
                    band = band_name(name)
                    if name.lower().endswith(GEOTIFF_SUFFIXES) and band is not None:
                        by_band.setdefault(band, [os.path.join(folder, level, name)])
        rasters = sorted(f for f in files if f.lower().endswith(GEOTIFF_SUFFIXES))
        for name in rasters:
            band = band_name(name)
            if band is None:
                others.append(name)
            else:
                by_band.setdefault(band, []).append(os.path.join(folder, name))
        if by_band:
            images.append(_band_files_image(folder, relative(folder), by_band, normalization))
            if others:  # e.g. an L2A folder's TCI, SCL, AOT, WVP rasters
                print(f"embed: {folder}: not a band, ignored: {', '.join(others)}", flush=True)
        else:
            images += [
                _multiband_image(
                    os.path.join(folder, name),
                    relative(os.path.join(folder, name)),
                    normalization,
                    bands,
                )
                for name in rasters
            ]
    if not images:
        raise InputError(f"{source}: no GeoTIFF ({', '.join(GEOTIFF_SUFFIXES)}) found")
    return images


def _band_files_image(folder: str, name: str, by_band: dict, normalization) -> Image:
    duplicated = {b: f for b, f in by_band.items() if len(f) > 1}
    if duplicated:
        raise InputError(f"{folder}: several files for one band: {duplicated}")
    missing = [b for b in normalization.bands if b not in by_band]
    if missing:
        raise InputError(
            f"{folder}: no file for band(s) {', '.join(missing)} (the encoder takes "
            f"{', '.join(normalization.bands)}; found {', '.join(sorted(by_band))})"
        )
    return Image(
        name,
        tuple((by_band[b][0], 1) for b in normalization.bands),
        sentinel2.product_offset(folder),
    )


def _multiband_image(path: str, name: str, normalization, bands: Sequence[str]) -> Image:
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
    return Image(
        name,
        tuple((path, names.index(b) + 1) for b in normalization.bands),
        sentinel2.product_offset(os.path.dirname(path)),
    )


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis: every ``stride`` px, plus one ending at the edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    return starts if starts[-1] == length - tile else [*starts, length - tile]


def image_grid(image: Image) -> Grid:
    """The grid of ``image``'s finest band (the first of equals), which `read_tiles` uses."""
    import rasterio

    grids = []
    for path, _ in image.files:
        with rasterio.open(path) as dataset:
            _check_georeferenced(path, dataset)
            grids.append((min(dataset.res), Grid.of(dataset)))
    return min(grids, key=lambda item: item[0])[1]


def _check_georeferenced(path, dataset) -> None:
    if dataset.crs is None:
        raise InputError(f"{path}: no CRS (expected a georeferenced GeoTIFF)")


_NOTED: set[str] = set()  # images already named in a note on their offset


def resolve_offset(image: Image, dn_offset: float) -> float:
    """``dn_offset``, or for `AUTO_OFFSET` the one ``image``'s product metadata records (0, with
    a note once per image, when there is none)."""
    if dn_offset != AUTO_OFFSET:
        return dn_offset
    if image.dn_offset is None:
        if image.name in _NOTED:
            return 0.0
        _NOTED.add(image.name)
        print(
            f"{image.name}: no product metadata (MTD_MSIL1C.xml / MTD_MSIL2A.xml) above "
            "it; digital numbers taken without offset (set dn_offset=1000 for products of "
            "processing baseline 04.00 and later)",
            flush=True,
        )
        return 0.0
    return image.dn_offset


def read_tiles(
    image: Image,
    *,
    tile: int,
    stride: int = 0,
    scale: str = "auto",
    dn_offset: float = 0.0,
    grid: Grid | None = None,
    origins: Sequence[tuple[int, int]] | None = None,
) -> Iterator[Tile]:
    """The tiles of ``image`` on ``grid`` (default: `image_grid`), as archive-scale raw values:
    those starting at ``origins`` ((row, col) pairs; default: all, `tile_grid`).

    Bands on the grid (the same CRS and footprint, to within half a pixel) are read at its size
    with a bilinear resample. Bands on another grid (shifted bounds, as real Sentinel-2 10, 20 and
    60 m bands have, or another CRS) are warped onto it by GDAL's bilinear warp
    (`rasterio.vrt.WarpedVRT`); where such a band does not cover the grid its pixels are 0, nodata.
    """
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import Window

    grid = grid or image_grid(image)
    datasets = [rasterio.open(path) for path, _ in image.files]
    opened, warped = list(datasets), set()
    # What a message about a band's values names: the file, and the band of a multi-band file.
    names = [
        path if d.count == 1 else f"{path} ({(d.descriptions or ())[band - 1] or f'band {band}'})"
        for (path, band), d in zip(image.files, datasets, strict=True)
    ]
    try:
        for index, dataset in enumerate(datasets):
            path = image.files[index][0]
            _check_georeferenced(path, dataset)
            if on_grid(dataset, grid):
                continue
            covered = coverage(dataset, grid)
            if covered < MIN_COVERAGE:
                raise InputError(
                    f"{path}: covers {covered:.0%} of the grid it is read on ({grid.crs}, bounds "
                    f"{tuple(round(b, 1) for b in grid.bounds)}): it must show the same place"
                )
            # Real 10, 20 and 60 m bands do not share exact bounds: warp onto the grid.
            datasets[index] = WarpedVRT(
                dataset,
                crs=grid.crs,
                transform=grid.transform,
                width=grid.width,
                height=grid.height,
                resampling=Resampling.bilinear,
                add_alpha=True,  # its mask then marks where the band does not reach
            )
            opened.append(datasets[index])
            warped.add(index)
        size = min(tile, grid.height, grid.width)
        origins = tile_grid(grid, tile, stride) if origins is None else list(origins)
        places = _places(grid, origins, size)
        # A strip of tiles at a time: one read per band and tile row (GDAL calls, not pixels,
        # dominate per-tile reads), cut into the row's tiles.
        for row, cols in _rows(origins):
            left, right = min(cols), max(cols) + size
            channels, missing = [], np.zeros((size, right - left), bool)
            for index, ((_, band), dataset) in enumerate(zip(image.files, datasets, strict=True)):
                fx, fy = dataset.width / grid.width, dataset.height / grid.height
                window = Window(left * fx, row * fy, (right - left) * fx, size * fy)
                shape = (size, right - left)
                values = dataset.read(
                    band, window=window, out_shape=shape, resampling=Resampling.bilinear
                )
                on_scale = sentinel2.scale_of(values, scale)
                absent = no_data(values, dataset.nodata, on_scale)
                if index in warped:
                    absent |= dataset.read_masks(band, window=window, out_shape=shape) == 0
                if absent.any():  # no data is not a value: -9999 or NaN must not be refused
                    values = np.where(absent, np.zeros((), values.dtype), values)
                missing |= absent
                offset = resolve_offset(image, dn_offset) if on_scale == "dn" else 0.0
                channels.append(
                    sentinel2.to_archive_uint8(values, on_scale, offset=offset, name=names[index])
                )
            strip = np.stack(channels, axis=-1)
            for col in cols:
                lat, lon, footprint = places[row, col]
                yield Tile(
                    id=f"{image.name}:{row}:{col}",
                    pixels=strip[:, col - left : col - left + size],
                    lat=lat,
                    lon=lon,
                    row=row,
                    col=col,
                    nodata=float(missing[:, col - left : col - left + size].mean()),
                    footprint=footprint,
                )
    finally:
        for dataset in reversed(opened):
            dataset.close()


def no_data(values: np.ndarray, nodata, scale: str) -> np.ndarray:
    """Where ``values`` hold no data: the file's nodata value (NaN included), or 0 for Sentinel-2
    digital numbers (their no-data value, which is also what a warp leaves where a band does not
    reach)."""
    missing = np.zeros(values.shape, bool)
    if nodata is not None:
        missing |= np.isnan(values) if np.isnan(nodata) else values == nodata
    if scale == "dn":
        missing |= values == 0
    return missing


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


def _to_lon_lat(grid, xs, ys) -> tuple[list[float], list[float]]:
    if grid.crs.is_geographic:
        return list(xs), list(ys)
    from rasterio.warp import transform

    return transform(grid.crs, "EPSG:4326", list(xs), list(ys))


def _rows(origins) -> list[tuple[int, list[int]]]:
    """``origins`` grouped by row, in their order: [(row, [col, ...]), ...]."""
    rows: dict[int, list[int]] = {}
    for row, col in origins:
        rows.setdefault(row, []).append(col)
    return list(rows.items())


def _places(grid, origins, size: int) -> dict:
    """{(row, col): (lat, lon of the tile's centre, its footprint)}: the tiles' corners in
    longitude and latitude, a closed ring counter-clockwise on the map, all reprojected at once."""
    if not origins:
        return {}
    offsets = [(0.5, 0.5), (0, 1), (1, 1), (1, 0), (0, 0)]  # centre, then the corners
    points = [
        grid.transform @ (col + dx * size, row + dy * size)
        for row, col in origins
        for dx, dy in offsets
    ]
    lons, lats = _to_lon_lat(grid, *zip(*points, strict=True))
    places = {}
    for i, origin in enumerate(origins):
        at = slice(5 * i, 5 * i + 5)
        ring = tuple(zip(lons[at][1:], lats[at][1:], strict=True))
        places[tuple(origin)] = (float(lats[at][0]), float(lons[at][0]), (*ring, ring[0]))
    return places


def geotiff_tiles(
    source: str,
    normalization: Normalization,
    *,
    tile: int,
    stride: int = 0,
    bands: Sequence[str] = (),
    scale: str = "auto",
    dn_offset: float = 0.0,
    share: tuple[int, int] = (0, 1),
) -> tuple[Iterator[Tile], int]:
    """The tiles of every image under ``source`` and how many there are; with ``share`` (index,
    count), only those of every count-th row of tiles from the index-th, counting the rows of all
    images in turn (one process's share of a run: rows, as `read_tiles` reads a row at once)."""
    images = find_images(source, normalization, bands)
    chosen, first_row = [], 0
    for image in images:
        grid = image_grid(image)  # once per image: read_tiles reads on it
        mine, rows = share_rows(tile_grid(grid, tile, stride), share, first_row)
        chosen.append((grid, mine))
        first_row += rows
    tiles = (
        t
        for image, (grid, origins) in zip(images, chosen, strict=True)
        for t in read_tiles(
            image, tile=tile, scale=scale, dn_offset=dn_offset, grid=grid, origins=origins
        )
    )
    return tiles, sum(len(origins) for _, origins in chosen)


def share_rows(origins, share: tuple[int, int], first_row: int = 0):
    """(the ``origins`` in every ``share[1]``-th row of tiles from the ``share[0]``-th, the
    number of rows), the rows numbered from ``first_row``."""
    index, count = share
    rows = _rows(origins)
    mine = [
        (row, col)
        for number, (row, cols) in enumerate(rows, first_row)
        if number % count == index
        for col in cols
    ]
    return mine, len(rows)


def tile_grid(grid: Grid, tile: int, stride: int = 0) -> list[tuple[int, int]]:
    """The (row, col) origins of the tiles `read_tiles` cuts from ``grid``, row by row."""
    size = min(tile, grid.height, grid.width)
    stride = stride or size
    rows, cols = tile_origins(grid.height, size, stride), tile_origins(grid.width, size, stride)
    return [(row, col) for row in rows for col in cols]
