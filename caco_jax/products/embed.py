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

The task runs on every process of a run, each embedding its share (every n-th row of tiles,
record or location) on its own devices, and writes a partitioned GeoParquet dataset
(`products.geoparquet`): per tile ``id`` (relative to the source), ``lat``, ``lon`` (its centre),
``window``, ``nodata`` (the fraction of its pixels without data), ``embedding`` (a fixed-size
list) and ``geometry`` (the tile's footprint; an archive acquisition's location centre).
`Embeddings.read` reads it back.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from caco_jax.data import geotiff, layout, sentinel2
from caco_jax.data.geotiff import InputError, Tile
from caco_jax.data.normalization import Normalization, merge_band_groups
from caco_jax.models import export
from caco_jax.products import geoparquet
from caco_jax.runtime import inference, multihost, progress, storage
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
    output: str = ""  # the GeoParquet dataset's folder; "" = <workdir>/embeddings
    bands: tuple[str, ...] = ()  # band order of multi-band GeoTIFFs without band descriptions
    scale: str = "auto"  # raw values: auto (by dtype), uint8, dn (digital numbers), reflectance
    # subtracted from digital numbers: 1000 for processing baseline >= 04.00, 0 before; -1 = read
    # from the product's metadata (MTD_MSIL1C.xml / MTD_MSIL2A.xml), else 0 with a note
    dn_offset: float = geotiff.AUTO_OFFSET
    tile_stride: int = 0  # GeoTIFF tiles' stride in pixels; 0 = the tile size
    batch_size: int = 64
    overwrite: bool = False

    def validate(self) -> None:
        self.require(self.kind in KINDS, "kind", f"one of {KINDS}")
        self.require(
            self.builder_config in ("rgb", "all_bands"), "builder_config", "rgb or all_bands"
        )
        self.require(self.scale in geotiff.SCALES, "scale", f"one of {geotiff.SCALES}")
        self.require(
            self.dn_offset >= 0 or self.dn_offset == geotiff.AUTO_OFFSET,
            "dn_offset",
            "must be >= 0, or -1 to read it from the product's metadata",
        )
        self.require(self.tile_stride >= 0, "tile_stride", "must be >= 0 (0 = the tile size)")
        self.require(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclasses.dataclass
class Embeddings:
    """Pooled features of tiles with where each tile is: the rows of the embed task's output."""

    ids: list[str]  # relative to the source: <image>:<row>:<col>, or <location>/<date>
    embeddings: np.ndarray  # [N, D] float32
    lat: np.ndarray  # [N] float64, the tile's centre
    lon: np.ndarray
    window: np.ndarray  # [N] int64: the CACo window; -1 for GeoTIFF tiles
    nodata: np.ndarray  # [N] float32: the fraction of the tile's pixels without data
    footprints: list | None = None  # GeoTIFF tiles: a closed (lon, lat) ring each

    def table(self):
        """This process's rows as a GeoParquet table: a polygon per GeoTIFF tile (its footprint),
        a point per archive or records acquisition (its location's centre)."""
        import pyarrow as pa

        if self.footprints is not None:
            geometries, kind = [geoparquet.polygon_wkb(r) for r in self.footprints], "Polygon"
        else:
            geometries = [
                geoparquet.point_wkb(x, y) for x, y in zip(self.lon, self.lat, strict=True)
            ]
            kind = "Point"
        dim = self.embeddings.shape[1]
        columns = {
            "id": pa.array(self.ids, pa.string()),
            "lat": pa.array(self.lat, pa.float64()),
            "lon": pa.array(self.lon, pa.float64()),
            "window": pa.array(self.window, pa.int64()),
            "nodata": pa.array(self.nodata, pa.float32()),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(self.embeddings.reshape(-1), pa.float32()), dim
            ),
        }
        return geoparquet.table(columns, geometries, kind)

    @classmethod
    def read(cls, folder) -> Embeddings:
        """The embeddings a task wrote into ``folder`` (every process's part)."""
        table = geoparquet.read(folder)
        wkb = table.column(geoparquet.GEOMETRY).to_pylist()
        polygons = bool(wkb) and len(geoparquet.wkb_coordinates(wkb[0])) > 1
        dim = table.schema.field("embedding").type.list_size
        flat = table.column("embedding").combine_chunks().flatten().to_numpy()
        return cls(
            ids=table.column("id").to_pylist(),
            embeddings=flat.reshape(-1, dim).astype(np.float32),
            lat=table.column("lat").to_numpy(),
            lon=table.column("lon").to_numpy(),
            window=table.column("window").to_numpy(),
            nodata=table.column("nodata").to_numpy(),
            footprints=[
                tuple(map(tuple, geoparquet.wkb_coordinates(w))) for w in wkb
            ] if polygons else None,
        )  # fmt: skip


def write_dataset(
    compute: Callable[[], Embeddings],
    folder,
    *,
    overwrite: bool = False,
    about: dict | None = None,
    what: str = "embed",
) -> tuple[str, int]:
    """Runs ``compute`` (this process's share) and writes it into the GeoParquet dataset
    ``folder`` (`products.geoparquet`), every process its part; returns the folder and this
    process's row count. A finished dataset there is refused unless ``overwrite``; process 0
    removes its manifest before any process writes, and writes the new one after all have."""
    process = multihost.current()
    if process.primary:
        geoparquet.begin(folder, overwrite=overwrite, what=what)
    elif geoparquet.exists(folder) and not overwrite:
        raise FileExistsError(f"{folder} already holds {what} (set {what}.overwrite)")
    name = f"caco_jax_{what}_{storage.path(folder).name}"  # the same on every process
    multihost.barrier(f"{name}_begin")
    result = compute()
    geoparquet.write_part(folder, result.table(), process.index, process.count)
    multihost.barrier(f"{name}_written")
    if process.primary:
        geoparquet.finish(folder, process.count, about or {})
    multihost.barrier(f"{name}_finished")
    return os.fspath(folder), len(result.ids)


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
    kept: list[Tile] = []  # the tiles without their pixels
    features: list[np.ndarray] = []
    pending: list[Tile] = []

    def flush():
        # One batch of tiles of one shape (padded by FrozenModel: each shape compiles once).
        features.append(frozen(np.stack([t.pixels for t in pending])))
        kept.extend(dataclasses.replace(t, pixels=None) for t in pending)
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
    rings = bool(kept) and all(t.footprint is not None for t in kept)
    return Embeddings(
        ids=[t.id for t in kept],
        embeddings=np.concatenate(features) if features else np.zeros((0, dim), np.float32),
        lat=np.asarray([t.lat for t in kept], np.float64),
        lon=np.asarray([t.lon for t in kept], np.float64),
        window=np.asarray([t.window for t in kept], np.int64),
        nodata=np.asarray([t.nodata for t in kept], np.float32),
        footprints=[t.footprint for t in kept] if rings else None,
    )


@dataclasses.dataclass(frozen=True)
class EncoderInput:
    """Raw tiles -> the encoder's input on the device: the export's stretch, a bilinear resize to
    ``image_size`` when the tiles have another size, then its standardisation. Hashable: it keys
    the compiled function (`runtime.inference`)."""

    normalization: Normalization
    image_size: int

    def __call__(self, raw):
        return sentinel2.encoder_input(raw, self.normalization, self.image_size, jnp)


# ----------------------------------------------------------------------------- archive, records


def _select_bands(groups: dict, wanted: Sequence[str], feature_bands=None) -> np.ndarray:
    """uint8 [..., h, w, C] of the ``wanted`` bands of pixel groups, on the finest group's grid
    (`normalization.merge_band_groups`)."""
    try:
        return np.asarray(merge_band_groups(groups, wanted, feature_bands)).astype(np.uint8)
    except ValueError as error:
        raise InputError(str(error)) from None


def record_tiles(data_dir: str, builder_config: str, normalization: Normalization, share=(0, 1)):
    """Every acquisition of prepared records, whole (with ``share`` (index, count): every
    count-th record from the index-th)."""
    from caco_jax.data import dataset

    source = dataset.open_records(data_dir, builder_config=builder_config)

    def tiles():
        for index in range(share[0], len(source), share[1]):
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


def archive_tiles(path: str, normalization: Normalization, share=(0, 1)):
    """Every usable acquisition of a CACo archive, whole (unusable ones are skipped and named);
    with ``share`` (index, count), those of every count-th location from the index-th."""
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
        for number, location in enumerate(archive.read_locations(source, keep)):
            if number % share[1] != share[0]:
                continue
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


class Encoder:
    """An encoder with its input recipe, for Python: pooled features of raw Sentinel-2 images.

        encoder = Encoder.load("r18_100k_caco")   # an official name or an export's path
        features = encoder(pixels, scale="dn", offset=1000)   # [N, feature_dim]

    ``pixels`` is [N, H, W, C] with the encoder's bands (`bands`) in that order, on the ``scale``
    of `data.sentinel2` (digital numbers, reflectance or the archive's uint8); the transform is
    `sentinel2`'s, checks included, and H, W other than `image_size` are resized.
    """

    def __init__(self, model, metadata: dict, *, batch_size: int = 64):
        self.model = model
        self.metadata = metadata
        self.normalization = export.input_normalization(metadata)
        self.image_size = int(metadata.get(export.IMAGE_SIZE_KEY) or DEFAULT_IMAGE_SIZE)
        self._frozen = inference.FrozenModel(
            model, EncoderInput(self.normalization, self.image_size), batch_size=batch_size
        )

    @classmethod
    def load(cls, name: str, *, cache: str = "", base_url: str = "", batch_size: int = 64):
        from caco_jax.models import pretrained

        model, metadata = pretrained.load_pretrained(
            name, cache=cache, base_url=base_url or pretrained.OFFICIAL_BASE_URL
        )
        return cls(model, metadata, batch_size=batch_size)

    @property
    def bands(self) -> tuple[str, ...]:
        return self.normalization.bands

    def __call__(self, pixels, *, scale: str = "auto", offset: float = 0.0) -> np.ndarray:
        pixels = np.asarray(pixels)
        if pixels.ndim != 4 or pixels.shape[-1] != self.normalization.num_bands:
            raise InputError(
                f"images of shape {pixels.shape}; the encoder takes [N, H, W, "
                f"{self.normalization.num_bands}] with bands {', '.join(self.bands)}"
            )
        raw = sentinel2.to_archive_uint8(pixels, scale, offset=offset, name="images")
        step = self._frozen.batch_size
        batches = [self._frozen(raw[i : i + step]) for i in range(0, raw.shape[0], step)]
        return np.concatenate(batches) if batches else np.zeros((0, self.model.feature_dim))


def load_encoder(encoder, *, cache: str = "", base_url: str = ""):
    """(model, normalization, image size) of ``encoder``: an `Encoder`, an official name or an
    export path."""
    if isinstance(encoder, Encoder):
        return encoder.model, encoder.normalization, encoder.image_size
    from caco_jax.models import pretrained

    model, metadata = pretrained.load_pretrained(
        encoder, cache=cache, base_url=base_url or pretrained.OFFICIAL_BASE_URL
    )
    image_size = int(metadata.get(export.IMAGE_SIZE_KEY) or DEFAULT_IMAGE_SIZE)
    return model, export.input_normalization(metadata), image_size


def embed(
    source: str,
    encoder,
    *,
    kind: str = "geotiff",
    builder_config: str = "rgb",
    bands: Sequence[str] = (),
    scale: str = "auto",
    dn_offset: float = geotiff.AUTO_OFFSET,
    tile_stride: int = 0,
    batch_size: int = 64,
    cache: str = "",
    base_url: str = "",
    share: tuple[int, int] = (0, 1),
) -> Embeddings:
    """Embeddings of ``source`` with ``encoder`` (an `Encoder`, an official name or an export
    path); the keywords are those of `geotiff.geotiff_tiles` / `record_tiles`, and the cache and
    server of `pretrained.load_pretrained`; ``share`` (index, count) takes one process's share of
    the tiles (rows of GeoTIFF tiles, records, or archive locations, round robin)."""
    model, normalization, image_size = load_encoder(encoder, cache=cache, base_url=base_url)
    if kind == "geotiff":
        tiles, total = geotiff.geotiff_tiles(
            source,
            normalization,
            tile=image_size,
            stride=tile_stride,
            bands=bands,
            scale=scale,
            dn_offset=dn_offset,
            share=share,
        )
    elif kind == "archive":
        tiles, total = archive_tiles(source, normalization, share)
    elif kind == "records":
        tiles, total = record_tiles(source, builder_config, normalization, share)
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
    """Task `embed`, on every process of a run (each its share of the tiles):
    `config.embed.source` -> the GeoParquet dataset `config.embed.output`."""
    e, workdir = settings.embed, Workdir.of(workdir)
    process = multihost.current()
    folder = e.output or workdir.embeddings

    def compute():
        return embed(
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
            share=(process.index, process.count),
        )

    about = {"source": os.fspath(e.source), "encoder": e.encoder or os.fspath(workdir.encoder)}
    # The workdir's own embeddings are this task's output: a rerun replaces them. A dataset at
    # embed.output is replaced only with embed.overwrite.
    overwrite = e.overwrite or not e.output
    folder, rows = write_dataset(compute, folder, overwrite=overwrite, about=about)
    print(f"embed: {rows} embeddings by process {process.index} of {process.count} in {folder}")
    return {"output": folder, "rows": rows, "process": process.index}
