"""The boundary between the downloader and an imagery service: a small protocol and its data types.

Everything that decides what to download, checks it and writes it lives on this side and is tested
with a fake client; `caco_jax.sources.download.earth_engine.EarthEngineClient` is the thin real
implementation.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from typing import Protocol

import numpy as np


class TransientError(Exception):
    """A failure worth retrying after a pause: rate limits, timeouts, 5xx, dropped connections.

    Any other exception a client raises is permanent for the location it concerns.
    """


@dataclasses.dataclass(frozen=True)
class Acquisition:
    """One Sentinel-2 scene that covers a location."""

    product_id: str  # folder name in the archive; starts with the sensing time YYYYMMDDTHHMMSS_
    time: datetime.datetime  # sensing time, UTC
    cloud: float  # scene cloud percentage (CLOUDY_PIXEL_PERCENTAGE)
    properties: dict  # every image property, written to metadata.json


@dataclasses.dataclass(frozen=True)
class PixelGrid:
    """A north-up square of `size` x `size` pixels of `resolution_m` metres in a projected CRS."""

    crs: str  # e.g. "EPSG:32631"
    west: float  # x of the left edge, metres
    north: float  # y of the top edge, metres
    resolution_m: int
    size: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(west, south, east, north) in the CRS."""
        extent = self.resolution_m * self.size
        return (self.west, self.north - extent, self.west + extent, self.north)


class Client(Protocol):
    def search(
        self,
        lat: float,
        lon: float,
        start: datetime.date,
        end: datetime.date,
        max_cloud: float,
    ) -> list[Acquisition]:
        """Scenes covering (lat, lon), sensed in [start, end), with scene cloud < max_cloud."""
        ...

    def fetch(self, acquisition: Acquisition, bands: Sequence[str], grid: PixelGrid) -> np.ndarray:
        """The raw digital numbers (reflectance x 10000) of `bands` on `grid`: [size, size, bands].
        Pixels without data (outside the swath, masked) are 0 in every band."""
        ...
