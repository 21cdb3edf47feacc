"""Change maps from an encoder alone: which locations of an archive or records changed.

Pretraining estimates change with the key encoder's head-1 embeddings of augmented views
(`pretrain.change`). An export holds only the encoder, so this module computes a deterministic
variant on its pooled features, one decision per location:

  e_t     the L2-normalised pooled features of acquisition t (whole, no augmentation, eval mode)
  d_lt    || mean of the early window's e_t - mean of the late window's e_t ||
  d_st    the mean of || e_s - e_t || over all pairs s != t within the same window (both windows)
  ratio   d_lt / (d_st + 1e-4), as `change.change_statistics`
  changed `change.fit_change_labels` on the ratios (a seeded 2-component Gaussian mixture over the
          locations; the component with the higher mean is "changed")

Locations with fewer than two acquisitions in a window have no d_st and are skipped with a note.
With ``kind="pretraining"`` the map is drawn from a CACo run's own estimate instead
(`from_pretraining`).
Outputs in the output folder: ``change_map.csv`` and ``change_map.geojson`` (location_id, lat, lon
of the location's centre, d_lt, d_st, ratio, changed), ``change_map.png`` (the locations coloured by
ratio over the offline land mask, axes fitted to the locations) and ``histograms.png`` (d_lt, d_st,
ratio by label, bins and axes from the data).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os

import numpy as np

from caco_jax.pretrain import change
from caco_jax.products import embed as embed_lib
from caco_jax.runtime import storage
from caco_jax.runtime.workdir import Workdir
from caco_jax.settings import Section, SettingsError

EPS = 1e-4
FILES = ("change_map.csv", "change_map.geojson", "change_map.png", "histograms.png")
KINDS = ("archive", "records", "pretraining")
PNG = {"bbox_inches": "tight"}  # how the figures are saved


@dataclasses.dataclass(frozen=True)
class ChangeMapSettings(Section):
    """`config.change_map`: the source, the encoder and the output of a change map; the mixture
    that labels the ratios is seeded by ``config.seed``."""

    SECTION = "change_map"
    # archive (CACo, any form), records (prepared), or pretraining (a CACo run's own estimate)
    kind: str = "archive"
    source: str = ""  # the archive, the records data_dir, or the run's workdir ("" = this one)
    builder_config: str = "rgb"  # records: rgb or all_bands
    encoder: str = ""  # an official name or an export path; "" = <workdir>/encoder
    output: str = ""  # folder; "" = <workdir>/change_map
    batch_size: int = 64
    land_mask: bool = True  # draw land under the map (global-land-mask, ~1 GB while drawing)
    overwrite: bool = False

    def validate(self) -> None:
        self.require(self.kind in KINDS, "kind", f"one of {KINDS}")
        self.require(
            self.builder_config in ("rgb", "all_bands"), "builder_config", "rgb or all_bands"
        )
        self.require(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclasses.dataclass
class ChangeMap:
    location_id: list[str]
    lat: np.ndarray
    lon: np.ndarray
    d_lt: np.ndarray
    d_st: np.ndarray
    ratio: np.ndarray
    changed: np.ndarray  # bool

    def rows(self) -> list[dict]:
        return [
            {
                "location_id": loc,
                "lat": float(self.lat[i]),
                "lon": float(self.lon[i]),
                "d_lt": float(self.d_lt[i]),
                "d_st": float(self.d_st[i]),
                "ratio": float(self.ratio[i]),
                "changed": bool(self.changed[i]),
            }
            for i, loc in enumerate(self.location_id)
        ]


def location_statistics(embeddings: embed_lib.Embeddings) -> tuple[dict, list[str]]:
    """{location id: (lat, lon, d_lt, d_st)} from per-acquisition embeddings whose ids are
    ``<location>/<time>`` and windows 0/1, plus notes on skipped locations."""
    features = embeddings.embeddings.astype(np.float64)
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(embeddings.ids):
        groups.setdefault(item.split("/")[0], []).append(index)
    statistics, notes = {}, []
    for location, indices in groups.items():
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
        raise ValueError("change_map: no location has 2 acquisitions in each window")
    ids = list(statistics)
    lat, lon, d_lt, d_st = (np.asarray(column) for column in zip(*statistics.values(), strict=True))
    ratio = d_lt / (d_st + EPS)
    values = np.stack([d_lt, d_st, ratio], axis=1)
    changed = change.fit_change_labels(values, np.ones(len(ids), bool), seed=seed)
    return ChangeMap(ids, lat, lon, d_lt, d_st, ratio, changed)


def from_pretraining(labels_csv) -> ChangeMap:
    """The change map of a CACo pretraining run from its own estimate, ``change/labels.csv``
    (the key encoder's head-1 running statistics and the labels fitted at the last epoch end, as
    the official estimator): per location the mean d_lt, d_st and r of its seen items, changed when
    either of its items is labelled changed."""
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
        raise ValueError(f"change_map: {labels_csv} has no seen item")
    ids = list(per_location)
    means = np.asarray([np.mean(per_location[k]["values"], axis=0) for k in ids])
    return ChangeMap(
        ids,
        np.asarray([per_location[k]["lat"] for k in ids]),
        np.asarray([per_location[k]["lon"] for k in ids]),
        means[:, 0],
        means[:, 1],
        means[:, 2],
        np.asarray([bool(per_location[k]["changed"]) for k in ids]),
    )


def compute(
    source: str,
    encoder: str,
    *,
    kind: str = "archive",
    builder_config: str = "rgb",
    batch_size: int = 64,
    seed: int = 0,
    cache: str = "",
    base_url: str = "",
) -> ChangeMap:
    """The change map of an archive or records (``kind``) with ``encoder`` (name or export), or
    of a pretraining run's own estimate (``kind="pretraining"``, ``source`` its workdir)."""
    if kind == "pretraining":
        return from_pretraining(Workdir(source).change_labels)
    if kind not in ("archive", "records"):
        raise ValueError(f"change_map: kind {kind!r}, expected archive, records or pretraining")
    embeddings = embed_lib.embed(
        source,
        encoder,
        kind=kind,
        builder_config=builder_config,
        batch_size=batch_size,
        cache=cache,
        base_url=base_url,
    )
    return from_embeddings(embeddings, seed=seed)


def write(result: ChangeMap, folder: str, *, land_mask: bool = True, overwrite: bool = False):
    """The CSV, GeoJSON, map and histograms in ``folder`` (local or in a bucket,
    `storage.path`), each written whole under a temporary name and renamed into place, so that a
    crash leaves an earlier file or the new one (`storage.replace_bytes`); returns their paths.
    Existing files are replaced only with ``overwrite``."""
    folder = storage.path(folder)
    paths = {name.replace(".", "_"): folder / name for name in FILES}
    existing = [p for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} already exists (set change_map.overwrite=True to replace it, or "
            "change_map.output to write elsewhere)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    rows = result.rows()
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    storage.replace_text(paths["change_map_csv"], table.getvalue())
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
    plot_map(result, paths["change_map_png"], land_mask=land_mask)
    plot_histograms(result, paths["histograms_png"])
    return {name: os.fspath(path) for name, path in paths.items()}


def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=120)
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


def plot_map(result: ChangeMap, path: str, *, land_mask: bool = True, cells: int = 400) -> str:
    """Writes `map_figure` as a PNG at ``path``."""
    storage.write_png(map_figure(result, land_mask=land_mask, cells=cells), path, **PNG)
    return path


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
    axes.scatter(
        result.lon[result.changed],
        result.lat[result.changed],
        s=60,
        facecolors="none",
        edgecolors="tab:red",
        zorder=3,
        label="changed",
    )
    figure.colorbar(points, ax=axes, label="ratio d_lt / (d_st + 1e-4)")
    axes.set_xlim(west, east)
    axes.set_ylim(south, north)
    axes.set_xlabel("longitude")
    axes.set_ylabel("latitude")
    axes.legend(loc="upper right")
    axes.set_title(
        f"{len(result.location_id)} locations, {int(result.changed.sum())} labelled changed"
    )
    return figure


def plot_histograms(result: ChangeMap, path: str) -> str:
    """Writes `histogram_figure` as a PNG at ``path``."""
    storage.write_png(histogram_figure(result), path, **PNG)
    return path


def histogram_figure(result: ChangeMap):
    """Histograms of d_lt, d_st and the ratio, split by label; bins and axes fitted to the data."""
    figure = _figure((12, 4))
    for index, (name, values) in enumerate(
        (("d_lt", result.d_lt), ("d_st", result.d_st), ("ratio", result.ratio))
    ):
        axes = figure.add_subplot(1, 3, index + 1)
        low, high = float(values.min()), float(values.max())
        if high <= low:  # a single value: one bin around it
            low, high = low - 0.5, high + 0.5
        edges = np.histogram_bin_edges(values, bins="auto", range=(low, high))
        for label, colour in ((False, "tab:blue"), (True, "tab:red")):
            chosen = values[result.changed == label]
            axes.hist(
                chosen,
                bins=edges,
                color=colour,
                alpha=0.6,
                label=f"{'changed' if label else 'not changed'} ({chosen.size})",
            )
        axes.set_xlim(low, high)
        axes.set_xlabel(name)
        axes.set_ylabel("locations")
        axes.legend()
    return figure


def check_task(settings) -> None:
    """Before any work: a map of an archive or records needs its source."""
    c = settings.change_map
    if not c.source and c.kind != "pretraining":
        raise SettingsError(
            f"config.change_map.source: a change map of kind {c.kind!r} needs the archive or "
            "records to map"
        )


def run_task(settings, workdir) -> dict:
    """Task `change_map`: `config.change_map.source` -> the files of `write`."""
    c, workdir = settings.change_map, Workdir.of(workdir)
    result = compute(
        c.source or workdir.root,
        c.encoder or workdir.encoder,
        kind=c.kind,
        builder_config=c.builder_config,
        batch_size=c.batch_size,
        seed=settings.seed,
        cache=settings.pretrained.cache_dir,
        base_url=settings.pretrained.base_url,
    )
    folder = c.output or workdir.change_map
    # The workdir's own change map is this task's output: a rerun replaces it. One written to
    # change_map.output is replaced only with change_map.overwrite.
    replace = c.overwrite or not c.output
    if replace and any((storage.path(folder) / name).exists() for name in FILES):
        print(f"change_map: replacing the change map of an earlier run in {folder}", flush=True)
    paths = write(result, folder, land_mask=c.land_mask, overwrite=replace)
    changed = int(result.changed.sum())
    print(f"change_map: {changed} of {len(result.location_id)} locations labelled changed")
    return {**paths, "locations": len(result.location_id), "changed": changed}
