"""Embeddings of Sentinel-2 images with any encoder export: GeoTIFFs, a CACo archive, or records
(task `embed`).

Every image becomes one or more `Tile`s: raw values on the archive's scale (uint8 = reflectance x
255), in the band order of the export's input normalisation (`export.input_normalization`), with an
id and the (lat, lon) of its centre. Tiles are batched onto the devices (`runtime.inference`),
where the normalisation is applied (stretch, resize to the export's ``image_size`` when a tile has
another size, standardize) and the encoder gives the pooled features.

Sources (``config.embed.kind``):
- ``geotiff``: a file or a folder of Sentinel-2 GeoTIFF or JPEG 2000 files (`data.geotiff`: band
  files, multi-band images, tiling, digital numbers to the archive's scale).
- ``archive``: every acquisition of a CACo archive (`data.archive`), whole.
- ``records``: every acquisition of prepared ``caco_geography`` records, whole.

`Embeddings.write` saves ``<stem>.npz`` (ids, embeddings, lat, lon, window) and ``<stem>.parquet``
(the same columns, ``embedding`` a fixed-size list).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from caco_jax.data import geotiff, layout
from caco_jax.data.geotiff import InputError, Tile
from caco_jax.data.normalization import Normalization, merge_band_groups
from caco_jax.models import export
from caco_jax.runtime import inference, progress, storage
from caco_jax.runtime.workdir import Workdir
from caco_jax.settings import Section, SettingsError

DEFAULT_IMAGE_SIZE = 224
KINDS = ("geotiff", "archive", "records")


@dataclasses.dataclass(frozen=True)
class EmbedSettings(Section):
    """`config.embed`: what to embed, with which encoder, and where the embeddings go."""

    SECTION = "embed"
    kind: str = "geotiff"  # geotiff (a file or folder), archive (CACo), records (prepared)
    source: str = ""  # the GeoTIFF(s), archive, or records data_dir
    builder_config: str = "rgb"  # records: rgb or all_bands
    encoder: str = ""  # an official name or an export path; "" = <workdir>/encoder
    output: str = ""  # file stem; "" = <workdir>/embeddings (.npz and .parquet)
    bands: tuple[str, ...] = ()  # band order of multi-band GeoTIFFs without band descriptions
    scale: str = "auto"  # raw -> archive uint8: auto (by dtype), uint8, reflectance_10000
    dn_offset: float = 0.0  # subtracted from uint16 DNs (1000 for L1C/L2A baseline >= 04.00)
    tile_stride: int = 0  # GeoTIFF tiles' stride in pixels; 0 = the tile size
    batch_size: int = 64
    overwrite: bool = False

    def validate(self) -> None:
        self.require(self.kind in KINDS, "kind", f"one of {KINDS}")
        self.require(
            self.builder_config in ("rgb", "all_bands"), "builder_config", "rgb or all_bands"
        )
        self.require(self.scale in geotiff.SCALES, "scale", f"one of {geotiff.SCALES}")
        self.require(self.dn_offset >= 0, "dn_offset", "must be >= 0")
        self.require(self.tile_stride >= 0, "tile_stride", "must be >= 0 (0 = the tile size)")
        self.require(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclasses.dataclass
class Embeddings:
    ids: list[str]
    embeddings: np.ndarray  # [N, D] float32
    lat: np.ndarray  # [N] float64
    lon: np.ndarray
    window: np.ndarray  # [N] int64
    # [N] float32: the share of each tile's pixels marked nodata (GeoTIFFs; 0 elsewhere)
    nodata_fraction: np.ndarray | None = None

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
        with io.BytesIO() as f:  # written whole, then renamed into place (a rerun replaces it)
            np.savez(
                f,
                ids=np.asarray(self.ids, dtype=str),
                embeddings=self.embeddings,
                lat=self.lat,
                lon=self.lon,
                window=self.window,
                nodata_fraction=self._nodata_fraction(),
            )
            storage.replace_bytes(paths["npz"], f.getvalue())
        dim = self.embeddings.shape[1]
        table = pa.table(
            {
                "id": pa.array(self.ids, pa.string()),
                "lat": pa.array(self.lat, pa.float64()),
                "lon": pa.array(self.lon, pa.float64()),
                "window": pa.array(self.window, pa.int64()),
                "nodata_fraction": pa.array(self._nodata_fraction(), pa.float32()),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(self.embeddings.reshape(-1), pa.float32()), dim
                ),
            }
        )
        with io.BytesIO() as f:
            pq.write_table(table, f)
            storage.replace_bytes(paths["parquet"], f.getvalue())
        return {kind: os.fspath(path) for kind, path in paths.items()}

    def _nodata_fraction(self) -> np.ndarray:
        if self.nodata_fraction is None:
            return np.zeros(len(self.ids), np.float32)
        return np.asarray(self.nodata_fraction, np.float32)


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
    frozen = inference.FrozenModel(
        model, EncoderInput(normalization, image_size), batch_size=batch_size
    )
    ids, lat, lon, window, features, nodata = [], [], [], [], [], []
    pending: list[Tile] = []

    def flush():
        # One batch of tiles of one shape (padded by FrozenModel: each shape compiles once).
        features.append(frozen(np.stack([t.pixels for t in pending])))
        for t in pending:
            ids.append(t.id)
            lat.append(t.lat)
            lon.append(t.lon)
            window.append(t.window)
            nodata.append(t.nodata_fraction)
        pending.clear()

    for tile in progress.bar(tiles, total=total, desc="embeddings", unit="image"):
        if tile.pixels.shape[-1] != normalization.num_bands:
            raise InputError(
                f"{tile.id}: {tile.pixels.shape[-1]} bands, the encoder takes "
                f"{normalization.num_bands} ({', '.join(normalization.bands)})"
            )
        full = len(pending) == frozen.batch_size
        if pending and (full or tile.pixels.shape != pending[0].pixels.shape):
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
        nodata_fraction=np.asarray(nodata, np.float32),
    )


@dataclasses.dataclass(frozen=True)
class EncoderInput:
    """Raw tiles -> the encoder's input on the device: the export's stretch, a bilinear resize to
    ``image_size`` when the tiles have another size, then its standardisation. Hashable: it keys
    the compiled function (`runtime.inference`)."""

    normalization: Normalization
    image_size: int

    def __call__(self, raw):
        x = self.normalization.stretch(raw, jnp)
        size = self.image_size
        if x.shape[1:3] != (size, size):
            x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "bilinear")
        return self.normalization.standardize(x, jnp)


# ----------------------------------------------------------------------------- archive, records


def _select_bands(groups: dict, wanted: Sequence[str], feature_bands=None) -> np.ndarray:
    """uint8 [..., h, w, C] of the ``wanted`` bands of pixel groups, on the finest group's grid
    (`normalization.merge_band_groups`)."""
    try:
        return np.asarray(merge_band_groups(groups, wanted, feature_bands)).astype(np.uint8)
    except ValueError as error:
        raise InputError(str(error)) from None


def record_tiles(data_dir: str, builder_config: str, normalization: Normalization):
    """Every acquisition of prepared records, whole, and how many records there are."""
    from caco_jax.data import dataset

    source = dataset.open_records(data_dir, builder_config=builder_config)

    def tiles():
        for index in range(len(source)):
            arrays = source[index]
            pixels = arrays["pixels"]
            groups = pixels if isinstance(pixels, dict) else {"rgb": pixels}
            try:
                selected = _select_bands(groups, normalization.bands)
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
                        {g: acquisition[g] for g in groups}, normalization.bands, groups
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
    keywords are those of `geotiff.geotiff_tiles` / `record_tiles`, and the cache and server of
    `pretrained.load_pretrained`."""
    from caco_jax.models import pretrained

    model, metadata = pretrained.load_pretrained(
        encoder, cache=cache, base_url=base_url or pretrained.OFFICIAL_BASE_URL
    )
    normalization = export.input_normalization(metadata)
    image_size = int(metadata.get(export.IMAGE_SIZE_KEY) or DEFAULT_IMAGE_SIZE)
    if kind == "geotiff":
        tiles, total = geotiff.geotiff_tiles(
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


def check_task(settings) -> None:
    """Before any work: the embed task needs a source."""
    if not settings.embed.source:
        raise SettingsError("config.embed.source: the embed task needs the images to embed")


def run_task(settings, workdir) -> dict:
    """Task `embed`: `config.embed.source` -> `<output>.npz` and `<output>.parquet`."""
    e, workdir = settings.embed, Workdir.of(workdir)
    result = embed(
        e.source,
        e.encoder or workdir.encoder,
        kind=e.kind,
        builder_config=e.builder_config,
        bands=tuple(e.bands),
        scale=e.scale,
        dn_offset=e.dn_offset,
        tile_stride=e.tile_stride,
        batch_size=e.batch_size,
        cache=settings.pretrained.cache_dir,
        base_url=settings.pretrained.base_url,
    )
    # The workdir's own embeddings are this task's output: a rerun replaces them. Those written to
    # embed.output are replaced only with embed.overwrite.
    paths = result.write(e.output or workdir.embeddings, overwrite=e.overwrite or not e.output)
    print(f"embed: {len(result.ids)} embeddings of dimension {result.embeddings.shape[1]}")
    return {**paths, "count": len(result.ids), "dim": int(result.embeddings.shape[1])}
