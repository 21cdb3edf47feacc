"""The offline land mask that rejects sea points (GLOBE 1 km land mask via `global-land-mask`).

The package decompresses a 21600 x 43200 boolean grid (about 0.9 GB) when first imported, so it is
imported here lazily, only when a sampler actually asks about the sea. Lakes count as land.
"""

from __future__ import annotations

import numpy as np


def is_land(lat, lon) -> np.ndarray:
    """Whether each (lat, lon) in degrees is on land; arrays of any matching shape."""
    from global_land_mask import globe

    lat = np.clip(np.asarray(lat, dtype=np.float64), -90.0, 90.0)
    lon = np.clip(np.asarray(lon, dtype=np.float64), -180.0, 180.0)
    return np.asarray(globe.is_land(lat, lon), dtype=bool)


def land_grid(resolution_deg: float = 0.5) -> np.ndarray:
    """The land mask sampled at cell centres every `resolution_deg` degrees, for plotting:
    [rows from north to south, columns from west to east]."""
    lat = np.arange(90.0 - resolution_deg / 2, -90.0, -resolution_deg)
    lon = np.arange(-180.0 + resolution_deg / 2, 180.0, resolution_deg)
    return is_land(lat[:, None], lon[None, :])
