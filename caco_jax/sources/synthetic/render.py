"""The imagery of a synthetic location: surfaces, seasons, crops, sky, and the uint8 bands.

A location's land-cover map (forest, cropland parcels, a built-up street grid, water, bare soil) is
rendered as a per-pixel mixture of a few Sentinel-2-like surface reflectance spectra. Vegetation
follows the seasons within a window and crops rotate between windows (a realistic non-change);
every acquisition has its own illumination, haze and noise, a quarter of them have clouds and
shadows, and at a changed location a region takes another land cover in the late window.

Everything is a function of the seed and the location index (see `plan.random_stream`).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
from collections.abc import Iterator

import numpy as np

from caco_jax.data import layout
from caco_jax.sources.synthetic.ground_truth import (
    BARE_SOIL,
    BUILT_UP,
    CHANGE_TARGET,
    CROPLAND,
    FOREST,
    LAND_COVER_CLASSES,
    WATER,
)
from caco_jax.sources.synthetic.plan import (
    Acquisition,
    LocationPlan,
    plan_acquisitions,
    random_stream,
)

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

_CLOUDY_ACQUISITION_PROBABILITY = 0.25


@dataclasses.dataclass(frozen=True)
class RenderedAcquisition:
    """One acquisition's bands (uint8, native resolution) and its cloudy share in percent."""

    acquisition: Acquisition
    bands: dict[str, np.ndarray]
    cloud_percentage: float


def render_location(plan: LocationPlan, seed: int) -> Iterator[RenderedAcquisition]:
    """The location's acquisitions in time order, rendered one at a time."""
    surface_rng = random_stream(seed, plan.index, "surface")
    # Weaker seasons near the equator, where wet and dry seasons still change the vegetation.
    seasonality = float(np.clip((abs(plan.lat) - 5.0) / 20.0, 0.6, 1.0))
    peak_day = 195.0 if plan.lat >= 0 else 12.0  # mid-summer greenness peak
    early = _land_cover_map(surface_rng, plan.land_cover)
    late = early.copy()
    if plan.changed:
        late[_change_region(surface_rng, early, plan.change_type)] = CHANGE_TARGET[plan.change_type]
    fine_texture = 1.0 + 0.03 * surface_rng.standard_normal((SIZE, SIZE), dtype=np.float32)
    layers = _class_layers(surface_rng, peak_day)
    surfaces = []
    crop = None
    for classes in (early, late):
        crop = _draw_crops(surface_rng, layers, crop)
        _sow_crops(layers, crop, surface_rng, peak_day)
        surfaces.append(_surface(layers, classes, fine_texture, peak_day, seasonality))

    for acquisition in plan_acquisitions(plan, seed):
        pixel_rng = random_stream(seed, plan.index, f"acquisition{acquisition.number}")
        reflectance, cloud_percentage = _render(
            surfaces[acquisition.window], acquisition.sensing, pixel_rng
        )
        yield RenderedAcquisition(acquisition, to_bands(reflectance, pixel_rng), cloud_percentage)


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
) -> tuple[np.ndarray, float]:
    """Surface reflectance [12, SIZE, SIZE] of one acquisition and its cloudy pixel percentage."""
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

    # Earth Engine's CLOUDY_PIXEL_PERCENTAGE: the share of pixels that are not clear.
    return reflectance, round(float(np.mean(cloud >= 0.1)) * 100.0, 6)


def _shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(image)
    h, w = image.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def to_bands(reflectance: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
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
