"""A small archive in exactly the published CACo layout, with synthetic imagery and known change.

The demo, the tests and the benchmarks need an archive that a fresh machine can make in seconds and
that the builder reads exactly like `caco10k.tar.gz` (the layout of `data.layout`). The
package, by concern:

- `plan`: each location's coordinates (near a populous city), land cover, change and acquisitions.
- `render`: its imagery, Sentinel-2-like bands with seasons, crops, clouds and the change.
- `writer`: the archive on disk (folder, tar.gz or parts), written atomically.
- `ground_truth`: the land cover and change of each location, in a CSV beside the archive.

The `score_change` task (`evaluators.change_scoring`) scores pretraining's change labels against
that truth, and the `eval_land_cover` task (`evaluators.land_cover`) probes land cover with it.

Everything is a function of the seed and the location index: the same arguments give the same bytes.
"""

from __future__ import annotations

import dataclasses
import os

from caco_jax.runtime import errors, storage
from caco_jax.settings import Section, SettingsError
from caco_jax.sources.synthetic import writer
from caco_jax.sources.synthetic.ground_truth import (
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
    ground_truth_name,
    ground_truth_path,
    read_ground_truth,
)
from caco_jax.sources.synthetic.plan import LocationPlan, plan_locations
from caco_jax.sources.synthetic.writer import FORMS, archive_entries, write_archive

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
    "OtherArchiveError",
    "SyntheticSettings",
    "archive_entries",
    "ground_truth_name",
    "ground_truth_path",
    "num_workers",
    "plan_locations",
    "read_ground_truth",
    "run_task",
    "write_archive",
]


@dataclasses.dataclass(frozen=True)
class SyntheticSettings(Section):
    """`config.synthetic`: the embedded archive, written to ``config.data.archive`` (default
    ``<workdir>/synthetic_archive``)."""

    SECTION = "synthetic"
    num_locations: int = 64
    change_fraction: float = 0.3
    form: str = "folder"  # or "tar.gz" (like caco10k.tar.gz), "parts" (like the 1M set)

    def validate(self) -> None:
        self.require(self.num_locations >= 2, "num_locations", "must be >= 2")
        self.require(0.0 <= self.change_fraction <= 1.0, "change_fraction", "in [0, 1]")
        self.require(self.form in FORMS, "form", f"one of {FORMS}")


def check_task(settings) -> None:
    """Before any work: the `synthesize` task writes the archive as local files."""
    if storage.is_url(settings.data.archive):
        raise SettingsError(
            "config.data.archive: synthesize writes the archive as local files: a local folder "
            "or a mounted bucket (gcsfuse), not a URL (see docs/running.md)"
        )


class OtherArchiveError(errors.UserError, ValueError):
    """The archive folder holds a synthetic archive written with other settings."""


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


def run_task(settings, workdir) -> dict:
    """Task `synthesize`: writes the archive `config.synthetic` describes unless it is there.

    It goes to ``config.data.archive``, or when that is "" ``<workdir>/synthetic_archive``, seeded
    by ``config.seed``, rendered by ``config.data.num_workers`` processes (0: one per core, at most
    one per 16 locations). Its ground truth file marks a complete archive (`write_archive` puts it
    in place last); a complete archive written with other settings is an error rather than
    silently reused.
    """
    synthetic, data, seed = settings.synthetic, settings.data, settings.seed
    output_dir = data.archive_dir(workdir)
    entries = archive_entries(DEFAULT_NAME, synthetic.form)
    truth_path = ground_truth_path(output_dir)
    expected = plan_locations(
        synthetic.num_locations, seed=seed, change_fraction=synthetic.change_fraction
    )
    written = not all(os.path.lexists(os.path.join(output_dir, e)) for e in entries)
    if written:
        writer.remove_staging_folders(output_dir, DEFAULT_NAME)
        write_archive(
            output_dir,
            num_locations=synthetic.num_locations,
            seed=seed,
            change_fraction=synthetic.change_fraction,
            form=synthetic.form,
            num_workers=num_workers(data.num_workers, synthetic.num_locations),
            overwrite=True,
        )
    truth = read_ground_truth(truth_path)
    if truth != [plan.ground_truth() for plan in expected]:
        raise OtherArchiveError(
            f"{output_dir} holds a synthetic archive written with other settings than the config "
            f"(synthetic.num_locations={synthetic.num_locations}, seed={seed}, "
            f"synthetic.change_fraction={synthetic.change_fraction}); delete it or point "
            "config.data.archive elsewhere"
        )
    return {
        "archive": os.path.join(output_dir, entries[0]),
        "ground_truth": truth_path,
        "num_locations": len(truth),
        "num_changed": sum(t.changed for t in truth),
        "written": written,
    }
