"""Moving on the sphere by metres on the ground, and measuring how far apart two points are.

Offsets are applied with the exponential map at the centre: a (east, north) offset becomes a walk of
length hypot(east, north) along the great circle leaving in its direction. The great-circle distance
from the centre is then exactly the length of the offset, at every latitude, across the antimeridian
and at the poles, which flat "metres to degrees" conversions do not achieve.
"""

from __future__ import annotations

import numpy as np

EARTH_RADIUS_M = 6_371_008.8  # IUGG mean radius


def wrap_longitude(lon):
    """Longitude folded into [-180, 180)."""
    return (np.asarray(lon, dtype=np.float64) + 180.0) % 360.0 - 180.0


def destination(lat, lon, east_m, north_m):
    """The points reached from (lat, lon) by walking (east_m, north_m) metres; degrees in, out."""
    lat1, lon1 = np.radians(lat), np.radians(lon)
    east_m, north_m = np.asarray(east_m, np.float64), np.asarray(north_m, np.float64)
    angle = np.hypot(east_m, north_m) / EARTH_RADIUS_M
    bearing = np.arctan2(east_m, north_m)
    sin_lat2 = np.sin(lat1) * np.cos(angle) + np.cos(lat1) * np.sin(angle) * np.cos(bearing)
    lat2 = np.arcsin(np.clip(sin_lat2, -1.0, 1.0))
    lon2 = lon1 + np.arctan2(
        np.sin(bearing) * np.sin(angle) * np.cos(lat1), np.cos(angle) - np.sin(lat1) * sin_lat2
    )
    return np.clip(np.degrees(lat2), -90.0, 90.0), wrap_longitude(np.degrees(lon2))


def distance_m(lat1, lon1, lat2, lon2):
    """Great-circle (haversine) distance in metres."""
    lat1, lon1, lat2, lon2 = (
        np.radians(np.asarray(v, np.float64)) for v in (lat1, lon1, lat2, lon2)
    )
    h = (
        np.sin((lat2 - lat1) / 2) ** 2
        + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    )
    return 2.0 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


def unit_vectors(lat, lon):
    """[N, 3] Cartesian points on the unit sphere: no seam at the antimeridian or the poles."""
    lat, lon = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)
