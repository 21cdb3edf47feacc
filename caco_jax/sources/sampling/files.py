"""The locations file the sampler writes and the downloader reads (CSV), its GeoJSON twin for GIS
tools.

CSV columns: location_id (the archive folder name, six digits), lat, lon, city, country, city_lat,
city_lon, distance_km. Only location_id, lat and lon are needed downstream, so a hand-made CSV with
those three columns is a valid input to the downloader.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os

from caco_jax.sources.sampling.sampler import Locations

CSV_FILE = "locations.csv"
GEOJSON_FILE = "locations.geojson"


@dataclasses.dataclass(frozen=True)
class Site:
    """One location to download."""

    location_id: str
    lat: float
    lon: float


def location_id(index: int) -> str:
    return f"{index:06d}"


def write_locations(locations: Locations, output_dir: str) -> dict[str, str]:
    """Writes locations.csv and locations.geojson into `output_dir`; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    cities = locations.cities.take(locations.city)
    distance_km = locations.distance_m / 1000.0
    rows = [
        dict(
            location_id=location_id(i),
            lat=f"{locations.lat[i]:.7f}",
            lon=f"{locations.lon[i]:.7f}",
            city=str(cities.name[i]),
            country=str(cities.country[i]),
            city_lat=f"{cities.lat[i]:.5f}",
            city_lon=f"{cities.lon[i]:.5f}",
            distance_km=f"{distance_km[i]:.4f}",
        )
        for i in range(len(locations))
    ]
    csv_path = os.path.join(output_dir, CSV_FILE)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    features = [
        dict(
            type="Feature",
            geometry=dict(type="Point", coordinates=[float(row["lon"]), float(row["lat"])]),
            properties={k: v for k, v in row.items() if k not in ("lat", "lon")},
        )
        for row in rows
    ]
    geojson_path = os.path.join(output_dir, GEOJSON_FILE)
    with open(geojson_path, "w", encoding="utf-8") as f:
        json.dump(dict(type="FeatureCollection", features=features), f)
    return dict(csv=csv_path, geojson=geojson_path)


def read_sites(path: str) -> list[Site]:
    """The locations of a CSV with at least location_id, lat, lon; errors name the file and row."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"location_id", "lat", "lon"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
        sites = []
        for line, row in enumerate(reader, start=2):
            try:
                site = Site(row["location_id"].strip(), float(row["lat"]), float(row["lon"]))
            except (TypeError, ValueError) as error:
                raise ValueError(f"{path}, line {line}: {error}") from None
            if not site.location_id or os.sep in site.location_id or site.location_id[0] == ".":
                raise ValueError(f"{path}, line {line}: bad location_id {site.location_id!r}")
            if not (-90 <= site.lat <= 90 and -180 <= site.lon <= 180):
                raise ValueError(
                    f"{path}, line {line}: lat/lon out of range ({site.lat}, {site.lon})"
                )
            sites.append(site)
    ids = [s.location_id for s in sites]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate location_id values")
    return sites
