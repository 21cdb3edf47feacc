"""Change-aware location sampling: cities, Gaussian offsets in metres, no sea.

Each location slot picks a city uniformly among the given cities and draws an (east, north) offset
from a 2-D Gaussian with `sigma_m` metres per axis, so the distance from the city centre follows a
Rayleigh law with scale `sigma_m`. A draw that lands in the sea (or outside the region, or too close
to an accepted location) is redrawn around the same city, which keeps the choice of city uniform as
the paper says; a city that yields nothing in `max_draws_per_city` draws (a small island, a crowded
region) is replaced by another uniformly drawn city and counted. Draws are made in vectorised rounds
and accepted in slot order, so a seed fixes the whole sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from caco_jax.sources.sampling import geodesy
from caco_jax.sources.sampling.cities import Cities, in_region

CACO_SIGMA_M = 5_000.0  # the paper's sampler


@dataclasses.dataclass(frozen=True)
class Locations:
    """The sample, one row per location in location-id order, and how it was obtained."""

    lat: np.ndarray
    lon: np.ndarray
    city: np.ndarray  # index into `cities`
    cities: Cities
    counts: dict  # draws and rejections by cause

    def __len__(self) -> int:
        return len(self.lat)

    @property
    def distance_m(self) -> np.ndarray:
        """Great-circle distance of each location from its city centre."""
        return geodesy.distance_m(
            self.lat, self.lon, self.cities.lat[self.city], self.cities.lon[self.city]
        )


def sample_locations(
    num_locations: int,
    cities: Cities,
    *,
    sigma_m: float = CACO_SIGMA_M,
    seed: int = 0,
    reject_sea: bool = True,
    region: tuple[float, ...] = (),
    min_spacing_m: float = 0.0,
    max_draws_per_city: int = 100,
    is_land: Callable | None = None,
) -> Locations:
    """Draws `num_locations` points as the module docstring says.

    `region` is (west, south, east, north) in degrees (west > east crosses the antimeridian).
    `min_spacing_m` > 0 keeps every pair of locations at least that far apart (great circle); 2.64
    km * sqrt(2) = 3.74 km guarantees that no two 2.64 km patches overlap. `is_land` defaults to the
    GLOBE land mask (`landmask.is_land`). Raises RuntimeError when the constraints
    cannot be met (too small a region, too large a spacing).
    """
    if num_locations < 1 or len(cities) < 1:
        raise ValueError(f"need num_locations >= 1 and cities, got {num_locations}, {len(cities)}")
    if is_land is None and reject_sea:
        from caco_jax.sources.sampling.landmask import is_land
    rng = np.random.default_rng(seed)
    city = rng.integers(len(cities), size=num_locations)
    draws_for_city = np.zeros(num_locations, dtype=np.int64)
    lat = np.full(num_locations, np.nan)
    lon = np.full(num_locations, np.nan)
    spacing = _SpacingIndex(min_spacing_m)
    counts = dict(draws=0, sea=0, outside_region=0, too_close=0, cities_replaced=0)
    max_replacements = 10 * num_locations + 1000

    pending = np.arange(num_locations)
    while pending.size:
        east, north = rng.normal(0.0, sigma_m, size=(2, pending.size))
        cand_lat, cand_lon = geodesy.destination(
            cities.lat[city[pending]], cities.lon[city[pending]], east, north
        )
        ok = np.ones(pending.size, dtype=bool)
        if reject_sea:
            land = is_land(cand_lat, cand_lon)
            counts["sea"] += int((~land).sum())
            ok &= land
        if region:
            inside = in_region(cand_lat, cand_lon, region)
            counts["outside_region"] += int((ok & ~inside).sum())
            ok &= inside
        counts["draws"] += int(pending.size)
        draws_for_city[pending] += 1
        accepted = np.zeros(pending.size, dtype=bool)
        for i in np.flatnonzero(ok):  # in slot order, so that the spacing test is deterministic
            if spacing.add_if_clear(cand_lat[i], cand_lon[i]):
                accepted[i] = True
                lat[pending[i]], lon[pending[i]] = cand_lat[i], cand_lon[i]
            else:
                counts["too_close"] += 1
        pending = pending[~accepted]
        stuck = pending[draws_for_city[pending] >= max_draws_per_city]
        if stuck.size:
            counts["cities_replaced"] += int(stuck.size)
            if counts["cities_replaced"] > max_replacements:
                raise RuntimeError(
                    f"placed only {num_locations - pending.size} of {num_locations} locations "
                    f"after {counts['draws']} draws ({counts}): the region is too small, the "
                    "spacing too large or the cities are all at sea for these settings"
                )
            city[stuck] = rng.integers(len(cities), size=stuck.size)
            draws_for_city[stuck] = 0
    return Locations(lat=lat, lon=lon, city=city, cities=cities, counts=counts)


class _SpacingIndex:
    """Accepted points in a uniform grid of 3-D cells whose side is the minimum chord length, so
    that a new point only needs checking against the 27 neighbouring cells."""

    def __init__(self, min_spacing_m: float):
        self._chord = 2.0 * np.sin(min_spacing_m / (2.0 * geodesy.EARTH_RADIUS_M))
        self._cells: dict[tuple[int, int, int], list[np.ndarray]] = {}

    def add_if_clear(self, lat: float, lon: float) -> bool:
        if self._chord <= 0.0:
            return True
        point = geodesy.unit_vectors(lat, lon)
        key = tuple(int(k) for k in np.floor(point / self._chord))
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for dz in (-1, 0, 1):
                    for other in self._cells.get((key[0] + dx, key[1] + dy, key[2] + dz), ()):
                        if np.linalg.norm(point - other) < self._chord:
                            return False
        self._cells.setdefault(key, []).append(point)
        return True
