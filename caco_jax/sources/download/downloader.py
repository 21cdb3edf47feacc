"""Fills an archive with two time windows of Sentinel-2 images for each location of a file.

Per location (`download_location`), for each window:
  1. one search lists the scenes covering the centre with scene cloud below `max_scene_cloud`;
  2. scenes sensed the same day (overlapping tiles of one pass) are merged, keeping the least
     cloudy;
  3. the window is cut into `acquisitions_per_window` equal periods (SeCo spread its 5 dates over a
     year the same way); in rounds, each period still lacking a good scene tries its next least
     cloudy scene, then scenes left anywhere fill missing slots; at most
     `MAX_TRIES_PER_ACQUISITION` x the target are tried, which bounds the requests spent;
  4. a try first fetches the bands that share the cloud band's resolution (SCL: 20 m; SeCo's QA60:
     60 m) with it: a patch with more cloudy pixels than `max_patch_cloud_fraction` or any pixel
     without data is rejected after that one request (SeCo's `sampleRectangle` refused cloud-masked
     pixels the same way); a good one then fetches the other two resolution groups.
A window with fewer than `min_acquisitions_per_window` good acquisitions fails the location: it is
reported, never written. `download_all` runs locations in a bounded thread pool, retries transient
errors with exponential backoff, skips finished locations, and writes a report of every failure and
its reason.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import functools
import os
import random
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from caco_jax.data import layout
from caco_jax.runtime import progress as progress_lib
from caco_jax.settings import Section
from caco_jax.sources.download import footprint, writer
from caco_jax.sources.download.client import Acquisition, Client, TransientError
from caco_jax.sources.sampling.files import Site

MAX_TRIES_PER_ACQUISITION = 4
QA60_CLOUD_BITS = (1 << 10) | (1 << 11)  # opaque clouds, cirrus
SCL_CLOUDY_CLASSES = (3, 8, 9, 10)  # cloud shadow, cloud medium / high probability, thin cirrus


@dataclasses.dataclass(frozen=True)
class CloudMask:
    """A per-pixel cloud band: fetched with the bands of its native resolution, first."""

    band: str
    resolution: int
    is_cloudy: Callable[[np.ndarray], np.ndarray]


CLOUD_MASKS = {
    # The L2A scene classification, populated for every processing baseline.
    "scl": CloudMask("SCL", 20, lambda v: np.isin(v, SCL_CLOUDY_CLASSES)),
    # SeCo's choice; empty in scenes processed with baseline 04.00 before February 2024.
    "qa60": CloudMask("QA60", 60, lambda v: (v.astype(np.int64) & QA60_CLOUD_BITS) != 0),
}


def fetch_groups(mask: CloudMask) -> list[tuple[int, tuple[str, ...]]]:
    """(resolution, bands) of each request for one acquisition: the group holding the cloud band
    first, so that a cloudy patch is rejected after one request."""
    groups = [(res, layout.BANDS_AT_RESOLUTION[res]) for res in (10, 20, 60)]
    groups.sort(key=lambda group: group[0] != mask.resolution)
    return [
        (res, (*bands, mask.band) if res == mask.resolution else bands) for res, bands in groups
    ]


@dataclasses.dataclass(frozen=True)
class DownloadSettings(Section):
    """`config.download`: what to download for each location (task download)."""

    SECTION = "download"
    locations: str = ""  # locations CSV; "" = <sampling output>/locations.csv
    output: str = ""  # the archive folder; "" = <workdir>/archive/clean_custom_geography
    collection: str = "COPERNICUS/S2_SR_HARMONIZED"  # Earth Engine surface reflectance
    # Two windows [start, end) about 4 years apart, each at most a year (ISO dates).
    windows: tuple[tuple[str, str], ...] = (
        ("2019-01-01", "2020-01-01"),
        ("2023-01-01", "2024-01-01"),
    )
    acquisitions_per_window: int = 5
    min_acquisitions_per_window: int = 3  # fewer and the location is reported as failed
    max_scene_cloud: float = 10.0  # CLOUDY_PIXEL_PERCENTAGE of the whole scene (SeCo: 10)
    max_patch_cloud_fraction: float = 0.0  # cloudy pixels allowed in the patch
    # Per-pixel clouds: "scl" (L2A scene classes: shadow, cloud, cirrus) or SeCo's "qa60" (empty
    # in scenes processed between January 2022 and February 2024); a key of CLOUD_MASKS.
    cloud_mask: str = "scl"
    concurrent_requests: int = 8  # locations in flight = concurrent Earth Engine requests
    max_retries: int = 5  # per request, on transient errors (quota, timeouts, 5xx)
    retry_base_seconds: float = 2.0  # backoff 2, 4, 8, ... seconds, with jitter
    preview: bool = True  # also write SeCo's RGB preview <product_id>.tif beside each folder
    project: str = ""  # Google Cloud project for ee.Initialize; "" = your default

    def validate(self) -> None:
        try:
            windows = self.window_dates
        except (TypeError, ValueError) as error:
            self.require(False, "windows", f"must be ISO date pairs: {error}")
        self.require(
            len(windows) == 2 and all(len(w) == 2 for w in windows),
            "windows",
            "must be two (start, end) pairs: the early and the late window",
        )
        self.require(
            all(0 < (end - start).days <= 366 for start, end in windows),
            "windows",
            "each window must have start < end and span at most one year",
        )
        self.require(windows[0][1] <= windows[1][0], "windows", "the early window must end first")
        self.require(self.acquisitions_per_window >= 1, "acquisitions_per_window", "must be >= 1")
        self.require(
            1 <= self.min_acquisitions_per_window <= self.acquisitions_per_window,
            "min_acquisitions_per_window",
            "must be in [1, download.acquisitions_per_window]",
        )
        self.require(0 <= self.max_scene_cloud <= 100, "max_scene_cloud", "in [0, 100]")
        self.require(
            0 <= self.max_patch_cloud_fraction <= 1, "max_patch_cloud_fraction", "in [0, 1]"
        )
        self.require(self.cloud_mask in CLOUD_MASKS, "cloud_mask", f"one of {tuple(CLOUD_MASKS)}")
        self.require(self.concurrent_requests >= 1, "concurrent_requests", "must be >= 1")
        self.require(self.max_retries >= 0, "max_retries", "must be >= 0")
        self.require(self.retry_base_seconds >= 0, "retry_base_seconds", "must be >= 0")
        self.require(bool(self.collection), "collection", "must name an Earth Engine collection")

    @property
    def window_dates(self) -> tuple[tuple[datetime.date, datetime.date], ...]:
        return tuple(tuple(datetime.date.fromisoformat(d) for d in w) for w in self.windows)


class LocationFailed(Exception):
    """A location that cannot be filled; the message says why."""


class _Stopped(BaseException):
    """Raised in workers once the run is being interrupted."""


def cloud_fraction(mask: CloudMask, values: np.ndarray) -> float:
    """The fraction of pixels the cloud band flags."""
    return float(np.mean(mask.is_cloudy(np.asarray(values))))


def nodata_fraction(digital_numbers: np.ndarray) -> float:
    """The fraction of pixels that are 0 in every band (outside the swath or masked)."""
    return float(np.mean(np.all(np.asarray(digital_numbers) == 0, axis=-1)))


def choose_acquisitions(
    candidates: Sequence[Acquisition],
    start: datetime.date,
    end: datetime.date,
    count: int,
    try_one: Callable[[Acquisition], object | None],
    max_tries: int,
) -> list:
    """Up to `count` results of `try_one` (None = rejected), spread over the window.

    Scenes of the same day are merged (least cloudy kept). The window is cut into `count` equal
    periods; in rounds, each period that has no accepted scene yet tries its next scene, least
    cloudy first, so that one rainy season cannot use up the tries of the others; then the scenes
    left anywhere fill the missing slots, least cloudy first. At most `max_tries` calls of `try_one`
    are made.
    """
    by_day: dict[datetime.date, Acquisition] = {}
    for acq in sorted(candidates, key=_by_cloud):
        by_day.setdefault(acq.time.date(), acq)
    period = (end - start) / count
    queues: list[list[Acquisition]] = [[] for _ in range(count)]
    for acq in sorted(by_day.values(), key=_by_cloud):
        queues[min(max(int((acq.time.date() - start) / period), 0), count - 1)].append(acq)
    accepted, tries = [], 0
    unfilled = [queue for queue in queues if queue]
    while unfilled and tries < max_tries:  # rounds over the periods that still lack a good scene
        for queue in list(unfilled):
            if tries == max_tries:
                break
            tries += 1
            result = try_one(queue.pop(0))
            if result is not None:
                accepted.append(result)
            if result is not None or not queue:
                unfilled.remove(queue)
    for acq in sorted((a for queue in queues for a in queue), key=_by_cloud):
        if len(accepted) == count or tries == max_tries:
            break
        tries += 1
        result = try_one(acq)
        if result is not None:
            accepted.append(result)
    return accepted


def _by_cloud(acq: Acquisition):
    return (acq.cloud, acq.time, acq.product_id)


class _Calls:
    """Client calls with retries on TransientError (exponential backoff, jitter) and a stop flag."""

    def __init__(
        self, settings: DownloadSettings, stop: threading.Event, sleep: Callable | None = None
    ):
        self._settings = settings
        self._stop = stop
        self._sleep = sleep or stop.wait  # a backoff pause ends at once when the run is stopped
        self._lock = threading.Lock()
        self.requests = 0
        self.retries = 0

    def __call__(self, fn, *args):
        for attempt in range(self._settings.max_retries + 1):
            if self._stop.is_set():
                raise _Stopped()
            with self._lock:
                self.requests += 1
            try:
                return fn(*args)
            except TransientError as error:
                if attempt == self._settings.max_retries:
                    raise LocationFailed(
                        f"gave up after {attempt + 1} attempts: {error}"
                    ) from error
                with self._lock:
                    self.retries += 1
                delay = self._settings.retry_base_seconds * 2**attempt
                self._sleep(delay * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")


def download_location(
    client: Client, site: Site, settings: DownloadSettings, call: Callable
) -> list:
    """The images of one location (both windows, time order), or LocationFailed saying why."""
    grids = footprint.patch_grids(site.lat, site.lon)
    box = footprint.geobox(grids[10], site.lon)
    images = []
    for window, (start, end) in enumerate(settings.window_dates):
        candidates = call(client.search, site.lat, site.lon, start, end, settings.max_scene_cloud)
        rejected = {"cloudy patch": 0, "no data": 0}
        try_one = functools.partial(_try_acquisition, client, grids, box, settings, call, rejected)
        found = choose_acquisitions(
            candidates,
            start,
            end,
            settings.acquisitions_per_window,
            try_one,
            max_tries=MAX_TRIES_PER_ACQUISITION * settings.acquisitions_per_window,
        )
        if len(found) < settings.min_acquisitions_per_window:
            raise LocationFailed(
                f"window {window} ({start}..{end}): {len(found)} usable acquisitions, need "
                f"{settings.min_acquisitions_per_window} ({len(candidates)} scenes with cloud < "
                f"{settings.max_scene_cloud:g}%, rejected: "
                + ", ".join(f"{n} {why}" for why, n in rejected.items())
                + ")"
            )
        images.extend(sorted(found, key=lambda image: image.acquisition.product_id))
    return images


def _try_acquisition(client, grids, box, settings, call, rejected, acq):
    """The acquisition's Image, or None after counting why it was rejected."""
    bands, reason = _fetch_patch(client, acq, grids, settings, call)
    if reason:
        rejected[reason] += 1
        return None
    return writer.Image(acq, bands, box)


def _fetch_patch(client, acq, grids, settings, call):
    """The 12 uint8 bands of one acquisition, or (None, why it was rejected)."""
    bands = {}
    mask = CLOUD_MASKS[settings.cloud_mask]
    for resolution, names in fetch_groups(mask):
        grid = grids[resolution]
        pixels = np.asarray(call(client.fetch, acq, names, grid))
        if pixels.shape != (grid.size, grid.size, len(names)):
            raise LocationFailed(
                f"{acq.product_id}: the client returned {pixels.shape} for bands {list(names)}, "
                f"expected {(grid.size, grid.size, len(names))}"
            )
        if names[-1] == mask.band:
            if cloud_fraction(mask, pixels[..., -1]) > settings.max_patch_cloud_fraction:
                return None, "cloudy patch"
            pixels = pixels[..., :-1]
        if nodata_fraction(pixels) > 0.0:
            return None, "no data"
        for i, name in enumerate(names[: pixels.shape[-1]]):
            bands[name] = layout.to_archive_uint8(pixels[..., i])
    return bands, None


@dataclasses.dataclass
class Summary:
    written: int = 0
    skipped: int = 0  # finished by an earlier run
    failed: dict = dataclasses.field(default_factory=dict)  # location_id -> reason
    partials_removed: int = 0
    requests: int = 0
    retries: int = 0
    seconds: float = 0.0


def download_all(
    client: Client,
    sites: Sequence[Site],
    archive_dir: str,
    settings: DownloadSettings,
    *,
    progress: bool = True,
    sleep: Callable | None = None,
) -> Summary:
    """Downloads every site not yet in `archive_dir`; see the module docstring.

    Ctrl-C (or any BaseException) stops the workers at their next request and propagates; finished
    locations stay, the unfinished one is never published and the next run starts it again.
    """

    start_time = time.perf_counter()
    os.makedirs(archive_dir, exist_ok=True)
    summary = Summary(partials_removed=len(writer.remove_partials(archive_dir)))
    todo = [s for s in sites if not writer.is_complete(archive_dir, s.location_id)]
    summary.skipped = len(sites) - len(todo)
    stop = threading.Event()
    call = _Calls(settings, stop, sleep)

    def work(site: Site) -> None:
        images = download_location(client, site, settings, call)
        if stop.is_set():
            raise _Stopped()
        writer.write_location(archive_dir, site.location_id, images, preview=settings.preview)

    bar = progress_lib.bar(total=len(todo), desc="locations", unit="loc", enabled=progress)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=settings.concurrent_requests)
    try:
        futures = {executor.submit(work, site): site for site in todo}
        for future in concurrent.futures.as_completed(futures):
            site = futures[future]
            try:
                future.result()
                summary.written += 1
            except Exception as error:  # a location's failure is reported, never fatal
                summary.failed[site.location_id] = _reason(error)
            bar.update(1)
            bar.set_postfix(written=summary.written, failed=len(summary.failed))
    except BaseException:
        stop.set()
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        bar.close()
        executor.shutdown(wait=True)
        summary.requests, summary.retries = call.requests, call.retries
        summary.seconds = time.perf_counter() - start_time
    return summary


def _reason(error: Exception) -> str:
    if isinstance(error, LocationFailed):
        return str(error)
    return f"{type(error).__name__}: {error}"
