"""The prepared `caco_geography` dataset of a run: its settings, the `prepare` task, and finding it.

`config.data` (`DataSettings`) names the archive and the TFDS data_dir of its records; both default
to the workdir (`runtime.workdir`). The `prepare` task turns the archive into records with the
builder (`data.builder`), `open_records` opens them for pretraining and the products, and in a
multi-process run the processes other than 0 wait for process 0's records (`wait_for_dataset`)
and all of them check that they read the same ones (`check_same_dataset`).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import shutil
import sys
import time

from caco_jax.data import archive, location_index, normalization
from caco_jax.data import builder as builder_lib
from caco_jax.data.records import Records
from caco_jax.runtime import errors, locks, storage
from caco_jax.runtime.workdir import Workdir
from caco_jax.settings import Section, SettingsError

BUILDER_CONFIGS = ("rgb", "all_bands")
_POLL_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class DataSettings(Section):
    """`config.data`: the archive and its prepared records."""

    SECTION = "data"
    # The folder holding the tar.gz, the *_part* files or an extracted archive; "" = the synthetic
    # archive the `synthesize` task writes into the workdir.
    archive: str = ""
    data_dir: str = ""  # TFDS data_dir of the prepared records; "" = <workdir>/tfds
    builder_config: str = "rgb"  # "rgb" or "all_bands"
    max_skip_fraction: float = 0.05  # the build fails when more locations than this are skipped
    num_workers: int = 0  # processes writing the records (and a synthetic archive); 0 = per core
    # Multi-process runs: how long processes other than 0 wait for the records process 0
    # prepares before giving up with an error.
    wait_seconds: float = 6 * 3600.0

    def validate(self) -> None:
        self.require(
            self.builder_config in BUILDER_CONFIGS, "builder_config", f"one of {BUILDER_CONFIGS}"
        )
        self.require(0.0 <= self.max_skip_fraction <= 1.0, "max_skip_fraction", "in [0, 1]")
        self.require(self.num_workers >= 0, "num_workers", "must be >= 0")
        self.require(self.wait_seconds > 0, "wait_seconds", "must be > 0")

    def records_dir(self, workdir) -> str:
        """The TFDS data_dir of the records: ``data_dir``, or the workdir's."""
        return self.data_dir or Workdir.of(workdir).tfds

    def archive_dir(self, workdir) -> str:
        """The archive: ``archive``, or the synthetic one in the workdir."""
        return self.archive or Workdir.of(workdir).synthetic_archive


class DatasetWaitError(errors.UserError, RuntimeError):
    """Process 0's prepared dataset did not appear in time."""


class DatasetMismatchError(errors.UserError, RuntimeError):
    """The processes see different datasets."""


class OutdatedRecordsError(errors.UserError, RuntimeError):
    """The records were prepared by an earlier builder version, whose layout this cannot read."""


class ArchiveChangedError(archive.ArchiveError):
    """The data_dir holds records of another archive, or of this one before it changed."""


def check_task(settings) -> None:
    """Before any work: the `prepare` task writes its records as local files."""
    if storage.is_url(settings.data.data_dir):  # reading prepared records from a bucket works
        raise SettingsError(
            "config.data.data_dir: prepare writes the records as local files: a local folder or "
            "a mounted bucket (gcsfuse), not a URL (see docs/running.md)"
        )


def builder(data: DataSettings, workdir, **kwargs) -> builder_lib.CacoGeography:
    """The `caco_geography` builder of ``data``'s records (nothing is read or written)."""
    return builder_lib.CacoGeography(
        config=data.builder_config, data_dir=data.records_dir(workdir), **kwargs
    )


def run_task(settings, workdir) -> dict:
    """Task `prepare`: the archive -> TFDS records under `config.data.data_dir` (default
    `<workdir>/tfds`).

    One prepare writes into a data_dir at a time (its `locks.WriterLock`; another is refused at
    once), and it first removes the temporary folders of builds that were interrupted there.
    Records already prepared there are reused only while the archive's fingerprint (its files'
    names, sizes and modification times, or a folder's location count) matches the one stored
    when they were prepared; otherwise one line says what changed (`check_reusable`).
    """
    data = settings.data
    path = data.archive_dir(workdir)
    if not data.archive and not os.path.isdir(path):
        raise archive.ArchiveError(
            f"config.data.archive is empty and there is no synthetic archive at {path}: set "
            "config.data.archive to the folder holding a CACo archive, or run the 'synthesize' task"
        )
    source = archive.find_archive(path)
    with locks.WriterLock(data.records_dir(workdir), "data_dir"):
        prepared = builder(
            data,
            workdir,
            max_skip_fraction=data.max_skip_fraction,
            num_workers=data.num_workers,
            archive_path=source.paths[0],
        )
        remove_interrupted_builds(prepared)
        reused = prepared.is_prepared()
        if reused:
            how = check_reusable(prepared, source)
            print(
                f"prepare: reusing the records in {prepared.data_path} ({how}); delete that "
                "folder to prepare them again",
                flush=True,
            )
        else:
            prepared.download_and_prepare()
    metadata = prepared.info.metadata
    return dict(
        data_dir=data.records_dir(workdir),
        dataset=f"{prepared.name}/{prepared.builder_config.name}",
        records=os.fspath(prepared.data_path),
        skip_report=os.fspath(prepared.data_path / builder_lib.SKIP_REPORT),
        **{k: metadata[k] for k in ("source_files", "locations_written", "locations_skipped")},
        acquisitions_written=metadata["acquisitions_written"],
        reused=reused,
    )


def remove_interrupted_builds(prepared: builder_lib.CacoGeography) -> list[str]:
    """Removes the temporary folders (TFDS's ``incomplete.*``) that interrupted builds of this
    builder config left in its data_dir, saying so; returns them. Only a holder of the data_dir's
    lock may call this: no other build of this config can be running there."""
    config_dir = os.path.dirname(os.fspath(prepared.data_path))
    if not os.path.isdir(config_dir):
        return []
    stale = sorted(
        os.path.join(config_dir, name)
        for name in os.listdir(config_dir)
        if name.startswith(_INCOMPLETE_PREFIX)
    )
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"prepare: removed {folder}, left by an interrupted build", file=sys.stderr)
    return stale


def check_reusable(prepared: builder_lib.CacoGeography, source: archive.ArchiveSource) -> str:
    """How the prepared records are known to come from ``source`` as it is now; raises
    ArchiveChangedError naming what differs otherwise.

    Records of this version store the archive's fingerprint (`ArchiveSource.fingerprint`). Those
    prepared before fingerprints were stored are compared by what their metadata holds: the file
    names and total size of a tar form, the location count of a folder."""
    metadata = prepared.info.metadata
    where = prepared.data_path
    fix = f"delete {where} to prepare them again, or set config.data.data_dir to another folder"
    names = list(metadata.get("source_files") or [])
    if names != list(source.names):
        raise ArchiveChangedError(
            f"{where} holds records prepared from {names}, not from {list(source.names)}: {fix}"
        )
    stored = metadata.get(builder_lib.SOURCE_FINGERPRINT)
    current = source.fingerprint()
    if stored is None:  # prepared before fingerprints were stored
        if source.form == "folder":
            then, now = metadata.get("locations_read"), current["locations"]
            what = "location folders"
        else:
            then, now = metadata.get("source_bytes"), source.total_bytes
            what = "bytes"
        if then != now:
            raise ArchiveChangedError(
                f"{where} holds records prepared from {source.label} when it had {then} {what}; "
                f"it has {now} now: {fix}"
            )
        return f"prepared before archives were fingerprinted; the names and {what} match"
    stored = _as_lists(stored)
    if stored != current:
        raise ArchiveChangedError(
            f"{where} holds records prepared from {source.label} as it was then; it changed since "
            f"({_fingerprint_change(stored, current)}): {fix}"
        )
    if source.form == "folder":
        return f"{source.label} has the same {current['locations']} location folders"
    return f"{source.label}: the same names, sizes and modification times"


_INCOMPLETE_PREFIX = "incomplete."  # TFDS's temporary build folders


def _as_lists(value):
    """Tuples as lists, recursively (JSON and TFDS's metadata give lists)."""
    if isinstance(value, list | tuple):
        return [_as_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_lists(v) for k, v in value.items()}
    return value


def _fingerprint_change(stored: dict, current: dict) -> str:
    if "locations" in stored or "locations" in current:
        return f"{stored.get('locations')} location folders then, {current.get('locations')} now"
    then = {name: (size, mtime) for name, size, mtime in stored.get("files", [])}
    now = {name: (size, mtime) for name, size, mtime in current.get("files", [])}
    changes = []
    for name in sorted(set(then) | set(now)):
        if name not in now:
            changes.append(f"{name} gone")
        elif name not in then:
            changes.append(f"{name} new")
        elif then[name] != now[name]:
            (size0, mtime0), (size1, mtime1) = then[name], now[name]
            changes.append(
                f"{name}: {size0:,} bytes modified {_when(mtime0)} then, {size1:,} bytes "
                f"modified {_when(mtime1)} now"
            )
    return "; ".join(changes) or "another form"


def _when(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def open_records(data_dir: str, builder_config: str = "rgb", split: str = "train") -> Records:
    """The prepared records of `caco_geography/<builder_config>` under `data_dir`; never prepares.

    Raises FileNotFoundError naming the folder when they are not there, OutdatedRecordsError when
    only an earlier version's records are.
    """
    prepared = builder_lib.CacoGeography(config=builder_config, data_dir=data_dir)
    if not prepared.is_prepared():
        config_dir = os.path.dirname(os.fspath(prepared.data_dir))
        outdated = _earlier_versions(config_dir, str(prepared.version))
        if outdated:
            raise OutdatedRecordsError(
                f"{outdated[0]}: caco_geography/{builder_config} records of version "
                f"{os.path.basename(outdated[0])} (one record per location) cannot be read by "
                f"this version ({prepared.version}, one record per acquisition): delete "
                f"{outdated[0]} and run the 'prepare' task"
            )
        raise FileNotFoundError(
            f"{prepared.data_dir}: no prepared caco_geography/{builder_config} records; run the "
            "'prepare' task (python run.py --config ... with 'prepare' in config.tasks) first"
        )
    index_path = os.fspath(prepared.data_path / location_index.FILENAME)
    if not os.path.exists(index_path):
        raise FileNotFoundError(
            f"{index_path}: the records' location index is missing; delete "
            f"{prepared.data_path} and run the 'prepare' task"
        )
    index = location_index.LocationIndex.load(index_path)
    acquisitions = prepared.as_data_source(split=split)
    if len(acquisitions) != index.num_acquisitions:
        raise ValueError(
            f"{index_path} lists {index.num_acquisitions} acquisitions, the {split} records hold "
            f"{len(acquisitions)}; delete {prepared.data_path} and run the 'prepare' task"
        )
    stored = prepared.info.metadata.get(normalization.STORED_KEY)
    return Records(acquisitions, index, prepared.pixel_shapes(), stored)


def _earlier_versions(config_dir: str, current: str) -> list[str]:
    """Prepared version folders of another version than `current` under `config_dir`."""
    if not os.path.isdir(config_dir):
        return []
    return [
        os.path.join(config_dir, name)
        for name in sorted(os.listdir(config_dir))
        if name != current and os.path.exists(os.path.join(config_dir, name, "dataset_info.json"))
    ]


# ----------------------------------------------------------------------------------------------
# Several processes: process 0 prepares, the others wait, all check they read the same records.


def wait_for_dataset(settings, workdir, poll_seconds: float = _POLL_SECONDS) -> dict:
    """What the processes other than 0 do during `prepare`: wait until the records of
    `config.data` are prepared (by process 0), at most `config.data.wait_seconds`; raise
    DatasetWaitError naming the folder otherwise."""
    import jax

    data = settings.data
    directory = data.records_dir(workdir)
    # TFDS prepares in a temporary folder and renames it when complete, dataset_info.json inside.
    info = builder(data, workdir).data_path / "dataset_info.json"
    start = time.monotonic()
    while not info.exists():
        if time.monotonic() - start >= data.wait_seconds:
            raise DatasetWaitError(
                f"process {jax.process_index()}: no prepared caco_geography/"
                f"{data.builder_config} records in {directory} after {data.wait_seconds:g} s "
                "(config.data.wait_seconds); process 0 prepares them there: is that folder on "
                "storage every host shares, and did process 0 fail?"
            )
        time.sleep(poll_seconds)
    return {"data_dir": directory, "waited_seconds": round(time.monotonic() - start, 1)}


def dataset_fingerprint(data: DataSettings, workdir) -> str:
    """SHA-256 of the prepared dataset's description (`dataset_info.json`, `metadata.json`)."""
    prepared = builder(data, workdir)
    if not prepared.is_prepared():
        raise FileNotFoundError(
            f"{prepared.data_dir}: no prepared caco_geography/{data.builder_config} records"
        )
    digest = hashlib.sha256()
    for name in ("dataset_info.json", "metadata.json"):
        path = prepared.data_path / name
        digest.update(name.encode())
        digest.update(path.read_bytes() if path.exists() else b"(none)")
    return digest.hexdigest()


def check_same_dataset(data: DataSettings, workdir) -> None:
    """Every process compares the fingerprints of all; all raise DatasetMismatchError together."""
    import numpy as np
    from jax.experimental import multihost_utils

    mine = dataset_fingerprint(data, workdir)
    everyone = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(mine), np.uint8))
    fingerprints = [bytes(row).hex() for row in np.asarray(everyone)]
    differing = [i for i, f in enumerate(fingerprints) if f != fingerprints[0]]
    if differing:
        raise DatasetMismatchError(
            f"processes {differing} see another caco_geography/{data.builder_config} "
            f"dataset in {data.records_dir(workdir)} than process 0 (fingerprints of "
            "dataset_info.json and metadata.json differ): every host must read the same "
            "prepared records"
        )
