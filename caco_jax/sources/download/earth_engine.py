"""The real `Client`: Sentinel-2 surface reflectance from Google Earth Engine (optional extra).

  pip install 'caco_jax[earthengine]' && earthengine authenticate

`ee` is imported only when an `EarthEngineClient` is made, so nothing else in caco_jax needs it.
Authentication is the user's own (`earthengine authenticate` or application default credentials);
this module never reads, prints or logs credentials. Requests go to the high-volume endpoint, which
Earth Engine recommends for many small parallel `computePixels` calls.

Requests per call: `search` = 1 (`getInfo` of the filtered collection, with every scene's
properties); `fetch` = 1 (`ee.data.computePixels` of the bands on the given grid, as a NumPy array).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import numpy as np

from caco_jax.runtime import extras
from caco_jax.sources.download.client import Acquisition, PixelGrid, TransientError

HIGH_VOLUME_URL = "https://earthengine-highvolume.googleapis.com"
MAX_SCENES_PER_SEARCH = 500  # one year over one point is at most ~300 scenes (overlapping tiles)
# Error messages of conditions that pass: quotas, rate limits, overload, timeouts.
_TRANSIENT_MARKERS = (
    "too many",
    "rate limit",
    "quota",
    "timed out",
    "timeout",
    "deadline",
    "internal error",
    "service unavailable",
    "backend error",
    "temporarily",
    "connection",
    " 429",
    " 500",
    " 502",
    " 503",
    " 504",
)


class EarthEngineClient:
    """Searches and fetches one Earth Engine image collection (e.g. COPERNICUS/S2_SR_HARMONIZED)."""

    def __init__(self, collection: str, project: str = "", high_volume: bool = True):
        ee = extras.require("ee", "earthengine")
        self._ee = ee
        self._collection = collection
        try:
            ee.Initialize(project=project or None, url=HIGH_VOLUME_URL if high_volume else None)
        except Exception as error:  # the message is Earth Engine's own; it holds no secret
            raise RuntimeError(
                f"Earth Engine initialisation failed ({type(error).__name__}: {error}). "
                "Authenticate once with `earthengine authenticate` and pass your Cloud project "
                "as config.download.project."
            ) from None

    def search(
        self,
        lat: float,
        lon: float,
        start: datetime.date,
        end: datetime.date,
        max_cloud: float,
    ) -> list[Acquisition]:
        ee = self._ee
        scenes = (
            ee.ImageCollection(self._collection)
            .filterBounds(ee.Geometry.Point([lon, lat]))
            .filterDate(start.isoformat(), end.isoformat())
            .filter(ee.Filter.lt("CLOUDY_PIXEL_PERCENTAGE", max_cloud))
            .sort("system:time_start")
            .limit(MAX_SCENES_PER_SEARCH)
        )
        info = _translate_errors(scenes.getInfo)
        acquisitions = []
        for feature in info.get("features", []):
            properties = dict(feature.get("properties", {}))
            properties.setdefault("system:id", feature.get("id", ""))
            product_id = properties.get("system:index") or feature["id"].rsplit("/", 1)[-1]
            properties.setdefault("system:index", product_id)
            acquisitions.append(
                Acquisition(
                    product_id=product_id,
                    time=datetime.datetime.fromtimestamp(
                        properties["system:time_start"] / 1000.0, tz=datetime.UTC
                    ).replace(tzinfo=None),
                    cloud=float(properties.get("CLOUDY_PIXEL_PERCENTAGE", float("nan"))),
                    properties=properties,
                )
            )
        return acquisitions

    def fetch(self, acquisition: Acquisition, bands: Sequence[str], grid: PixelGrid) -> np.ndarray:
        ee = self._ee
        image = ee.Image(f"{self._collection}/{acquisition.product_id}")
        request = {
            # Masked pixels become 0 in every band, which the downloader counts as "no data".
            "expression": image.select(list(bands)).unmask(0),
            "fileFormat": "NUMPY_NDARRAY",
            "grid": {
                "dimensions": {"width": grid.size, "height": grid.size},
                "affineTransform": {
                    "scaleX": grid.resolution_m,
                    "shearX": 0,
                    "translateX": grid.west,
                    "shearY": 0,
                    "scaleY": -grid.resolution_m,
                    "translateY": grid.north,
                },
                "crsCode": grid.crs,
            },
        }
        pixels = _translate_errors(ee.data.computePixels, request)
        return np.stack([np.asarray(pixels[band]) for band in bands], axis=-1)


def _translate_errors(fn, *args):
    """Runs one request; conditions that pass become TransientError, the rest propagate."""
    try:
        return fn(*args)
    except Exception as error:
        if _is_transient(error):
            raise TransientError(f"{type(error).__name__}: {error}") from error
        raise


def _is_transient(error: Exception) -> bool:
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    message = f" {error}".lower()
    return any(marker in message for marker in _TRANSIENT_MARKERS)
