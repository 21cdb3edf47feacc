"""What the synthetic archive knows that a real one does not: each location's land cover and change.

The truth is written beside the archive as ``<name>_ground_truth.csv``, one row per location
(`location_id,changed,change_type,land_cover`), and is read back by the `synthesize` task (to check
that an archive on disk was written with the config's settings), the `score_change` task and the
land-cover probe (caco_jax/evaluators/land_cover.py).
"""

from __future__ import annotations

import csv
import dataclasses
import os

DEFAULT_NAME = "clean_synthetic_geography"  # like clean_10k_geography

# Integer land-cover classes of the ground truth (`land_cover`: the dominant one, early window).
LAND_COVER_CLASSES = ("forest", "cropland", "built_up", "water", "bare_soil")
FOREST, CROPLAND, BUILT_UP, WATER, BARE_SOIL = range(len(LAND_COVER_CLASSES))

# What a changed region becomes in the late window.
CHANGE_TARGET = {
    "new_built_up": BUILT_UP,
    "cleared_forest": BARE_SOIL,
    "new_reservoir": WATER,
    "new_cropland": CROPLAND,
    "demolition": BARE_SOIL,
}
# The changes that make sense for a location of each dominant land cover.
CHANGES_FOR_COVER = {
    FOREST: ("cleared_forest", "new_built_up", "new_reservoir"),
    CROPLAND: ("new_built_up", "new_reservoir"),
    BUILT_UP: ("demolition",),
    WATER: ("new_built_up",),
    BARE_SOIL: ("new_built_up", "new_cropland", "new_reservoir"),
}
NO_CHANGE = "none"
COLUMNS = ("location_id", "changed", "change_type", "land_cover")


@dataclasses.dataclass(frozen=True)
class GroundTruth:
    """One location's row of the ground truth."""

    location_id: str
    changed: bool
    change_type: str  # NO_CHANGE or a key of CHANGE_TARGET
    land_cover: int  # index into LAND_COVER_CLASSES: the dominant class in the early window


def ground_truth_name(name: str = DEFAULT_NAME) -> str:
    """The file name of the ground truth of the archive called `name`."""
    return f"{name}_ground_truth.csv"


def ground_truth_path(archive_dir: str) -> str:
    """The ground truth file the `synthesize` task writes into the archive folder
    (`DataSettings.archive_dir`)."""
    return os.path.join(archive_dir, ground_truth_name(DEFAULT_NAME))


def write_ground_truth(path: str, rows: list[GroundTruth]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow((row.location_id, int(row.changed), row.change_type, row.land_cover))


def read_ground_truth(path: str) -> list[GroundTruth]:
    """The rows of a ``<name>_ground_truth.csv``, in file (location) order.

    Raises ValueError naming the file, the line and the expected values for other columns, a
    `changed` other than 0/1, an unknown land cover or change type, or a change type that
    contradicts `changed`.
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: expected columns {COLUMNS}, got {reader.fieldnames}")
        return [_parse(row, f"{path}, line {reader.line_num}") for row in reader]


def _parse(row: dict, where: str) -> GroundTruth:
    if row["changed"] not in ("0", "1"):
        raise ValueError(f"{where}: changed must be 0 or 1, got {row['changed']!r}")
    changed = row["changed"] == "1"
    if not row["land_cover"].isdigit() or int(row["land_cover"]) >= len(LAND_COVER_CLASSES):
        raise ValueError(
            f"{where}: land_cover must be 0..{len(LAND_COVER_CLASSES) - 1} "
            f"{LAND_COVER_CLASSES}, got {row['land_cover']!r}"
        )
    change_type = row["change_type"]
    expected = tuple(CHANGE_TARGET) if changed else (NO_CHANGE,)
    if change_type not in expected:
        raise ValueError(
            f"{where}: change_type of a location with changed={int(changed)} must be one of "
            f"{expected}, got {change_type!r}"
        )
    return GroundTruth(row["location_id"], changed, change_type, int(row["land_cover"]))
