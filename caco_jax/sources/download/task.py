"""Task `download`: fills an archive for the locations file, then writes a report of what failed.

Reads `config.download.locations` (default: the `sample_locations` task's CSV in this workdir) and
writes the archive to `config.download.output` (default `<workdir>/archive/clean_custom_geography`),
ready for `prepare` with `config.data.archive` = its parent folder. The report goes beside the
archive (`<archive>_download_report.json` and `.csv`), never inside it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os

from absl import logging

from caco_jax.runtime.workdir import Workdir
from caco_jax.sources.download.downloader import Summary, download_all
from caco_jax.sources.sampling.files import CSV_FILE, read_sites

ARCHIVE_NAME = "clean_custom_geography"


def paths(settings, workdir) -> tuple[str, str]:
    """(locations CSV, archive folder) for these settings and workdir."""
    locations = settings.download.locations or os.path.join(
        settings.sampling.output_dir(workdir), CSV_FILE
    )
    archive = settings.download.output or Workdir.of(workdir).join("archive", ARCHIVE_NAME)
    return locations, archive


def run(client, settings, workdir, progress: bool = True) -> dict:
    """The task with any `Client`: tests pass a fake one, `run_task` the Earth Engine one."""
    locations, archive = paths(settings, workdir)
    sites = read_sites(locations)
    summary = download_all(client, sites, archive, settings.download, progress=progress)
    report = write_report(summary, archive)
    if summary.failed:
        logging.warning(
            "%d of %d locations could not be filled; see %s",
            len(summary.failed),
            len(sites),
            report["csv"],
        )
    return dict(
        archive=archive,
        locations=len(sites),
        complete=summary.written + summary.skipped,
        **{k: v for k, v in dataclasses.asdict(summary).items() if k != "failed"},
        failed=len(summary.failed),
        report=report["json"],
    )


def run_task(settings, workdir) -> dict:
    """Task `download`, with Earth Engine (the `earthengine` extra)."""
    from caco_jax.sources.download.earth_engine import EarthEngineClient

    d = settings.download
    client = EarthEngineClient(d.collection, project=d.project)
    return run(client, settings, workdir, progress=settings.logging.progress_bar)


def write_report(summary: Summary, archive: str) -> dict[str, str]:
    """`<archive>_download_report.json` (the whole summary) and `.csv` (location_id, reason)."""
    base = os.path.normpath(archive) + "_download_report"
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(summary), f, indent=2, sort_keys=True)
    with open(base + ".csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["location_id", "reason"])
        writer.writerows(sorted(summary.failed.items()))
    return dict(json=base + ".json", csv=base + ".csv")
