"""Where a location's pixels come from: one 2.64 km square on the Sentinel-2 pixel grid.

A location uses the UTM zone of its centre for every acquisition and every band, so all its images
are pixel-aligned across time. The square's top-left corner is snapped to a multiple of 60 m, as
Sentinel-2 tile origins are, so that the 10, 20 and 60 m grids (264, 132 and 44 px) coincide with
the native pixels of scenes in that zone and nothing is resampled. The GeoTIFFs record the square's
lat/lon bounding box, as the published archives do (geographic CRS with an affine transform).
"""

from __future__ import annotations

import numpy as np

from caco_jax.data import layout
from caco_jax.sources.download.client import PixelGrid

GRID_ALIGNMENT_M = 60


def utm_crs(lat: float, lon: float) -> str:
    """The standard UTM zone of a point as an EPSG code (WGS 84 / UTM north 326xx, south 327xx)."""
    zone = int(np.floor((lon + 180.0) / 6.0)) % 60 + 1
    return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"


def patch_grids(lat: float, lon: float) -> dict[int, PixelGrid]:
    """The location's grid at each band resolution (10, 20, 60 m), all covering the same square."""
    from rasterio.warp import transform

    crs = utm_crs(lat, lon)
    (x,), (y,) = transform("EPSG:4326", crs, [lon], [lat])
    half = layout.PATCH_SIZE_M / 2
    west = round((x - half) / GRID_ALIGNMENT_M) * GRID_ALIGNMENT_M
    north = round((y + half) / GRID_ALIGNMENT_M) * GRID_ALIGNMENT_M
    return {
        res: PixelGrid(crs, float(west), float(north), res, size)
        for res, size in layout.PIXELS_AT_RESOLUTION.items()
    }


def geobox(grid: PixelGrid, lon_hint: float) -> layout.GeoBox:
    """The lat/lon bounding box of the grid's square. Longitudes are unwrapped next to `lon_hint`,
    so a square across the antimeridian gets west < east (one edge slightly beyond +-180)."""
    from rasterio.warp import transform

    west, south, east, north = grid.bounds
    lons, lats = transform(
        grid.crs, "EPSG:4326", [west, east, east, west], [north, north, south, south]
    )
    lons = lon_hint + (np.asarray(lons) - lon_hint + 180.0) % 360.0 - 180.0
    return layout.GeoBox(float(min(lons)), float(min(lats)), float(max(lons)), float(max(lats)))
