"""Facts of the published CACo archive layout, shared by every reader and writer.

An archive holds one folder per location; each location holds one folder per Sentinel-2
acquisition, named by the Earth Engine product id, whose first 15 characters are the sensing
time. Each acquisition folder holds 12 single-band uint8 GeoTIFFs and a ``metadata.json``.
"""

from __future__ import annotations

import dataclasses
import datetime
import re

# All 12 bands in the archive, in the order the `all_bands` records store them.
BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")

# Ground sampling distance of each band in metres.
BAND_RESOLUTION_M = {
    "B1": 60, "B2": 10, "B3": 10, "B4": 10, "B5": 20, "B6": 20, "B7": 20,
    "B8": 10, "B8A": 20, "B9": 60, "B11": 20, "B12": 20,
}  # fmt: skip

PATCH_SIZE_M = 2640  # a location covers 2.64 km x 2.64 km
# Pixel size of each resolution group: 264 px at 10 m, 132 px at 20 m, 44 px at 60 m.
PIXELS_AT_RESOLUTION = {res: PATCH_SIZE_M // res for res in (10, 20, 60)}
# The bands of each resolution group, in BANDS order.
BANDS_AT_RESOLUTION = {
    res: tuple(b for b in BANDS if BAND_RESOLUTION_M[b] == res) for res in (10, 20, 60)
}

# The resolution groups of the `all_bands` records and their bands.
GROUP_BANDS = {f"bands_{res}m": BANDS_AT_RESOLUTION[res] for res in (10, 20, 60)}

# The paper trains on RGB = (B4, B3, B2).
RGB_BANDS = ("B4", "B3", "B2")

# SeCo's per-band linear stretch of the uint8 values (min, max), reused unchanged by CACo.
RGB_STRETCH = {"B4": (0.0, 129.0), "B3": (2.0, 103.0), "B2": (3.0, 88.0)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Sentinel-2 products store reflectance x this as uint16 digital numbers (L1C: top of atmosphere,
# L2A: surface reflectance); the archive stores reflectance x 255 as uint8.
REFLECTANCE_SCALE = 10_000

ACQUISITIONS_PER_WINDOW = 5  # a complete location has 2 x 5 acquisitions
MIN_ACQUISITIONS_PER_WINDOW = 3  # the official loader draws 3 distinct acquisitions per window
# Readers keep at most this many acquisition folders of a location (4x a complete one); a location
# with more is skipped, so that one odd folder cannot hold unbounded bytes in memory.
MAX_ACQUISITIONS_PER_LOCATION = 4 * 2 * ACQUISITIONS_PER_WINDOW

METADATA_FILE = "metadata.json"
# Earth Engine's Sentinel-2 cloud estimate, the property kept as `cloud` in the records.
CLOUD_PROPERTY = "CLOUDY_PIXEL_PERCENTAGE"

_PRODUCT_TIME = re.compile(r"^(\d{8}T\d{6})_")


def canonical_band(band: str) -> str:
    """A band name as `BANDS` spells it: 'B01' -> 'B1', 'b8a' -> 'B8A'."""
    band = band.upper()
    return "B" + band[2:] if band.startswith("B0") else band


def channel_indices(dataset: str, available, needed) -> list[int]:
    """Index in ``available`` (a dataset's bands, any spelling) of each band in ``needed``; a band
    the dataset lacks is a ValueError naming both sides."""
    names = [canonical_band(b) for b in available]
    missing = [b for b in needed if canonical_band(b) not in names]
    if missing:
        raise ValueError(
            f"{dataset} has bands {', '.join(names)}; the encoder needs {', '.join(needed)} "
            f"(missing {', '.join(missing)})"
        )
    return [names.index(canonical_band(b)) for b in needed]


def to_archive_uint8(digital_numbers, xp=None, *, offset: float = 0.0):
    """Sentinel-2 digital numbers (reflectance x `REFLECTANCE_SCALE`, less ``offset``: 1000 for
    processing baseline 04.00 and later) -> the archive's uint8 scale: reflectance x 255, clipped to
    [0, 255] and truncated (SeCo's ``rescale_intensity`` to uint8).

    The one mapping from raw values to the archive's scale: the downloader writes archives with
    it, and `embed` and the evaluators bring Sentinel-2 products to the pretraining scale with it.
    Integer input is mapped exactly, with integer arithmetic, in NumPy or JAX (``xp``) alike.
    """
    import numpy as np

    xp = xp or np
    values = xp.asarray(digital_numbers)
    if xp.issubdtype(values.dtype, xp.integer) and float(offset).is_integer():
        shifted = xp.clip(values.astype(xp.int32) - int(offset), 0, REFLECTANCE_SCALE)
        return (shifted * 255 // REFLECTANCE_SCALE).astype(xp.uint8)
    dtype = xp.float64 if xp is np else xp.float32
    reflectance = xp.clip((values.astype(dtype) - offset) / REFLECTANCE_SCALE, 0.0, 1.0)
    return xp.floor(reflectance * 255.0).astype(xp.uint8)


def band_file(band: str) -> str:
    return f"{band}.tif"


# The largest metadata.json a reader takes (the published ones hold a few kB of Earth Engine
# properties).
MAX_METADATA_BYTES = 1 << 20
_GEOTIFF_OVERHEAD_BYTES = 64 << 10  # tags, tile offsets, a colour table


def max_file_bytes(name: str) -> int:
    """The largest file of name ``name`` (``B4.tif``, ``metadata.json``) that a reader takes
    before decoding it: a band file holds one uint8 band of `band_shape` pixels, at most twice
    that size uncompressed (an uncompressible band grows a little under LZW or deflate) plus its
    header; a larger one is not a band of this layout and is skipped unread."""
    if name == METADATA_FILE:
        return MAX_METADATA_BYTES
    band = name.removesuffix(".tif")
    height, width = band_shape(band)
    return 2 * height * width + _GEOTIFF_OVERHEAD_BYTES


def band_shape(band: str) -> tuple[int, int]:
    size = PIXELS_AT_RESOLUTION[BAND_RESOLUTION_M[band]]
    return (size, size)


def is_stray_name(name: str) -> bool:
    """macOS and editor droppings that appear in hand-made archives and are never data."""
    return name.startswith(".") or name.startswith("._") or name in ("Thumbs.db", "__MACOSX")


def sensing_time(product_id: str) -> datetime.datetime:
    """The sensing time encoded at the start of an acquisition folder name.

    Raises ValueError naming the folder when the name does not start with ``YYYYMMDDTHHMMSS_``.
    """
    match = _PRODUCT_TIME.match(product_id)
    if match is None:
        raise ValueError(
            f"acquisition folder {product_id!r} does not start with a Sentinel-2 sensing time "
            "'YYYYMMDDTHHMMSS_'"
        )
    return datetime.datetime.strptime(match.group(1), "%Y%m%dT%H%M%S")


def is_acquisition_name(name: str) -> bool:
    return _PRODUCT_TIME.match(name) is not None


@dataclasses.dataclass(frozen=True)
class GeoBox:
    """A location's footprint in geographic coordinates (EPSG:4326), as its GeoTIFFs record it."""

    west: float
    south: float
    east: float
    north: float

    @property
    def center(self) -> tuple[float, float]:
        """(lat, lon) of the centre."""
        return ((self.south + self.north) / 2.0, (self.west + self.east) / 2.0)

    @classmethod
    def around(cls, lat: float, lon: float, size_m: float = PATCH_SIZE_M) -> GeoBox:
        """The square of `size_m` metres on the ground centred at (lat, lon)."""
        import math

        half_lat = (size_m / 2.0) / 111_320.0
        half_lon = (size_m / 2.0) / (111_320.0 * max(math.cos(math.radians(lat)), 1e-6))
        return cls(lon - half_lon, lat - half_lat, lon + half_lon, lat + half_lat)


def write_band_geotiff(path, pixels, box: GeoBox, jpeg_quality: int = 75) -> None:
    """Writes one band as the published archives store it: a single-band uint8 GeoTIFF written by
    GDAL, JPEG-compressed, in geographic lat/lon (EPSG:4326) with an affine transform.

    The default quality, 75, is GDAL's own default for JPEG-compressed GeoTIFFs."""
    import numpy as np

    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"{path}: a band must be 2-D uint8, got {pixels.dtype}{pixels.shape}")
    _write_geotiff(path, pixels[None], box, jpeg_quality)


def write_preview_geotiff(path, rgb, box: GeoBox, jpeg_quality: int = 75) -> None:
    """Writes the RGB preview that sits beside each acquisition folder: a 3-band uint8 JPEG
    GeoTIFF, `rgb` being [3, H, W] = (B4, B3, B2) already stretched to [0, 255]."""
    import numpy as np

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[0] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"{path}: a preview must be [3, H, W] uint8, got {rgb.dtype}{rgb.shape}")
    _write_geotiff(path, rgb, box, jpeg_quality, photometric="RGB")


def _write_geotiff(path, bands, box: GeoBox, jpeg_quality: int, **creation_options) -> None:
    import rasterio
    from rasterio.transform import from_bounds

    count, height, width = bands.shape
    profile = dict(
        driver="GTiff",
        height=height,
        width=width,
        count=count,
        dtype="uint8",
        crs="EPSG:4326",
        transform=from_bounds(box.west, box.south, box.east, box.north, width, height),
        compress="JPEG",
        jpeg_quality=jpeg_quality,
        **creation_options,
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(bands)
