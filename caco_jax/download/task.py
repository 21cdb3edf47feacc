"""Task `download`: fills an archive for the locations file, then writes a report of what failed.

Reads `config.download.locations` (default: the `sample_locations` task's CSV in this workdir) and
writes the archive to `config.download.output` (default `<workdir>/archive/clean_custom_geography`),
ready for `prepare` with `config.data.archive` = its parent folder. The report goes beside the
archive (`<archive>_download_report.json` and `.csv`), never inside it.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os

from absl import logging

from caco_jax.download.downloader import Settings, Summary, download_all
from caco_jax.sampling.files import CSV_FILE, read_sites

ARCHIVE_NAME = "clean_custom_geography"


def settings_from_config(d) -> Settings:
    return Settings(
        windows=tuple(tuple(datetime.date.fromisoformat(x) for x in w) for w in d.windows),
        acquisitions_per_window=d.acquisitions_per_window,
        min_acquisitions_per_window=d.min_acquisitions_per_window,
        max_scene_cloud=d.max_scene_cloud,
        max_patch_cloud_fraction=d.max_patch_cloud_fraction,
        cloud_mask=d.cloud_mask,
        concurrent_requests=d.concurrent_requests,
        max_retries=d.max_retries,
        retry_base_seconds=d.retry_base_seconds,
        preview=d.preview,
    )


def paths(config, workdir: str) -> tuple[str, str]:
    """(locations CSV, archive folder) for this config and workdir."""
    from caco_jax.sampling.task import output_dir

    locations = config.download.locations or os.path.join(output_dir(config, workdir), CSV_FILE)
    archive = config.download.output or os.path.join(workdir, "archive", ARCHIVE_NAME)
    return locations, archive


def run(client, config, workdir: str, progress: bool = True) -> dict:
    """The task with any `Client`: tests pass a fake one, `run_task` the Earth Engine one."""
    locations, archive = paths(config, workdir)
    sites = read_sites(locations)
    summary = download_all(
        client, sites, archive, settings_from_config(config.download), progress=progress
    )
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


def run_task(config, workdir: str) -> dict:
    from caco_jax.download.earth_engine import EarthEngineClient

    client = EarthEngineClient(config.download.collection, project=config.download.project)
    return run(client, config, workdir, progress=config.logging.progress_bar)


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
