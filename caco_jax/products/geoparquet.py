"""Tables of places as a partitioned GeoParquet dataset: a folder any process of a run can add its
part to, readable by geopandas, DuckDB, GDAL and QGIS.

  <folder>/part-00000-of-00002.parquet   process 0's rows
  <folder>/part-00001-of-00002.parquet   process 1's rows
  <folder>/_manifest.json                written last, by process 0: the parts and their rows

Each part holds the columns given plus ``geometry``: WKB points or polygons in longitude/latitude
(OGC:CRS84), described by the file's ``geo`` metadata (GeoParquet 1.1). A folder without its
manifest is unfinished (a run stopped while writing): `read` refuses it, and a rerun replaces it.
Readers that scan folders (pyarrow, geopandas, DuckDB) skip ``_manifest.json`` by its leading
underscore.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence

import numpy as np

from caco_jax.runtime import storage

MANIFEST = "_manifest.json"
GEOMETRY = "geometry"
_PART = re.compile(r"^part-(\d{5})-of-(\d{5})\.parquet$")
# OGC:CRS84 (WGS 84, longitude first) as PROJJSON, the CRS of every geometry written here.
CRS84 = {
    "$schema": "https://proj.org/schemas/v0.7/projjson.schema.json",
    "type": "GeographicCRS",
    "name": "WGS 84 (CRS84)",
    "datum_ensemble": {
        "name": "World Geodetic System 1984 ensemble",
        "members": [
            {"name": "World Geodetic System 1984 (Transit)"},
            {"name": "World Geodetic System 1984 (G730)"},
            {"name": "World Geodetic System 1984 (G873)"},
            {"name": "World Geodetic System 1984 (G1150)"},
            {"name": "World Geodetic System 1984 (G1674)"},
            {"name": "World Geodetic System 1984 (G1762)"},
            {"name": "World Geodetic System 1984 (G2139)"},
            {"name": "World Geodetic System 1984 (G2296)"},
        ],
        "ellipsoid": {
            "name": "WGS 84",
            "semi_major_axis": 6378137,
            "inverse_flattening": 298.257223563,
        },
        "accuracy": "2.0",
        "id": {"authority": "EPSG", "code": 6326},
    },
    "coordinate_system": {
        "subtype": "ellipsoidal",
        "axis": [
            {
                "name": "Geodetic longitude",
                "abbreviation": "Lon",
                "direction": "east",
                "unit": "degree",
            },
            {
                "name": "Geodetic latitude",
                "abbreviation": "Lat",
                "direction": "north",
                "unit": "degree",
            },
        ],
    },
    "scope": "Not known.",
    "area": "World.",
    "bbox": {
        "south_latitude": -90,
        "west_longitude": -180,
        "north_latitude": 90,
        "east_longitude": 180,
    },
    "id": {"authority": "OGC", "code": "CRS84"},
}


class UnfinishedError(FileNotFoundError):
    """A dataset folder without its manifest (its writing did not finish), or whose parts differ
    from it."""


def part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}.parquet"


# ----------------------------------------------------------------------------- WKB


def point_wkb(lon: float, lat: float) -> bytes:
    """A 2-D point as little-endian WKB."""
    return struct.pack("<BIdd", 1, 1, lon, lat)


def polygon_wkb(ring: Sequence[tuple[float, float]]) -> bytes:
    """A polygon of one closed ring of (lon, lat) as little-endian WKB."""
    points = np.asarray(ring, "<f8")
    return struct.pack("<BIII", 1, 3, 1, len(points)) + points.tobytes()


def wkb_coordinates(wkb: bytes) -> np.ndarray:
    """The (x, y) coordinates [n, 2] of a little-endian WKB point or one-ring polygon."""
    order, kind = struct.unpack_from("<BI", wkb)
    if order != 1 or kind not in (1, 3):
        raise ValueError(f"not a little-endian 2-D WKB point or polygon (order {order}, {kind})")
    if kind == 1:
        return np.frombuffer(wkb, "<f8", 2, 5).reshape(1, 2)
    _, count = struct.unpack_from("<II", wkb, 5)
    return np.frombuffer(wkb, "<f8", 2 * count, 13).reshape(count, 2)


# ----------------------------------------------------------------------------- parts


def table(columns: dict, geometries: Sequence[bytes], geometry_type: str):
    """A pyarrow table of ``columns`` (name -> pyarrow array) and the WKB ``geometries``, with the
    GeoParquet ``geo`` metadata (``geometry_type``: "Point" or "Polygon")."""
    import pyarrow as pa

    columns = {**columns, GEOMETRY: pa.array(list(geometries), pa.binary())}
    geo = {
        "version": "1.1.0",
        "primary_column": GEOMETRY,
        "columns": {GEOMETRY: {"encoding": "WKB", "geometry_types": [geometry_type], "crs": CRS84}},
    }
    return pa.table(columns).replace_schema_metadata({"geo": json.dumps(geo)})


def write_part(folder, part, index: int, count: int) -> str:
    """Writes this process's ``part`` (a pyarrow table) into ``folder``; returns its path."""
    import pyarrow.parquet as pq

    folder = storage.path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / part_name(index, count)
    with path.open("wb") as f:
        pq.write_table(part, f)
    return str(path)


def finish(folder, count: int, about: dict) -> str:
    """Process 0, once every process wrote its part: removes parts of earlier runs (with another
    process count) and writes the manifest (the parts, their rows and ``about``), which makes the
    dataset readable."""
    import pyarrow.parquet as pq

    folder = storage.path(folder)
    names = [part_name(i, count) for i in range(count)]
    for path in folder.iterdir():
        if _PART.match(path.name) and path.name not in names:
            path.unlink()
    rows = []
    for name in names:
        with (folder / name).open("rb") as f:
            rows.append(pq.read_metadata(f).num_rows)
    manifest = {"parts": names, "rows": rows, **about}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return str(folder)


def begin(folder, *, overwrite: bool, what: str) -> None:
    """Before any work: refuses a finished dataset unless ``overwrite``; removes its manifest when
    it is to be replaced (process 0, before any process writes a part)."""
    manifest = storage.path(folder) / MANIFEST
    if manifest.exists():
        if not overwrite:
            raise FileExistsError(f"{folder} already holds {what} (set {what}.overwrite)")
        manifest.unlink()


def exists(folder) -> bool:
    return (storage.path(folder) / MANIFEST).exists()


def read(folder):
    """The rows of every part, in part order, as one pyarrow table; refuses an unfinished folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = storage.path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise UnfinishedError(
            f"{folder}: no {MANIFEST}, so its writing did not finish (rerun the task)"
        )
    manifest = json.loads(manifest_path.read_text())
    tables = []
    for name, rows in zip(manifest["parts"], manifest["rows"], strict=True):
        with (folder / name).open("rb") as f:
            part = pq.read_table(f)
        if part.num_rows != rows:
            raise UnfinishedError(
                f"{folder / name}: {part.num_rows} rows, the manifest says {rows} (a part replaced "
                "or damaged since it was written; run the task again)"
            )
        tables.append(part)
    return pa.concat_tables(tables)
