"""A large archive in the published layout, made cheaply by replicating a few real ones.

`write_replicated_archive` reads the location folders of an extracted archive (e.g. a few hundred
synthetic locations from `caco_jax.sources.synthetic.write_archive(form="folder")`) and streams
`num_locations` locations into one gzip stream cut into `<name>_part0..3`, the form the 1M archive
ships in. Location n is a copy of base location n % B under its own id (`location_id(n, ...)`) and
at its own coordinates (`replica_lat_lon`): the builder takes a location's centre from its
GeoTIFFs' transform, so the ModelPixelScale and ModelTiepoint tags of every GeoTIFF (bands and
previews) are rewritten in place; everything else (pixels, `metadata.json`, product ids) is the base
location's bytes.

Cheap because nothing is re-encoded and almost nothing is re-compressed: each base location is
compressed once, as raw deflate segments that end on a full flush (byte aligned, no back-reference
into earlier data), so they can be concatenated in any order into one valid deflate stream. Only
what differs per replica (tar headers, the 72 bytes of georeferencing per GeoTIFF) is compressed per
replica, by one compressor that full-flushes after each piece. The reader sees an ordinary gzip
stream (CRC-32 and length checked at its end); a few bytes per flush make it ~0.5 % larger.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import tarfile
import zlib
from collections.abc import Callable

from caco_jax.data import layout

NUM_PARTS = 4  # as the 1M archive: clean_1m_geography_part0..3
_TAR_MTIME = 1687046400  # 2023-06-18, as the synthetic writer's members
_TIFF_DOUBLE = 12
_IMAGE_WIDTH, _IMAGE_LENGTH = 256, 257
_MODEL_PIXEL_SCALE, _MODEL_TIEPOINT = 33550, 33922
# Latitudes the replicas are spread over (Sentinel-2 land, away from the poles).
_LAT_RANGE = (-60.0, 72.0)
_GOLDEN_ANGLE = 180.0 * (3.0 - math.sqrt(5.0))


def location_id(n: int, num_locations: int) -> str:
    """Zero-padded like the published folders (at least 6 digits)."""
    return f"{n:0{max(6, len(str(num_locations - 1)))}d}"


def replica_lat_lon(n: int, num_locations: int) -> tuple[float, float]:
    """Centre of location n: a Fibonacci lattice over the latitude band, so every location has
    its own latitude (strictly increasing with n) and the points cover the band evenly."""
    low, high = (math.sin(math.radians(x)) for x in _LAT_RANGE)
    lat = math.degrees(math.asin(low + (high - low) * (n + 0.5) / num_locations))
    lon = (n * _GOLDEN_ANGLE) % 360.0 - 180.0
    return lat, lon


def georef_offsets(data: bytes, where: str) -> tuple[int, int, int]:
    """(byte offset of the ModelPixelScale doubles, width, height) of a little-endian classic
    GeoTIFF whose ModelTiepoint follows its pixel scale directly, as GDAL writes them.

    Raises ValueError naming `where` for any other file: a replica must not silently keep its base
    location's coordinates."""
    if data[:4] != b"II*\x00":
        raise ValueError(f"{where}: not a little-endian classic TIFF (starts with {data[:4]!r})")
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    tags = {}
    for i in range(count):
        tag, kind, n, value = struct.unpack_from("<HHII", data, ifd + 2 + 12 * i)
        tags[tag] = (kind, n, value)
    scale, tiepoint = tags.get(_MODEL_PIXEL_SCALE), tags.get(_MODEL_TIEPOINT)
    if (
        scale is None
        or tiepoint is None
        or scale[:2] != (_TIFF_DOUBLE, 3)
        or tiepoint[:2] != (_TIFF_DOUBLE, 6)
        or tiepoint[2] != scale[2] + 24
    ):
        raise ValueError(
            f"{where}: expected a ModelPixelScale (3 doubles) directly followed by a "
            "ModelTiepoint (6 doubles), as GDAL writes them"
        )
    width, height = (tags[t][2] & 0xFFFF for t in (_IMAGE_WIDTH, _IMAGE_LENGTH))
    return scale[2], width, height


def georef_bytes(lat: float, lon: float, width: int, height: int) -> bytes:
    """ModelPixelScale + ModelTiepoint of the north-up EPSG:4326 footprint the archives use
    (`layout.GeoBox.around`): 9 little-endian doubles, 72 bytes."""
    box = layout.GeoBox.around(lat, lon)
    scale = ((box.east - box.west) / width, (box.north - box.south) / height, 0.0)
    return struct.pack("<9d", *scale, 0.0, 0.0, 0.0, box.west, box.north, 0.0)


@dataclasses.dataclass(frozen=True)
class _Member:
    """One tar member of a base location; `georef` = (offset, width, height) for GeoTIFFs."""

    relative: str  # path below the location folder; "" for the folder itself
    size: int | None  # bytes of the file; None for a folder
    georef: tuple[int, int, int] | None


@dataclasses.dataclass
class _BaseLocation:
    members: list[_Member]
    # Per member: its constant pieces (raw, compressed), i.e. the data before and after the
    # georeferencing (or the whole data) with the tar padding; shared by every replica.
    constant: list[list[tuple[bytes, bytes]]]


def _compress_once(raw: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    return compressor.compress(raw) + compressor.flush(zlib.Z_FULL_FLUSH)


def _walk(folder: str, relative: str = ""):
    """The synthetic writer's member order: a folder, then its sorted entries, depth first."""
    yield relative
    path = os.path.join(folder, relative)
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            if not layout.is_stray_name(name):
                yield from _walk(folder, f"{relative}/{name}" if relative else name)


def read_base_location(location_dir: str) -> _BaseLocation:
    """Reads one location folder and compresses its constant pieces once."""
    members, constant = [], []
    for relative in _walk(location_dir):
        path = os.path.join(location_dir, relative)
        if os.path.isdir(path):
            members.append(_Member(relative, None, None))
            constant.append([])
            continue
        with open(path, "rb") as f:
            data = f.read()
        georef = georef_offsets(data, path) if relative.endswith(".tif") else None
        padding = bytes(-len(data) % tarfile.BLOCKSIZE)
        if georef:
            cut = georef[0]
            raws = [data[:cut], data[cut + 72 :] + padding]
        else:
            raws = [data + padding]
        members.append(_Member(relative, len(data), georef))
        constant.append([(raw, _compress_once(raw)) for raw in raws])
    return _BaseLocation(members, constant)


class _Parts:
    """A write-only file cut into `<name>_part0..` at the points `next_part` is called."""

    def __init__(self, folder: str, name: str):
        self.paths = [os.path.join(folder, f"{name}_part{i}") for i in range(NUM_PARTS)]
        self._index = 0
        self._file = open(self.paths[0], "wb")  # closed by next_part and close

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def next_part(self) -> None:
        self._file.close()
        self._index += 1
        self._file = open(self.paths[self._index], "wb")

    def close(self) -> None:
        self._file.close()


class _GzipStream:
    """One gzip member assembled from pre-compressed and freshly compressed deflate pieces."""

    def __init__(self, out):
        self._out = out
        self._compressor = zlib.compressobj(1, zlib.DEFLATED, -15)
        self._crc = 0
        self.size = 0  # uncompressed bytes so far
        # No file name, mtime 0, OS unknown: like the synthetic writer's reproducible header.
        out.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")

    def add_compressed(self, raw: bytes, compressed: bytes) -> None:
        self._out.write(compressed)
        self._account(raw)

    def add(self, raw: bytes) -> None:
        self._out.write(self._compressor.compress(raw) + self._compressor.flush(zlib.Z_FULL_FLUSH))
        self._account(raw)

    def _account(self, raw: bytes) -> None:
        self._crc = zlib.crc32(raw, self._crc)
        self.size += len(raw)

    def close(self) -> None:
        self._out.write(self._compressor.flush(zlib.Z_FINISH))
        self._out.write(struct.pack("<II", self._crc, self.size & 0xFFFFFFFF))


def _header(name: str, size: int | None) -> bytes:
    info = tarfile.TarInfo(name)
    info.mtime = _TAR_MTIME
    if size is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.size, info.mode = size, 0o644
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def write_replicated_archive(
    base_root: str,
    output_dir: str,
    *,
    num_locations: int,
    name: str = "clean_rehearsal_geography",
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Writes `num_locations` replicated locations as `<output_dir>/<name>_part0..3`.

    `base_root` is an extracted archive folder (its location folders inside). Returns the part
    paths. Extracts to `<name>/<location id>/...` like the published tars.
    """
    base_ids = sorted(
        e.name for e in os.scandir(base_root) if e.is_dir() and not layout.is_stray_name(e.name)
    )
    if not base_ids:
        raise ValueError(f"{base_root}: no location folders to replicate")
    if num_locations < NUM_PARTS:
        raise ValueError(f"num_locations must be at least {NUM_PARTS}, got {num_locations}")
    bases = [read_base_location(os.path.join(base_root, i)) for i in base_ids]
    os.makedirs(output_dir, exist_ok=True)
    parts = _Parts(output_dir, name)
    stream = _GzipStream(parts)
    stream.add(_header(name, None))
    cuts = {num_locations * k // NUM_PARTS for k in range(1, NUM_PARTS)}
    for n in range(num_locations):
        if n in cuts:
            parts.next_part()
        _write_location(stream, bases[n % len(bases)], n, num_locations, name)
        if progress:
            progress(n + 1)
    # End of archive: two zero blocks, then zeros to a whole 10 KiB record, as tarfile writes.
    end = 2 * tarfile.BLOCKSIZE
    stream.add(bytes(end + (-(stream.size + end) % tarfile.RECORDSIZE)))
    stream.close()
    parts.close()
    return parts.paths


def _write_location(stream, base: _BaseLocation, n: int, num_locations: int, name: str) -> None:
    lat, lon = replica_lat_lon(n, num_locations)
    folder = f"{name}/{location_id(n, num_locations)}"
    for member, pieces in zip(base.members, base.constant, strict=True):
        path = f"{folder}/{member.relative}" if member.relative else folder
        stream.add(_header(path, member.size))
        if member.georef is None:
            for raw, compressed in pieces:
                stream.add_compressed(raw, compressed)
        else:
            _, width, height = member.georef
            stream.add_compressed(*pieces[0])
            stream.add(georef_bytes(lat, lon, width, height))
            stream.add_compressed(*pieces[1])
