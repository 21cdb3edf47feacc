"""Embeddings of Sentinel-2 images with any encoder export: GeoTIFFs, a CACo archive, or records.

Every image becomes one or more `Tile`s: raw values on the archive's scale (uint8 = reflectance x
255), in the band order of the export's input normalisation (`export.input_normalization`), with an
id and the (lat, lon) of its centre. Tiles are batched onto the devices, where the normalisation is
applied (stretch, resize to the export's ``image_size`` when a tile has another size,
standardize) and the encoder gives the pooled features.

Sources:
- ``geotiff``: a file or a folder (searched recursively). A folder whose files are named by band
  (``B04.tif``, ``T33TVF_20230612T100031_B04_10m.jp2``, ``B4.tif``, ...) is one scene of single-band
  files, resampled bilinearly to the grid of the finest band; other GeoTIFFs are multi-band images
  whose bands are named by their descriptions, by ``bands``, or else taken in the export's order.
  In a folder of band files, other rasters (an L2A folder's TCI, SCL, AOT, WVP) are ignored, with
  a note. Images are cut into square ``image_size`` px tiles at ``tile_stride`` (the last row and
  column of tiles end at the image's edge, so every pixel is covered); an image narrower than
  that gives tiles of its narrower side, resized to ``image_size`` on the device.
  uint8 values are used as they are; uint16 values are Sentinel-2 L1C / L2A digital numbers
  (reflectance x 10000, after subtracting ``dn_offset``: 1000 for processing baseline 04.00 and
  later), mapped to uint8 as the downloader does.
- ``archive``: every acquisition of a CACo archive (`caco_jax.data.archive`), whole.
- ``records``: every acquisition of prepared ``caco_geography`` records, whole.

`write` saves ``<stem>.npz`` (ids, embeddings, lat, lon, window) and ``<stem>.parquet`` (the same
columns, ``embedding`` a fixed-size list).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from caco_jax import mesh as mesh_lib
from caco_jax import progress, storage
from caco_jax.data import layout
from caco_jax.data.normalization import Normalization
from caco_jax.evaluators import common
from caco_jax.models import export

GEOTIFF_SUFFIXES = (".tif", ".tiff", ".jp2")
DEFAULT_IMAGE_SIZE = 224
# A band token in a file name: B04, B4, B8A, delimited by _ . - or the ends of the name.
_BAND_TOKEN = re.compile(r"(?:^|[_.-])B(0?[1-9]|1[0-2]|8A)(?=[_.-]|$)")


class InputError(ValueError):
    """An input that cannot be embedded with this encoder; the message names the file."""


@dataclasses.dataclass
class Tile:
    id: str
    pixels: np.ndarray  # [h, w, C] raw values on the archive's uint8 scale, export band order
    lat: float
    lon: float
    window: int = -1  # the CACo window of archive / records acquisitions; -1 for GeoTIFFs


@dataclasses.dataclass
class Embeddings:
    ids: list[str]
    embeddings: np.ndarray  # [N, D] float32
    lat: np.ndarray  # [N] float64
    lon: np.ndarray
    window: np.ndarray  # [N] int64

    def write(self, stem: str, *, overwrite: bool = False) -> dict:
        """``<stem>.npz`` and ``<stem>.parquet`` (local or in a bucket, `storage.path`); returns
        their paths."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        paths = {kind: storage.path(f"{os.fspath(stem)}.{kind}") for kind in ("npz", "parquet")}
        for path in paths.values():
            if path.exists() and not overwrite:
                raise FileExistsError(f"{path} already exists (set embed.overwrite to replace it)")
        paths["npz"].parent.mkdir(parents=True, exist_ok=True)
        with paths["npz"].open("wb") as f:
            np.savez(
                f,
                ids=np.asarray(self.ids, dtype=str),
                embeddings=self.embeddings,
                lat=self.lat,
                lon=self.lon,
                window=self.window,
            )
        dim = self.embeddings.shape[1]
        table = pa.table(
            {
                "id": pa.array(self.ids, pa.string()),
                "lat": pa.array(self.lat, pa.float64()),
                "lon": pa.array(self.lon, pa.float64()),
                "window": pa.array(self.window, pa.int64()),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(self.embeddings.reshape(-1), pa.float32()), dim
                ),
            }
        )
        with paths["parquet"].open("wb") as f:
            pq.write_table(table, f)
        return {kind: os.fspath(path) for kind, path in paths.items()}


# ----------------------------------------------------------------------------- the encoder side


def embed_tiles(
    model,
    normalization: Normalization,
    tiles: Iterable[Tile],
    *,
    image_size: int,
    batch_size: int = 64,
    total: int | None = None,
) -> Embeddings:
    """Pooled features of ``tiles`` (eval mode), batched over the devices with a progress bar."""
    mesh = mesh_lib.data_mesh()
    batch_size = common.global_batch_size(batch_size, mesh)
    model.eval()
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    batch_sharding = NamedSharding(mesh, PartitionSpec(common.DATA_AXIS))
    ids, lat, lon, window, features = [], [], [], [], []
    pending: list[Tile] = []

    def flush():
        # One batch of tiles of one shape, padded to batch_size so that each shape compiles once.
        raw = common.pad_batch(np.stack([t.pixels for t in pending]), batch_size)
        pooled = _pooled(
            graphdef, normalization, image_size, state, jax.device_put(raw, batch_sharding)
        )
        features.append(np.asarray(pooled)[: len(pending)])
        for t in pending:
            ids.append(t.id)
            lat.append(t.lat)
            lon.append(t.lon)
            window.append(t.window)
        pending.clear()

    for tile in progress.bar(tiles, total=total, desc="embeddings", unit="image"):
        if tile.pixels.shape[-1] != normalization.num_bands:
            raise InputError(
                f"{tile.id}: {tile.pixels.shape[-1]} bands, the encoder takes "
                f"{normalization.num_bands} ({', '.join(normalization.bands)})"
            )
        if pending and (len(pending) == batch_size or tile.pixels.shape != pending[0].pixels.shape):
            flush()
        pending.append(tile)
    if pending:
        flush()
    dim = model.feature_dim
    return Embeddings(
        ids=ids,
        embeddings=np.concatenate(features) if features else np.zeros((0, dim), np.float32),
        lat=np.asarray(lat, np.float64),
        lon=np.asarray(lon, np.float64),
        window=np.asarray(window, np.int64),
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _pooled(graphdef, normalization: Normalization, image_size: int, state, raw):
    x = normalization.stretch(raw, jnp)
    if x.shape[1:3] != (image_size, image_size):
        x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[-1]), "bilinear")
    return nnx.merge(graphdef, state)(normalization.standardize(x, jnp))


# ----------------------------------------------------------------------------- GeoTIFFs


def band_name(file_name: str) -> str | None:
    """The Sentinel-2 band a file name names (``T33TVF_..._B04_10m.jp2`` -> ``B4``), or None."""
    stem = os.path.basename(file_name)
    for suffix in GEOTIFF_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    matches = {m.group(1).lstrip("0") for m in _BAND_TOKEN.finditer(stem)}
    return f"B{matches.pop()}" if len(matches) == 1 else None


@dataclasses.dataclass(frozen=True)
class Image:
    """One georeferenced image to tile: its band files (one per band of the encoder's input, in
    that order; a multi-band file appears once per band with its 1-based band index)."""

    name: str
    files: tuple[tuple[str, int], ...]


def find_images(
    source: str, normalization: Normalization, bands: Sequence[str] = ()
) -> list[Image]:
    """The images under ``source`` (a GeoTIFF file or a folder), their bands matched to the
    encoder's input; raises InputError naming the file or folder that does not fit."""
    if os.path.isfile(source):
        return [_multiband_image(source, normalization, bands)]
    if not os.path.isdir(source):
        raise InputError(f"{source}: no such GeoTIFF file or folder")
    images = []
    for folder, subfolders, files in os.walk(source):
        subfolders.sort()
        rasters = sorted(f for f in files if f.lower().endswith(GEOTIFF_SUFFIXES))
        by_band: dict[str, list[str]] = {}
        for name in rasters:
            band = band_name(name)
            if band is not None:
                by_band.setdefault(band, []).append(os.path.join(folder, name))
        if by_band:
            images.append(_band_files_image(folder, by_band, normalization))
            others = [name for name in rasters if band_name(name) is None]
            if others:  # e.g. an L2A folder's TCI, SCL, AOT, WVP rasters
                print(f"embed: {folder}: not a band, ignored: {', '.join(others)}", flush=True)
        else:
            images += [
                _multiband_image(os.path.join(folder, name), normalization, bands)
                for name in rasters
            ]
    if not images:
        raise InputError(f"{source}: no GeoTIFF ({', '.join(GEOTIFF_SUFFIXES)}) found")
    return images


def _band_files_image(folder: str, by_band: dict, normalization: Normalization) -> Image:
    duplicated = {b: f for b, f in by_band.items() if len(f) > 1}
    if duplicated:
        raise InputError(f"{folder}: several files for one band: {duplicated}")
    missing = [b for b in normalization.bands if b not in by_band]
    if missing:
        raise InputError(
            f"{folder}: no file for band(s) {', '.join(missing)} (the encoder takes "
            f"{', '.join(normalization.bands)}; found {', '.join(sorted(by_band))})"
        )
    return Image(folder, tuple((by_band[b][0], 1) for b in normalization.bands))


def _multiband_image(path: str, normalization: Normalization, bands: Sequence[str]) -> Image:
    import rasterio

    with rasterio.open(path) as dataset:
        count, descriptions = dataset.count, dataset.descriptions
    if count != normalization.num_bands:
        raise InputError(
            f"{path}: {count} band(s), but the encoder takes {normalization.num_bands} "
            f"({', '.join(normalization.bands)})"
        )
    names = list(bands) or [d for d in descriptions if d]
    if not names:
        names = list(normalization.bands)  # unnamed bands: assumed in the encoder's order
    names = [band_name(n) or n for n in names]
    if len(names) != count or set(names) != set(normalization.bands):
        raise InputError(
            f"{path}: bands named {names}, expected {count} named {list(normalization.bands)} "
            "(set embed.bands to the file's band order)"
        )
    return Image(path, tuple((path, names.index(b) + 1) for b in normalization.bands))


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis: every ``stride`` px, plus one ending at the edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    return starts if starts[-1] == length - tile else [*starts, length - tile]


def read_tiles(
    image: Image,
    *,
    tile: int,
    stride: int = 0,
    scale: str = "auto",
    dn_offset: float = 0.0,
) -> Iterator[Tile]:
    """The tiles of ``image`` on the grid of its finest band, as archive-scale raw values."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    datasets = [rasterio.open(path) for path, _ in image.files]
    try:
        reference = max(range(len(datasets)), key=lambda i: datasets[i].width)
        grid = datasets[reference]
        for (path, _), dataset in zip(image.files, datasets, strict=True):
            if dataset.crs is None:
                raise InputError(f"{path}: no CRS (expected a georeferenced GeoTIFF)")
            if dataset.crs != grid.crs:
                raise InputError(
                    f"{path}: CRS {dataset.crs} differs from {grid.crs} of "
                    f"{image.files[reference][0]} (the bands of an image must share one grid)"
                )
            # Same footprint to within half a pixel of the finest band.
            if not np.allclose(dataset.bounds, grid.bounds, rtol=0, atol=0.5 * min(grid.res)):
                raise InputError(
                    f"{path}: bounds {tuple(dataset.bounds)} differ from {tuple(grid.bounds)} of "
                    f"{image.files[reference][0]}"
                )
        height, width = grid.height, grid.width
        size = min(tile, height, width)
        stride = stride or size
        h = w = size
        for row in tile_origins(height, size, stride):
            for col in tile_origins(width, size, stride):
                channels = []
                for (path, band), dataset in zip(image.files, datasets, strict=True):
                    fx, fy = dataset.width / width, dataset.height / height
                    window = Window(col * fx, row * fy, w * fx, h * fy)
                    values = dataset.read(
                        band, window=window, out_shape=(h, w), resampling=Resampling.bilinear
                    )
                    channels.append(_archive_scale(values, path, scale, dn_offset))
                lat, lon = _lat_lon(grid, row + h / 2.0, col + w / 2.0)
                yield Tile(
                    id=f"{image.name}:{row}:{col}",
                    pixels=np.stack(channels, axis=-1),
                    lat=lat,
                    lon=lon,
                )
    finally:
        for dataset in datasets:
            dataset.close()


def _archive_scale(values: np.ndarray, path: str, scale: str, dn_offset: float) -> np.ndarray:
    if scale == "auto":
        if values.dtype == np.uint8:
            scale = "uint8"
        elif values.dtype == np.uint16:
            scale = "reflectance_10000"
        else:
            raise InputError(
                f"{path}: {values.dtype} values; expected uint8 (the archive's scale) or uint16 "
                "(Sentinel-2 digital numbers), or set embed.scale"
            )
    if scale == "uint8":
        return values.astype(np.uint8)
    from caco_jax.download.downloader import to_uint8

    return to_uint8(np.maximum(values.astype(np.float64) - dn_offset, 0.0))


def _lat_lon(dataset, row: float, col: float) -> tuple[float, float]:
    x, y = dataset.transform @ (col, row)
    if not dataset.crs.is_geographic:
        from rasterio.warp import transform

        xs, ys = transform(dataset.crs, "EPSG:4326", [x], [y])
        x, y = xs[0], ys[0]
    return float(y), float(x)


def geotiff_tiles(
    source: str,
    normalization: Normalization,
    *,
    tile: int,
    stride: int = 0,
    bands: Sequence[str] = (),
    scale: str = "auto",
    dn_offset: float = 0.0,
) -> tuple[Iterator[Tile], int]:
    """The tiles of every image under ``source`` and how many there are."""
    images = find_images(source, normalization, bands)
    total = sum(_tile_count(image, tile, stride) for image in images)
    tiles = (
        t
        for image in images
        for t in read_tiles(image, tile=tile, stride=stride, scale=scale, dn_offset=dn_offset)
    )
    return tiles, total


def _tile_count(image: Image, tile: int, stride: int) -> int:
    import rasterio

    shapes = []
    for path, _ in image.files:
        with rasterio.open(path) as dataset:
            shapes.append((dataset.width, dataset.height))
    width, height = max(shapes)
    size = min(tile, height, width)
    stride = stride or size
    return len(tile_origins(height, size, stride)) * len(tile_origins(width, size, stride))


# ----------------------------------------------------------------------------- archive, records


def _select_bands(
    groups: dict[str, np.ndarray], group_bands: dict[str, Sequence[str]], wanted: Sequence[str]
) -> np.ndarray:
    """[..., h, w, C] of the ``wanted`` bands, coarser groups upsampled bilinearly (and rounded,
    as `augment.merge_band_groups` does) to the finest group's grid."""
    finest = max(groups.values(), key=lambda a: a.shape[-2])
    height, width = finest.shape[-3:-1]
    channels = {}
    for group, bands in group_bands.items():
        if group not in groups:
            continue
        x = np.asarray(groups[group])
        if x.shape[-3:-1] != (height, width):
            shape = (*x.shape[:-3], height, width, x.shape[-1])
            x = np.asarray(
                jnp.round(jax.image.resize(jnp.asarray(x, jnp.float32), shape, "linear"))
            )
        for channel, band in enumerate(bands):
            channels[band] = x[..., channel]
    missing = [b for b in wanted if b not in channels]
    if missing:
        raise InputError(f"bands {missing} are not in the source (it has {sorted(channels)})")
    return np.stack([channels[b] for b in wanted], axis=-1).astype(np.uint8)


def record_tiles(data_dir: str, builder_config: str, normalization: Normalization):
    """Every acquisition of prepared records, whole, and how many records there are."""
    from caco_jax.data import records

    source = records.open_records(data_dir, builder_config=builder_config)
    group_bands = {"rgb": layout.RGB_BANDS, **layout.GROUP_BANDS}

    def tiles():
        for index in range(len(source)):
            arrays = source[index]
            pixels = arrays["pixels"]
            groups = pixels if isinstance(pixels, dict) else {"rgb": pixels}
            try:
                selected = _select_bands(groups, group_bands, normalization.bands)
            except InputError as error:
                raise InputError(f"{data_dir} ({builder_config} records): {error}") from None
            for t in range(selected.shape[0]):
                yield Tile(
                    id=f"{arrays['location_id']}/{arrays['date'][t]}",
                    pixels=selected[t],
                    lat=arrays["lat"],
                    lon=arrays["lon"],
                    window=int(arrays["window"][t]),
                )

    return tiles(), None


def archive_tiles(path: str, normalization: Normalization):
    """Every usable acquisition of a CACo archive, whole (unusable ones are skipped and named)."""
    from caco_jax.data import archive

    unknown = [b for b in normalization.bands if b not in layout.BANDS]
    if unknown:
        raise InputError(f"{path}: the encoder's bands {unknown} are not in CACo archives")
    source = archive.find_archive(path)
    groups = {}
    for band in normalization.bands:
        groups.setdefault(f"bands_{layout.BAND_RESOLUTION_M[band]}m", []).append(band)
    groups = {group: tuple(bands) for group, bands in groups.items()}
    keep = frozenset(layout.band_file(b) for b in normalization.bands) | {layout.METADATA_FILE}

    def tiles():
        for location in archive.read_locations(source, keep):
            decoded = archive.decode_location(location, groups)
            for product_id, action, reason in decoded.issues:
                print(f"embed: {location.location_id}/{product_id}: {action}: {reason}", flush=True)
            if decoded.example is None:
                print(f"embed: {location.location_id} skipped: {decoded.skip_reason}", flush=True)
                continue
            example = decoded.example
            for acquisition in example["acquisitions"]:
                yield Tile(
                    id=f"{example['location_id']}/{acquisition['date']}",
                    pixels=_select_bands(
                        {g: acquisition[g] for g in groups}, groups, normalization.bands
                    ),
                    lat=float(example["lat"]),
                    lon=float(example["lon"]),
                    window=int(acquisition["window"]),
                )

    return tiles(), None


# ----------------------------------------------------------------------------- entry points


def embed(
    source: str,
    encoder: str,
    *,
    kind: str = "geotiff",
    builder_config: str = "rgb",
    bands: Sequence[str] = (),
    scale: str = "auto",
    dn_offset: float = 0.0,
    tile_stride: int = 0,
    batch_size: int = 64,
    cache: str = "",
    base_url: str = "",
) -> Embeddings:
    """Embeddings of ``source`` with ``encoder`` (an official name or an export path); the
    keywords are those of `geotiff_tiles` / `record_tiles`, and the cache and server of
    `pretrained.load_pretrained`."""
    from caco_jax import pretrained

    model, metadata = pretrained.load_pretrained(
        encoder, cache=cache, base_url=base_url or pretrained.OFFICIAL_BASE_URL
    )
    normalization = export.input_normalization(metadata)
    image_size = int(metadata.get(export.IMAGE_SIZE_KEY) or DEFAULT_IMAGE_SIZE)
    if kind == "geotiff":
        tiles, total = geotiff_tiles(
            source,
            normalization,
            tile=image_size,
            stride=tile_stride,
            bands=bands,
            scale=scale,
            dn_offset=dn_offset,
        )
    elif kind == "archive":
        tiles, total = archive_tiles(source, normalization)
    elif kind == "records":
        tiles, total = record_tiles(source, builder_config, normalization)
    else:
        raise ValueError(f"embed: kind {kind!r}, expected geotiff, archive or records")
    return embed_tiles(
        model, normalization, tiles, image_size=image_size, batch_size=batch_size, total=total
    )


def run_task(config, workdir: str) -> dict:
    """Task `embed`: `config.embed.source` -> `<output>.npz` and `<output>.parquet`."""
    e = config.embed
    result = embed(
        e.source,
        e.encoder or os.path.join(workdir, "encoder"),
        kind=e.kind,
        builder_config=e.builder_config,
        bands=tuple(e.bands),
        scale=e.scale,
        dn_offset=e.dn_offset,
        tile_stride=e.tile_stride,
        batch_size=e.batch_size,
        cache=config.pretrained.cache_dir,
        base_url=config.pretrained.base_url,
    )
    paths = result.write(e.output or os.path.join(workdir, "embeddings"), overwrite=e.overwrite)
    print(f"embed: {len(result.ids)} embeddings of dimension {result.embeddings.shape[1]}")
    return {**paths, "count": len(result.ids), "dim": int(result.embeddings.shape[1])}
