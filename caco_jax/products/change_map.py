"""Change maps from an encoder alone: which places changed between two dates (task `change_map`).

Two kinds of input, one rule for the labels.

Two scenes of one place (``kind="scenes"``, `compare_scenes`): GeoTIFF files or folders, or two
Sentinel-2 products, ``before`` and ``after``. The after scene is read on the before scene's grid
(warped when it is on another, `data.geotiff`), both are cut into the same tiles of the encoder's
image size, and per tile

  e_b, e_a  the L2-normalised pooled features of the tile at each date (eval mode)
  distance  || e_b - e_a ||
  ratio     distance / the median distance over the scene's usable tiles

A scene pair has no short-term variation to divide by (as d_st below); the scene's median distance
stands in for it: most tiles of a scene do not change, so a ratio near 1 is the scene's typical
difference between the two dates (season, light, atmosphere) and change stands out above it.
Tiles with more than ``max_nodata`` of their pixels without data at either date are left out and
counted. Outputs: ``change_ratio.tif`` (float32, NaN where left out) and ``changed.tif`` (uint8 0/1,
255 where left out), one pixel per tile in the before scene's CRS; ``change_map.geojson`` (a
polygon per tile in that CRS, named by a ``crs`` member) and ``change_map.csv``; ``change_map.png``
(both dates and the ratio, changed tiles outlined) and ``histograms.png``.

A CACo archive or prepared records (``kind="archive"`` / ``"records"``): one decision per location
from its acquisitions in the two windows,

  d_lt    || mean of the early window's e_t - mean of the late window's e_t ||
  d_st    the mean of || e_s - e_t || over all pairs s != t within the same window (both windows)
  ratio   d_lt / (d_st + 1e-4), as `pretrain.change.change_statistics`

(locations with fewer than two acquisitions in a window are skipped with a note), or a CACo
pretraining run's own estimate (``kind="pretraining"``, `from_pretraining`). Outputs:
``change_map.csv`` and ``change_map.geojson`` (a point per location: lat, lon, d_lt, d_st, ratio,
changed), ``change_map.png`` (over the offline land mask) and ``histograms.png``.

The label, for every kind: changed when the ratio is above `split_threshold`, the decision
boundary of a seeded two-component Gaussian mixture fitted to the ratios, taken between the two
means. The labels are therefore monotone in the ratio (a mixture's own labels need not be: a wide
component can claim both tails). A pretraining run's own labels (the official mixture's
predictions on r) are kept beside them as ``pretraining_changed``.

The embeddings behind a map are written too (``embeddings*/``, GeoParquet, `products.embed`): on
several processes each embeds its share of the tiles or locations there, and process 0 draws the
map from all of them.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os

import numpy as np

from caco_jax.data import geotiff, sentinel2
from caco_jax.products import embed as embed_lib
from caco_jax.runtime import multihost, storage
from caco_jax.runtime.workdir import Workdir
from caco_jax.settings import Section, SettingsError

EPS = 1e-4
KINDS = ("auto", "scenes", "archive", "records", "pretraining")
LOCATION_FILES = ("change_map.csv", "change_map.geojson", "change_map.png", "histograms.png")
SCENE_FILES = ("change_ratio.tif", "changed.tif", *LOCATION_FILES)
PNG = {"bbox_inches": "tight"}  # how the figures are saved
CHANGED_NODATA = 255  # changed.tif where a tile was left out


@dataclasses.dataclass(frozen=True)
class ChangeMapSettings(Section):
    """`config.change_map`: the input, the encoder and the output of a change map; the mixture
    that sets the threshold is seeded by ``config.seed``."""

    SECTION = "change_map"
    # auto: scenes when before/after are set, else archive; scenes (two dates of one place),
    # archive (CACo, any form), records (prepared), pretraining (a CACo run's own estimate)
    kind: str = "auto"
    before: str = ""  # scenes: the first date (GeoTIFF file or folder, Sentinel-2 product)
    after: str = ""  # scenes: the second date, read on the first's grid
    source: str = ""  # the archive, the records data_dir, or the run's workdir ("" = this one)
    builder_config: str = "rgb"  # records: rgb or all_bands
    encoder: str = ""  # an official name or an export path; "" = <workdir>/encoder
    output: str = ""  # folder; "" = <workdir>/change_map
    bands: tuple[str, ...] = ()  # scenes: band order of multi-band GeoTIFFs without descriptions
    scale: str = "auto"  # scenes: raw values, as config.embed.scale
    # scenes: digital-number offsets per date, as config.embed.dn_offset (-1 = from the product)
    before_dn_offset: float = geotiff.AUTO_OFFSET
    after_dn_offset: float = geotiff.AUTO_OFFSET
    max_nodata: float = 0.1  # scenes: tiles with more pixels without data are left out
    batch_size: int = 64
    land_mask: bool = True  # draw land under a map of locations (global-land-mask, ~1 GB)
    overwrite: bool = False

    def validate(self) -> None:
        self.require(self.kind in KINDS, "kind", f"one of {KINDS}")
        self.require(
            self.builder_config in ("rgb", "all_bands"), "builder_config", "rgb or all_bands"
        )
        self.require(self.scale in geotiff.SCALES, "scale", f"one of {geotiff.SCALES}")
        for name in ("before_dn_offset", "after_dn_offset"):
            value = getattr(self, name)
            self.require(
                value >= 0 or value == geotiff.AUTO_OFFSET,
                name,
                "must be >= 0, or -1 to read it from the product's metadata",
            )
        self.require(0.0 <= self.max_nodata <= 1.0, "max_nodata", "must be in [0, 1]")
        self.require(self.batch_size >= 1, "batch_size", "must be >= 1")
        scenes = self.resolved_kind == "scenes"
        self.require(
            not scenes or (self.before and self.after),
            "before" if not self.before else "after",
            "a change map of two scenes needs both change_map.before and change_map.after",
        )
        self.require(
            scenes or not (self.before or self.after),
            "kind",
            f"{self.kind!r} maps a source; before/after are for kind 'scenes' (or 'auto')",
        )

    @property
    def resolved_kind(self) -> str:
        if self.kind != "auto":
            return self.kind
        return "scenes" if self.before or self.after else "archive"


# ----------------------------------------------------------------------------- the label


def split_threshold(values, *, seed: int = 0) -> float:
    """The value above which a ratio counts as changed: the decision boundary of a two-component
    Gaussian mixture fitted to the finite ``values`` (``random_state=seed``), i.e. the lowest value
    between the two means where the higher-mean component's posterior reaches 1/2 (the midpoint of
    the means should it not). Infinite (nothing changed) with fewer than two distinct values."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    if np.unique(x).size < 2:
        return math.inf
    mixture = GaussianMixture(2, random_state=seed).fit(x[:, None])
    means = mixture.means_.ravel()
    high = int(np.argmax(means))
    between = np.linspace(means.min(), means.max(), 4097)
    posterior = mixture.predict_proba(between[:, None])[:, high]
    reached = np.flatnonzero(posterior >= 0.5)
    return float(between[reached[0]]) if reached.size else float(means.mean())


# ----------------------------------------------------------------------------- locations


@dataclasses.dataclass
class ChangeMap:
    """One decision per location of an archive, records or a pretraining run."""

    location_id: list[str]
    lat: np.ndarray
    lon: np.ndarray
    d_lt: np.ndarray
    d_st: np.ndarray
    ratio: np.ndarray
    threshold: float
    pretraining_changed: np.ndarray | None = None  # bool: the run's own labels

    @property
    def changed(self) -> np.ndarray:
        return self.ratio > self.threshold

    def rows(self) -> list[dict]:
        rows = []
        for i, location in enumerate(self.location_id):
            row = {
                "location_id": location,
                "lat": float(self.lat[i]),
                "lon": float(self.lon[i]),
                "d_lt": float(self.d_lt[i]),
                "d_st": float(self.d_st[i]),
                "ratio": float(self.ratio[i]),
                "changed": bool(self.changed[i]),
            }
            if self.pretraining_changed is not None:
                row["pretraining_changed"] = bool(self.pretraining_changed[i])
            rows.append(row)
        return rows


def location_statistics(embeddings: embed_lib.Embeddings) -> tuple[dict, list[str]]:
    """{location id: (lat, lon, d_lt, d_st)} from per-acquisition embeddings whose ids are
    ``<location>/<time>`` and windows 0/1, plus notes on skipped locations."""
    features = _normalised(embeddings.embeddings)
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(embeddings.ids):
        groups.setdefault(item.split("/")[0], []).append(index)
    statistics, notes = {}, []
    for location, indices in sorted(groups.items()):
        windows = [features[[i for i in indices if embeddings.window[i] == w]] for w in (0, 1)]
        counts = [len(w) for w in windows]
        if min(counts) < 2:
            notes.append(
                f"{location}: {counts[0]} early and {counts[1]} late acquisitions, "
                "need 2 per window; skipped"
            )
            continue
        d_lt = np.linalg.norm(windows[0].mean(axis=0) - windows[1].mean(axis=0))
        pairs = [_pairwise_mean(w) for w in windows]
        pair_counts = [c * (c - 1) for c in counts]
        d_st = float(np.dot(pairs, pair_counts) / sum(pair_counts))
        first = indices[0]
        statistics[location] = (
            float(embeddings.lat[first]),
            float(embeddings.lon[first]),
            float(d_lt),
            d_st,
        )
    return statistics, notes


def _normalised(features: np.ndarray) -> np.ndarray:
    features = features.astype(np.float64)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def _pairwise_mean(x: np.ndarray) -> float:
    """Mean distance over the ordered pairs s != t of the rows of x."""
    distances = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1)
    n = x.shape[0]
    return float(distances.sum() / (n * (n - 1)))


def from_embeddings(embeddings: embed_lib.Embeddings, *, seed: int = 0) -> ChangeMap:
    statistics, notes = location_statistics(embeddings)
    for note in notes:
        print(f"change_map: {note}", flush=True)
    if not statistics:
        raise geotiff.InputError("change_map: no location has 2 acquisitions in each window")
    ids = list(statistics)
    lat, lon, d_lt, d_st = (np.asarray(column) for column in zip(*statistics.values(), strict=True))
    ratio = d_lt / (d_st + EPS)
    return ChangeMap(ids, lat, lon, d_lt, d_st, ratio, split_threshold(ratio, seed=seed))


def from_pretraining(labels_csv, *, seed: int = 0) -> ChangeMap:
    """The change map of a CACo pretraining run from its own estimate, ``change/labels.csv``
    (the key encoder's head-1 running statistics and the labels fitted at the last epoch end, as
    the official estimator): per location the mean d_lt, d_st and r of its seen items; its
    ``pretraining_changed`` when either of its items is labelled changed."""
    from etils import epath

    per_location: dict[str, dict] = {}
    with epath.Path(labels_csv).open() as f:
        for row in csv.DictReader(f):
            if row["seen"] != "1":
                continue
            entry = per_location.setdefault(
                row["location_id"],
                {"lat": float(row["lat"]), "lon": float(row["lon"]), "values": [], "changed": 0},
            )
            entry["values"].append([float(row[k]) for k in ("d_lt", "d_st", "r")])
            entry["changed"] |= row["changed"] == "1"
    if not per_location:
        raise geotiff.InputError(f"change_map: {labels_csv} has no seen item")
    ids = list(per_location)
    means = np.asarray([np.mean(per_location[k]["values"], axis=0) for k in ids])
    return ChangeMap(
        ids,
        np.asarray([per_location[k]["lat"] for k in ids]),
        np.asarray([per_location[k]["lon"] for k in ids]),
        means[:, 0],
        means[:, 1],
        means[:, 2],
        split_threshold(means[:, 2], seed=seed),
        np.asarray([bool(per_location[k]["changed"]) for k in ids]),
    )


# ----------------------------------------------------------------------------- two scenes


@dataclasses.dataclass
class ScenePair:
    """Two images of one place and the grid both are read on (the before image's)."""

    before: geotiff.Image
    after: geotiff.Image
    grid: geotiff.Grid
    bands: tuple[str, ...] = ()  # the encoder's, in the order of each image's files

    @classmethod
    def find(cls, before: str, after: str, normalization, bands=()) -> ScenePair:
        images = []
        for name, source in (("before", before), ("after", after)):
            found = geotiff.find_images(source, normalization, bands)
            if len(found) != 1:
                raise geotiff.InputError(
                    f"{source}: {len(found)} images ({', '.join(i.name for i in found[:4])}); "
                    f"change_map.{name} must be one scene"
                )
            images.append(found[0])
        return cls(images[0], images[1], geotiff.image_grid(images[0]), tuple(normalization.bands))


@dataclasses.dataclass
class SceneChange:
    """One decision per tile of a scene pair."""

    ids: list[str]  # <before image>:<row>:<col>
    rows: np.ndarray  # [N] the tiles' first pixel on the grid
    cols: np.ndarray
    tile: int  # the tiles' side in pixels
    grid: geotiff.Grid
    lat: np.ndarray  # the tiles' centres
    lon: np.ndarray
    distance: np.ndarray  # NaN where left out
    ratio: np.ndarray  # NaN where left out
    nodata_before: np.ndarray
    nodata_after: np.ndarray
    threshold: float
    pair: ScenePair | None = None  # the scenes, for the figure

    @property
    def usable(self) -> np.ndarray:
        return np.isfinite(self.ratio)

    @property
    def changed(self) -> np.ndarray:
        return self.usable & (self.ratio > self.threshold)

    def raster_index(self) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """Each tile's pixel in the tile-resolution rasters, and their shape: the i-th row and
        j-th column of tiles (`geotiff.tile_origins`)."""
        row_values, col_values = np.unique(self.rows), np.unique(self.cols)
        return (
            np.searchsorted(row_values, self.rows),
            np.searchsorted(col_values, self.cols),
            (row_values.size, col_values.size),
        )

    def rasters(self) -> tuple[np.ndarray, np.ndarray]:
        """(ratio float32 with NaN, changed uint8 with `CHANGED_NODATA`), one pixel per tile."""
        i, j, shape = self.raster_index()
        ratio = np.full(shape, np.nan, np.float32)
        ratio[i, j] = self.ratio
        changed = np.full(shape, CHANGED_NODATA, np.uint8)
        changed[i, j] = np.where(self.usable, self.changed, CHANGED_NODATA)
        return ratio, changed

    def raster_transform(self):
        """The rasters' transform: the grid's, a pixel per tile. The last row and column of tiles
        end at the scene's edge (`geotiff.tile_origins`), so their pixels reach up to a tile
        beyond it; each pixel's part inside the scene lies within the tile whose value it holds."""
        from affine import Affine

        return self.grid.transform @ Affine.scale(self.tile)


def scene_embeddings(
    pair: ScenePair,
    model,
    normalization,
    *,
    image_size: int,
    scale: str = "auto",
    dn_offsets: tuple[float, float] = (geotiff.AUTO_OFFSET, geotiff.AUTO_OFFSET),
    batch_size: int = 64,
    share: tuple[int, int] = (0, 1),
) -> tuple[embed_lib.Embeddings, embed_lib.Embeddings]:
    """The embeddings of the same tiles of both scenes (this process's ``share`` of them)."""
    origins, _ = geotiff.share_rows(geotiff.tile_grid(pair.grid, image_size), share)
    result = []
    for image, offset in zip((pair.before, pair.after), dn_offsets, strict=True):
        tiles = geotiff.read_tiles(
            image,
            tile=image_size,
            scale=scale,
            dn_offset=offset,
            grid=pair.grid,
            origins=origins,
        )
        result.append(
            embed_lib.embed_tiles(
                model,
                normalization,
                tiles,
                image_size=image_size,
                batch_size=batch_size,
                total=len(origins),
            )
        )
    return result[0], result[1]


def from_scene_embeddings(
    before: embed_lib.Embeddings,
    after: embed_lib.Embeddings,
    grid: geotiff.Grid,
    tile: int,
    *,
    max_nodata: float = 0.1,
    seed: int = 0,
) -> SceneChange:
    """The tiles' distances, ratios and the threshold from the embeddings of both dates, in the
    tiles' order on the grid (row by row, whichever process embedded them)."""
    origin = [tuple(map(int, i.rsplit(":", 2)[1:])) for i in before.ids]
    after_origin = [tuple(map(int, i.rsplit(":", 2)[1:])) for i in after.ids]
    if origin != after_origin:
        raise ValueError("change_map: the two dates' embeddings are not of the same tiles")
    if not origin:
        raise geotiff.InputError("change_map: the scenes have no tile")
    order = sorted(range(len(origin)), key=origin.__getitem__)
    before, after = _rows(before, order), _rows(after, order)
    origin = [origin[i] for i in order]
    distance = np.linalg.norm(
        _normalised(before.embeddings) - _normalised(after.embeddings), axis=1
    )
    usable = (before.nodata <= max_nodata) & (after.nodata <= max_nodata)
    if not usable.any():
        raise geotiff.InputError(
            f"change_map: every one of the {usable.size} tiles has more than {max_nodata:.0%} of "
            "its pixels without data at one of the dates (change_map.max_nodata)"
        )
    distance = np.where(usable, distance, np.nan)
    median = float(np.nanmedian(distance))
    ratio = distance / max(median, 1e-12)
    rows, cols = (np.asarray(c, np.int64) for c in zip(*origin, strict=True))
    return SceneChange(
        ids=list(before.ids),
        rows=rows,
        cols=cols,
        tile=tile,
        grid=grid,
        lat=before.lat,
        lon=before.lon,
        distance=distance,
        ratio=ratio,
        nodata_before=before.nodata,
        nodata_after=after.nodata,
        threshold=split_threshold(ratio, seed=seed),
    )


def _rows(embeddings: embed_lib.Embeddings, order) -> embed_lib.Embeddings:
    return embed_lib.Embeddings(
        ids=[embeddings.ids[i] for i in order],
        embeddings=embeddings.embeddings[order],
        lat=embeddings.lat[order],
        lon=embeddings.lon[order],
        window=embeddings.window[order],
        nodata=embeddings.nodata[order],
        footprints=None,
    )


def compare_scenes(
    before: str,
    after: str,
    encoder: str,
    *,
    bands=(),
    scale: str = "auto",
    dn_offsets: tuple[float, float] = (geotiff.AUTO_OFFSET, geotiff.AUTO_OFFSET),
    max_nodata: float = 0.1,
    batch_size: int = 64,
    seed: int = 0,
    cache: str = "",
    base_url: str = "",
) -> SceneChange:
    """The change map of two scenes of one place with ``encoder`` (name or export), in this
    process."""
    model, normalization, image_size = embed_lib.load_encoder(
        encoder, cache=cache, base_url=base_url
    )
    pair = ScenePair.find(before, after, normalization, bands)
    early, late = scene_embeddings(
        pair,
        model,
        normalization,
        image_size=image_size,
        scale=scale,
        dn_offsets=dn_offsets,
        batch_size=batch_size,
    )
    result = from_scene_embeddings(
        early, late, pair.grid, image_size, max_nodata=max_nodata, seed=seed
    )
    return dataclasses.replace(result, pair=pair)


# ----------------------------------------------------------------------------- outputs


def _paths(folder, names) -> dict:
    folder = storage.path(folder)
    return {name.replace(".", "_"): folder / name for name in names}


def refuse_existing(folder, names, overwrite: bool) -> None:
    existing = [p for p in _paths(folder, names).values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} already exists (set change_map.overwrite=True to replace it, or "
            "change_map.output to write elsewhere)"
        )


def _write_csv(path, rows: list[dict]) -> None:
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    storage.replace_text(path, table.getvalue())  # whole or not at all


def write(result: ChangeMap, folder, *, land_mask: bool = True, overwrite: bool = False) -> dict:
    """A map of locations: the CSV, GeoJSON (points, longitude/latitude), map and histograms in
    ``folder`` (local or in a bucket, `storage.path`); returns their paths."""
    refuse_existing(folder, LOCATION_FILES, overwrite)
    paths = _paths(folder, LOCATION_FILES)
    storage.path(folder).mkdir(parents=True, exist_ok=True)
    rows = result.rows()
    _write_csv(paths["change_map_csv"], rows)
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [row["lon"], row["lat"]]},
            "properties": {k: v for k, v in row.items() if k not in ("lat", "lon")},
        }
        for row in rows
    ]
    storage.replace_text(
        paths["change_map_geojson"],
        json.dumps({"type": "FeatureCollection", "features": features}),
    )
    storage.write_png(map_figure(result, land_mask=land_mask), paths["change_map_png"], **PNG)
    storage.write_png(location_histograms(result), paths["histograms_png"], **PNG)
    return {name: os.fspath(path) for name, path in paths.items()}


def write_scenes(
    result: SceneChange, folder, *, scale="auto", dn_offsets=(-1.0, -1.0), overwrite=False
) -> dict:
    """A map of tiles: the rasters, GeoJSON (polygons in the scene's CRS), CSV, map (of
    ``result.pair``'s scenes) and histograms in ``folder``; returns their paths."""
    refuse_existing(folder, SCENE_FILES, overwrite)
    paths = _paths(folder, SCENE_FILES)
    storage.path(folder).mkdir(parents=True, exist_ok=True)
    ratio, changed = result.rasters()
    _write_raster(paths["change_ratio_tif"], ratio, result, np.nan, "ratio")
    _write_raster(paths["changed_tif"], changed, result, CHANGED_NODATA, "changed")
    rows = [
        {
            "id": result.ids[i],
            "row": int(result.rows[i]),
            "col": int(result.cols[i]),
            "lat": float(result.lat[i]),
            "lon": float(result.lon[i]),
            "nodata_before": round(float(result.nodata_before[i]), 6),
            "nodata_after": round(float(result.nodata_after[i]), 6),
            "distance": float(result.distance[i]),
            "ratio": float(result.ratio[i]),
            "changed": bool(result.changed[i]) if result.usable[i] else None,
        }
        for i in range(len(result.ids))
    ]
    _write_csv(paths["change_map_csv"], rows)
    storage.replace_text(paths["change_map_geojson"], json.dumps(_tiles_geojson(result, rows)))
    storage.write_png(
        scene_figure(result, scale=scale, dn_offsets=dn_offsets),
        paths["change_map_png"],
        **PNG,
    )
    storage.write_png(scene_histograms(result), paths["histograms_png"], **PNG)
    return {name: os.fspath(path) for name, path in paths.items()}


def _write_raster(path, values: np.ndarray, result: SceneChange, nodata, description: str):
    """A one-band GeoTIFF (DEFLATE) on the tile-resolution grid, written through memory so that
    ``path`` may be in a bucket."""
    from rasterio.io import MemoryFile

    profile = {
        "driver": "GTiff",
        "width": values.shape[1],
        "height": values.shape[0],
        "count": 1,
        "dtype": values.dtype.name,
        "crs": result.grid.crs,
        "transform": result.raster_transform(),
        "nodata": nodata,
        "compress": "deflate",
    }
    with MemoryFile() as memory:
        with memory.open(**profile) as dataset:
            dataset.write(values, 1)
            dataset.set_band_description(1, description)
            dataset.update_tags(threshold=repr(result.threshold))
        storage.replace_bytes(path, memory.read())


def _tiles_geojson(result: SceneChange, rows: list[dict]) -> dict:
    """A polygon per tile in the scene's CRS, named by a ``crs`` member (as GDAL and QGIS read
    it); in longitude/latitude when the CRS has no EPSG code."""
    epsg = result.grid.crs.to_epsg()
    features = []
    for i, row in enumerate(rows):
        r, c = int(result.rows[i]), int(result.cols[i])
        corners = [(c, r + result.tile), (c + result.tile, r + result.tile)]
        corners += [(c + result.tile, r), (c, r), (c, r + result.tile)]
        ring = [list(result.grid.transform @ corner) for corner in corners]
        if epsg is None:
            from rasterio.warp import transform

            xs, ys = transform(result.grid.crs, "EPSG:4326", *zip(*ring, strict=True))
            ring = [list(p) for p in zip(xs, ys, strict=True)]
        properties = {k: v for k, v in row.items() if k not in ("lat", "lon")}
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": properties,
            }
        )
    collection = {"type": "FeatureCollection", "features": features}
    if epsg is not None:
        collection["crs"] = {
            "type": "name",
            "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}"},
        }
    return collection


# ----------------------------------------------------------------------------- figures


def _figure(size, layout=None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=120, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def map_extent(lat: np.ndarray, lon: np.ndarray) -> tuple[float, float, float, float]:
    """(west, east, south, north) around the points with a 5 % margin (at least 0.05 degrees)."""
    margin_lon = max(0.05 * float(np.ptp(lon)), 0.05)
    margin_lat = max(0.05 * float(np.ptp(lat)), 0.05)
    return (
        max(float(lon.min()) - margin_lon, -180.0),
        min(float(lon.max()) + margin_lon, 180.0),
        max(float(lat.min()) - margin_lat, -90.0),
        min(float(lat.max()) + margin_lat, 90.0),
    )


def map_figure(result: ChangeMap, *, land_mask: bool = True, cells: int = 400):
    """The locations coloured by ratio (changed ones ringed in red) over the land mask."""
    west, east, south, north = map_extent(result.lat, result.lon)
    figure = _figure((9, 7))
    axes = figure.add_subplot()
    if land_mask:
        from caco_jax.sources.sampling.landmask import is_land

        lats = np.linspace(north, south, cells)
        lons = np.linspace(west, east, cells)
        axes.imshow(
            is_land(lats[:, None], lons[None, :]),
            extent=(west, east, south, north),
            cmap="Greys",
            vmin=0,
            vmax=3,
            origin="upper",
            aspect="auto",
        )
    points = axes.scatter(result.lon, result.lat, c=result.ratio, s=18, cmap="viridis", zorder=2)
    changed = result.changed
    axes.scatter(
        result.lon[changed],
        result.lat[changed],
        s=60,
        facecolors="none",
        edgecolors="tab:red",
        zorder=3,
        label=f"changed (ratio > {result.threshold:.3g})",
    )
    figure.colorbar(points, ax=axes, label="ratio d_lt / (d_st + 1e-4)")
    axes.set_xlim(west, east)
    axes.set_ylim(south, north)
    axes.set_xlabel("longitude")
    axes.set_ylabel("latitude")
    axes.legend(loc="upper right")
    axes.set_title(f"{len(result.location_id)} locations, {int(changed.sum())} labelled changed")
    return figure


def quicklook(
    image, grid, *, bands=(), scale="auto", dn_offset=-1.0, max_side: int = 600
) -> np.ndarray:
    """An [h, w, 3] uint8 picture of ``image`` on ``grid``, at most ``max_side`` px: its B4, B3,
    B2 bands where it has them (else its first band in grey), each stretched between its 2nd and
    98th percentiles. ``bands`` names the image's files in order (the encoder's bands); without
    them the bands are read from the file names."""
    import rasterio
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    factor = max(1, math.ceil(max(grid.width, grid.height) / max_side))
    width, height = math.ceil(grid.width / factor), math.ceil(grid.height / factor)
    transform = grid.transform @ Affine.scale(grid.width / width, grid.height / height)
    names = list(bands) or [geotiff.band_name(os.path.basename(p)) for p, _ in image.files]
    order = [names.index(b) for b in ("B4", "B3", "B2") if b in names]
    chosen = [image.files[i] for i in order] if len(order) == 3 else [image.files[0]] * 3
    channels = []
    for path, band in chosen:
        with rasterio.open(path) as dataset:
            with WarpedVRT(
                dataset,
                crs=grid.crs,
                transform=transform,
                width=width,
                height=height,
                resampling=Resampling.average,
            ) as warped:
                values = warped.read(band)
            on_scale = sentinel2.scale_of(values, scale)
            absent = geotiff.no_data(values, dataset.nodata, on_scale)
        values = np.where(absent, np.zeros((), values.dtype), values)  # as `read_tiles` does
        offset = geotiff.resolve_offset(image, dn_offset) if on_scale == "dn" else 0.0
        channels.append(sentinel2.to_archive_uint8(values, on_scale, offset=offset, name=path))
    picture = np.stack(channels, axis=-1).astype(np.float64)
    low, high = np.percentile(picture, 2), np.percentile(picture, 98)
    return np.clip((picture - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)


def scene_figure(result: SceneChange, *, scale="auto", dn_offsets=(-1.0, -1.0)):
    """The two dates (of ``result.pair``) and the tiles' ratio, changed tiles outlined in red."""
    pair = result.pair
    west, south, east, north = pair.grid.bounds
    extent = (west, east, south, north)
    figure = _figure((15, 4.8), layout="constrained")
    for index, (title, image, offset) in enumerate(
        (("before", pair.before, dn_offsets[0]), ("after", pair.after, dn_offsets[1]))
    ):
        axes = figure.add_subplot(1, 3, index + 1)
        picture = quicklook(image, pair.grid, bands=pair.bands, scale=scale, dn_offset=offset)
        axes.imshow(picture, extent=extent)
        name = image.name if len(image.name) <= 48 else f"...{image.name[-45:]}"
        axes.set_title(f"{title}: {name}", fontsize=9)
    axes = figure.add_subplot(1, 3, 3)
    ratio, changed = result.rasters()
    tile_width, tile_height = (result.tile * r for r in pair.grid.res)
    ratio_extent = (west, west + ratio.shape[1] * tile_width)
    ratio_extent += (north - ratio.shape[0] * tile_height, north)
    shown = axes.imshow(ratio, extent=ratio_extent, cmap="viridis", interpolation="nearest")
    rows, cols = np.nonzero(changed == 1)
    for r, c in zip(rows, cols, strict=True):
        x, y = west + c * tile_width, north - (r + 1) * tile_height
        axes.add_patch(_rectangle(x, y, tile_width, tile_height))
    axes.set_xlim(west, east)
    axes.set_ylim(south, north)
    figure.colorbar(shown, ax=axes, shrink=0.8, label="ratio: distance / scene median")
    left_out = int((~result.usable).sum())
    axes.set_title(
        f"{int(result.changed.sum())} of {int(result.usable.sum())} tiles changed "
        f"(ratio > {result.threshold:.3g})" + (f", {left_out} without data" if left_out else ""),
        fontsize=9,
    )
    for axes in figure.axes[:3]:
        axes.ticklabel_format(useOffset=False, style="plain")
        axes.locator_params(nbins=4)
        axes.tick_params(labelsize=7)
        axes.set_xlabel(f"x, y in {pair.grid.crs.to_string()}", fontsize=8)
    return figure


def _rectangle(x, y, width, height):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), width, height, fill=False, edgecolor="tab:red", linewidth=1.2)


def location_histograms(result: ChangeMap):
    """`histogram_figure` of a map of locations: d_lt, d_st and the ratio."""
    others = {"d_lt": result.d_lt, "d_st": result.d_st}
    return histogram_figure(result.ratio, result.changed, result.threshold, others)


def scene_histograms(result: SceneChange):
    """`histogram_figure` of a map of tiles: the distance and the ratio of the usable tiles."""
    usable = result.usable
    others = {"distance": result.distance[usable]}
    return histogram_figure(result.ratio[usable], result.changed[usable], result.threshold, others)


def histogram_figure(ratio, changed, threshold: float, others: dict):
    """Histograms of the ratio (the threshold marked) and of ``others`` (name -> values), split by
    label; bins and axes fitted to the data."""
    panels = {**others, "ratio": ratio}
    figure = _figure((4 * len(panels), 4))
    for index, (name, values) in enumerate(panels.items()):
        axes = figure.add_subplot(1, len(panels), index + 1)
        low, high = float(values.min()), float(values.max())
        if high <= low:  # a single value: one bin around it
            low, high = low - 0.5, high + 0.5
        edges = np.histogram_bin_edges(values, bins="auto", range=(low, high))
        for label, colour in ((False, "tab:blue"), (True, "tab:red")):
            chosen = values[changed == label]
            axes.hist(
                chosen,
                bins=edges,
                color=colour,
                alpha=0.6,
                label=f"{'changed' if label else 'not changed'} ({chosen.size})",
            )
        if name == "ratio" and math.isfinite(threshold):
            axes.axvline(threshold, color="black", linestyle="--", label=f"{threshold:.3g}")
        axes.set_xlim(low, high)
        axes.set_xlabel(name)
        axes.set_ylabel("count")
        axes.legend()
    return figure


# ----------------------------------------------------------------------------- the task


def check_task(settings) -> None:
    """Before any work: a map of an archive or records needs its source."""
    c = settings.change_map
    if c.resolved_kind in ("archive", "records") and not c.source:
        raise SettingsError(
            f"config.change_map.source: a change map of kind {c.resolved_kind!r} needs the "
            "archive or records to map (or set change_map.before and .after to compare two scenes)"
        )


def run_task(settings, workdir) -> dict:
    """Task `change_map`, on every process of a run (each embeds its share; process 0 draws)."""
    c, workdir = settings.change_map, Workdir.of(workdir)
    kind, process = c.resolved_kind, multihost.current()
    folder = storage.path(c.output or workdir.change_map)
    # The workdir's own change map is this task's output: a rerun replaces it. One written to
    # change_map.output is replaced only with change_map.overwrite.
    overwrite = c.overwrite or not c.output
    names = SCENE_FILES if kind == "scenes" else LOCATION_FILES
    refuse_existing(folder, names, overwrite)
    if overwrite and process.primary and any(p.exists() for p in _paths(folder, names).values()):
        print(f"change_map: replacing the change map of an earlier run in {folder}", flush=True)
    encoder = c.encoder or os.fspath(workdir.encoder)
    if kind == "pretraining":
        if not process.primary:
            return {"skipped": "process 0 draws a pretraining run's map"}
        result = from_pretraining(
            Workdir(c.source or workdir.root).change_labels, seed=settings.seed
        )
        return _report(write(result, folder, land_mask=c.land_mask, overwrite=overwrite), result)
    cache, base_url = settings.pretrained.cache_dir, settings.pretrained.base_url
    share = (process.index, process.count)
    if kind == "scenes":
        model, normalization, image_size = embed_lib.load_encoder(
            encoder, cache=cache, base_url=base_url
        )
        pair = ScenePair.find(c.before, c.after, normalization, c.bands)
        offsets = (c.before_dn_offset, c.after_dn_offset)
        computed = {}

        def both():
            computed["dates"] = scene_embeddings(
                pair,
                model,
                normalization,
                image_size=image_size,
                scale=c.scale,
                dn_offsets=offsets,
                batch_size=c.batch_size,
                share=share,
            )
            return computed["dates"][0]

        about = {"before": os.fspath(c.before), "after": os.fspath(c.after), "encoder": encoder}
        _, rows = embed_lib.write_dataset(
            both, folder / "embeddings_before", overwrite=overwrite, about=about,
            what="change_map",
        )  # fmt: skip
        embed_lib.write_dataset(
            lambda: computed["dates"][1], folder / "embeddings_after", overwrite=overwrite,
            about=about, what="change_map",
        )  # fmt: skip
        if not process.primary:
            return {"rows": rows, "process": process.index}
        result = from_scene_embeddings(
            embed_lib.Embeddings.read(folder / "embeddings_before"),
            embed_lib.Embeddings.read(folder / "embeddings_after"),
            pair.grid,
            image_size,
            max_nodata=c.max_nodata,
            seed=settings.seed,
        )
        result = dataclasses.replace(result, pair=pair)
        paths = write_scenes(result, folder, scale=c.scale, dn_offsets=offsets, overwrite=overwrite)
        left_out = int((~result.usable).sum())
        changed = int(result.changed.sum())
        print(
            f"change_map: {changed} of {int(result.usable.sum())} tiles changed (ratio > "
            f"{result.threshold:.3g}); {left_out} left out for missing data"
        )
        return {**paths, "tiles": len(result.ids), "changed": changed, "left_out": left_out}

    def share_of_embeddings():
        return embed_lib.embed(
            c.source,
            encoder,
            kind=kind,
            builder_config=c.builder_config,
            batch_size=c.batch_size,
            cache=cache,
            base_url=base_url,
            share=share,
        )

    about = {"source": os.fspath(c.source), "encoder": encoder}
    _, rows = embed_lib.write_dataset(
        share_of_embeddings, folder / "embeddings", overwrite=overwrite, about=about,
        what="change_map",
    )  # fmt: skip
    if not process.primary:
        return {"rows": rows, "process": process.index}
    result = from_embeddings(embed_lib.Embeddings.read(folder / "embeddings"), seed=settings.seed)
    return _report(write(result, folder, land_mask=c.land_mask, overwrite=overwrite), result)


def _report(paths: dict, result: ChangeMap) -> dict:
    changed = int(result.changed.sum())
    print(
        f"change_map: {changed} of {len(result.location_id)} locations changed (ratio > "
        f"{result.threshold:.3g})"
    )
    return {**paths, "locations": len(result.location_id), "changed": changed}
