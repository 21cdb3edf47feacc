"""A small archive in exactly the published CACo layout, with synthetic imagery and known change.

The demo, the tests and the benchmarks need an archive that a fresh machine can make in seconds and
that the builder reads exactly like `caco10k.tar.gz` (the layout of caco_jax/data/layout.py). The
package, by concern:

- `plan`: each location's coordinates (near a populous city), land cover, change and acquisitions.
- `render`: its imagery, Sentinel-2-like bands with seasons, crops, clouds and the change.
- `writer`: the archive on disk (folder, tar.gz or parts), written atomically.
- `ground_truth`: the land cover and change of each location, in a CSV beside the archive.
- `scoring`: the `score_change` task, the change labels of pretraining against that truth.

Everything is a function of the seed and the location index: the same arguments give the same bytes.
"""

from __future__ import annotations

import os

from caco_jax.data.synthetic import writer
from caco_jax.data.synthetic.ground_truth import (
    BARE_SOIL,
    BUILT_UP,
    CHANGE_TARGET,
    CHANGES_FOR_COVER,
    CROPLAND,
    DEFAULT_NAME,
    FOREST,
    LAND_COVER_CLASSES,
    NO_CHANGE,
    WATER,
    GroundTruth,
    archive_folder,
    ground_truth_name,
    ground_truth_path,
    read_ground_truth,
)
from caco_jax.data.synthetic.plan import LocationPlan, plan_locations
from caco_jax.data.synthetic.writer import FORMS, archive_entries, write_archive

__all__ = [
    "BARE_SOIL",
    "BUILT_UP",
    "CHANGES_FOR_COVER",
    "CHANGE_TARGET",
    "CROPLAND",
    "DEFAULT_NAME",
    "FOREST",
    "FORMS",
    "LAND_COVER_CLASSES",
    "NO_CHANGE",
    "WATER",
    "GroundTruth",
    "LocationPlan",
    "archive_entries",
    "archive_folder",
    "ground_truth_name",
    "ground_truth_path",
    "num_workers",
    "plan_locations",
    "read_ground_truth",
    "run_task",
    "write_archive",
]

# Below this many locations per process, starting processes costs more than it saves.
_LOCATIONS_PER_WORKER = 16


def num_workers(requested: int, num_locations: int) -> int:
    """Processes for `num_locations`: `requested`, or when it is 0 one per core but no more than
    one per 16 locations; never more than one per location."""
    if requested < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {requested}")
    if requested == 0:
        return max(1, min(os.cpu_count() or 1, num_locations // _LOCATIONS_PER_WORKER))
    return max(1, min(requested, num_locations))


def run_task(config, workdir: str) -> dict:
    """Task `synthesize`: writes the archive `config.synthetic` describes unless it is there.

    It goes to `archive_folder(config, workdir)` (``config.data.archive``, or when that is ""
    ``<workdir>/synthetic_archive``), seeded by ``config.seed``, rendered by
    ``config.data.num_workers`` processes (0: one per core, at most one per 16 locations). Its
    ground truth file marks a complete archive (`write_archive` puts it in place last); a complete
    archive written with other settings is an error rather than silently reused.
    """
    settings = config.synthetic
    output_dir = archive_folder(config, workdir)
    entries = archive_entries(DEFAULT_NAME, settings.form)
    truth_path = os.path.join(output_dir, ground_truth_name(DEFAULT_NAME))
    expected = plan_locations(
        settings.num_locations, seed=config.seed, change_fraction=settings.change_fraction
    )
    written = not all(os.path.lexists(os.path.join(output_dir, e)) for e in entries)
    if written:
        writer.remove_staging_folders(output_dir, DEFAULT_NAME)
        write_archive(
            output_dir,
            num_locations=settings.num_locations,
            seed=config.seed,
            change_fraction=settings.change_fraction,
            form=settings.form,
            num_workers=num_workers(config.data.num_workers, settings.num_locations),
            overwrite=True,
        )
    truth = read_ground_truth(truth_path)
    if truth != [plan.ground_truth() for plan in expected]:
        raise ValueError(
            f"{output_dir} holds a synthetic archive written with other settings than the config "
            f"(synthetic.num_locations={settings.num_locations}, seed={config.seed}, "
            f"synthetic.change_fraction={settings.change_fraction}); delete it or point "
            "config.data.archive elsewhere"
        )
    return {
        "archive": os.path.join(output_dir, entries[0]),
        "ground_truth": truth_path,
        "num_locations": len(truth),
        "num_changed": sum(t.changed for t in truth),
        "written": written,
    }
