"""The `caco_geography` TFDS builder: a CACo archive -> array_record records, one per acquisition.

    builder = tfds.builder("caco_geography/rgb", data_dir=DATA_DIR)   # after `import caco_jax`
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=ARCHIVE))

ARCHIVE holds the `.tar.gz`, the `*_part*` files or the extracted folder (see archive.py); nothing
is extracted. The parent process streams the archive and ships one location's raw bytes at a time to
worker processes that decode the GeoTIFFs and write the records into their own array_record shards
(shard_writer.py); a few locations per worker are in flight, so memory does not grow with the
archive.

Records (version 2.0.0): one per acquisition, each with its location's id and centre, the
acquisitions of a location contiguous and in time order, so a training item decompresses only the
acquisitions it draws. Beside them, ``location_index.npz`` (`location_index.py`) lists every
location and its acquisitions (window, date, cloud) in record order: what the input pipeline draws
from and what start-up reads, without touching pixels. Version 1.0.0 (one record per location,
holding all its acquisitions) is refused with a message saying how to prepare again.

The builder is a `FileReaderBuilder` with its own `_download_and_prepare` because TFDS's
generator path funnels every record through the parent and compresses them all in one thread after
the last location, which made preparing 2-2.4x slower than `tar -xzf` (BENCHMARKS.md).

Every skipped location and acquisition is written to `skip_report.tsv` beside the records, the
totals and the source archive go into the dataset's metadata (`metadata.json`), and the build fails,
leaving no dataset behind, when more than `max_skip_fraction` of the locations are skipped. TFDS
writes into a temporary folder and renames it when the build succeeds, so an interrupted build never
leaves a dataset that looks prepared.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import logging
import os
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_builder

from caco_jax.data import archive, layout, location_index, normalization, records, shard_writer
from caco_jax.runtime import errors, storage
from caco_jax.runtime import progress as progress_lib

SKIP_REPORT = "skip_report.tsv"
# The metadata key of the source archive's `ArchiveSource.fingerprint` at prepare time.
SOURCE_FINGERPRINT = "source_fingerprint"
# Where the report of a build that failed for too many skips goes, beside the version folders.
FAILED_SKIP_REPORT = "skip_report.failed.tsv"

# The pixels of each config: feature name -> bands stacked as its channels, at native resolution.
PIXEL_GROUPS = {
    "rgb": {"rgb": layout.RGB_BANDS},
    "all_bands": {f"bands_{res}m": layout.BANDS_AT_RESOLUTION[res] for res in (10, 20, 60)},
}
# Raw uint8 bytes per acquisition; array_record compresses each record (see BENCHMARKS.md).
PIXEL_ENCODING = tfds.features.Encoding.BYTES


class _QuietUnpreparedFolders(logging.Filter):
    """Drops TFDS's "Variant folder <path> has no dataset_info.json", which every `is_prepared` of
    a dataset not prepared yet logs (the normal state before a first prepare, for caco_geography
    and the evaluation datasets alike)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("Variant folder ") and " has no " in str(record.msg))


logging.getLogger("absl").addFilter(_QuietUnpreparedFolders())


class TooManySkipsError(errors.UserError, RuntimeError):
    """More locations were skipped than `max_skip_fraction` allows; no dataset was written."""


@dataclasses.dataclass
class CacoGeographyConfig(tfds.core.BuilderConfig):
    pixel_groups: dict = dataclasses.field(default_factory=dict)


def pixel_features(groups) -> dict:
    return {
        name: tfds.features.Tensor(
            shape=(*layout.band_shape(bands[0]), len(bands)),
            dtype=np.uint8,
            encoding=PIXEL_ENCODING,
        )
        for name, bands in groups.items()
    }


def acquisition_features(groups) -> tfds.features.FeaturesDict:
    """One record: an acquisition, with its location and the pixels of `groups`."""
    return tfds.features.FeaturesDict(
        {
            "location_id": tfds.features.Text(doc="location folder name"),
            "lat": tfds.features.Scalar(np.float32, doc="location centre latitude (degrees)"),
            "lon": tfds.features.Scalar(np.float32, doc="location centre longitude (degrees)"),
            "product_id": tfds.features.Text(doc="acquisition folder name (Earth Engine id)"),
            "date": tfds.features.Text(doc="sensing time, ISO YYYY-MM-DDTHH:MM:SS"),
            "window": tfds.features.Scalar(np.int64, doc="0 early, 1 late"),
            "cloud": tfds.features.Scalar(
                np.float32, doc="CLOUDY_PIXEL_PERCENTAGE, NaN if unknown"
            ),
            **pixel_features(groups),
        }
    )


# FileReaderBuilder (the base of GeneratorBasedBuilder, not re-exported by tfds.core) reads the
# records like any TFDS dataset and leaves writing them to `_download_and_prepare`.
class CacoGeography(dataset_builder.FileReaderBuilder):
    """The locations of a CACo archive (10k, 100k, 1m or the synthetic one), both windows each."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES: ClassVar = {
        "1.0.0": "First release: one record per location.",
        "2.0.0": "One record per acquisition, and the side index location_index.npz.",
    }
    BUILDER_CONFIGS: ClassVar = [
        CacoGeographyConfig(
            name="rgb",
            description="B4, B3, B2 at 264x264 (what the paper trains on).",
            pixel_groups=PIXEL_GROUPS["rgb"],
        ),
        CacoGeographyConfig(
            name="all_bands",
            description="All 12 bands at their native 10/20/60 m resolutions.",
            pixel_groups=PIXEL_GROUPS["all_bands"],
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download a CACo archive (caco10k.tar.gz, the clean_100k/1m geography files, or the four
    clean_1m_geography_part* files) into one folder and pass that folder (or the file) as
    manual_dir. Neither `cat` nor extraction is needed; an already extracted folder works too.
    """

    def __init__(
        self,
        *,
        max_skip_fraction: float = 0.05,
        num_workers: int = 0,
        archive_path: str | None = None,
        **kwargs,
    ):
        """`archive_path` (a file or folder, see `archive.find_archive`) replaces manual_dir, which
        TFDS requires to be a folder."""
        self._max_skip_fraction = max_skip_fraction
        self._archive_path = archive_path
        self._num_workers = num_workers or os.cpu_count() or 1
        # array_record: random access (tfds.data_source, grain) and no TensorFlow to write or read.
        kwargs.setdefault("file_format", tfds.core.FileFormat.ARRAY_RECORD)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "CACo (Mall et al., CVPR 2023) pretraining locations, one record per Sentinel-2 "
                "acquisition: its location's id and centre lat/lon, its window (early / late), "
                "uint8 pixels as stored in the archive's GeoTIFFs and cloud percentage; the "
                "acquisitions of a location are contiguous and in time order, and "
                f"{location_index.FILENAME} beside the records lists the locations. "
                "The source archive, counts and skips are in the metadata; skipped locations and "
                f"acquisitions are listed in {SKIP_REPORT} beside the records."
            ),
            features=acquisition_features(self.builder_config.pixel_groups),
            homepage="https://github.com/utkarshmall13/CACo",
            metadata=tfds.core.MetadataDict(),
            # Records are in archive order (interleaved over shard_writer.LANES), not hashed.
            disable_shuffling=True,
        )

    def _download_and_prepare(self, dl_manager, download_config=None) -> None:
        del download_config  # its options address TFDS's generic writer, which is not used here
        if self.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise ValueError(
                f"caco_geography writes array_record files only, not {self.info.file_format}: "
                "leave file_format unset (random access for tfds.data_source and grain)"
            )
        storage.local_records_dir(os.fspath(self.data_dir_root), key="data_dir")
        source = archive.find_archive(self._archive_path or dl_manager.manual_dir)
        fingerprint = source.fingerprint()  # as the archive is when reading starts
        groups = self.builder_config.pixel_groups
        keep = frozenset(
            {layout.METADATA_FILE} | {layout.band_file(b) for g in groups.values() for b in g}
        )
        progress = archive.ReadProgress()
        report = SkipReport()
        index = location_index.IndexBuilder()
        template = self._get_filename_template(split_name="train")
        bar = progress_lib.bar(desc=f"Preparing {source.label}", unit="locations")

        def on_location(written: shard_writer.WrittenLocation) -> None:
            report.add(written)
            if written.indexed:
                index.add(written.shard_rank, written.indexed)
            bar.update(1)
            if source.total_bytes:
                bar.set_postfix(
                    read=f"{progress.bytes_read / source.total_bytes:.0%}", refresh=False
                )

        with bar:
            shards = shard_writer.write_shards(
                archive.read_locations(source, keep, progress),
                groups=groups,
                features=self.info.features,
                directory=os.fspath(self.data_path),
                prefix=os.path.basename(template.filepath_prefix()),
                num_workers=self._num_workers,
                on_location=on_location,
            )
        self._finish(source, report)
        self.info.metadata[SOURCE_FINGERPRINT] = fingerprint
        built = index.build()
        built.save(self.data_path / location_index.FILENAME)
        self._name_shards(template, shards)
        if self.builder_config.name != "rgb":  # rgb uses SeCo's published statistics
            self.info.metadata[normalization.STORED_KEY] = self._band_statistics(built)

    def is_prepared(self) -> bool:
        """Whether the records are there. TFDS's own check logs a warning ("Variant folder ...
        has no dataset_info.json") for a folder without records, the normal state before the
        first `prepare`."""
        if not (self.data_path / "dataset_info.json").exists():
            return False
        return super().is_prepared()

    # TFDS prints "Downloading and preparing dataset Unknown size (download: Unknown size, ...)"
    # before and "Dataset ... downloaded and prepared to ..." after a build: nothing is downloaded
    # and the sizes are unknown until the end, so `_finish` says what was written instead.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _band_statistics(self, index: location_index.LocationIndex) -> dict:
        """The per-band input statistics of the records just written (`normalization`)."""
        source = records.Records(self.as_data_source(split="train"), index, self.pixel_shapes())
        return normalization.statistics_record(source)

    def pixel_shapes(self) -> dict:
        """{pixel feature: [H, W, C]} of this config's records."""
        features = self.info.features
        return {group: features[group].shape for group in self.builder_config.pixel_groups}

    def _name_shards(self, template, shards: list[shard_writer.Shard]) -> None:
        """Renames the workers' shard files to TFDS's names and records the train split."""
        paths = [
            os.fspath(template.sharded_filepath(shard_index=index, num_shards=len(shards)))
            for index in range(len(shards))
        ]
        for shard, path in zip(shards, paths, strict=True):
            os.replace(shard.path, path)
        split = tfds.core.SplitInfo(
            name="train",
            shard_lengths=[shard.num_records for shard in shards],
            num_bytes=sum(os.path.getsize(path) for path in paths),
            filename_template=template,
        )
        self.info.set_splits(tfds.core.SplitDict([split]))

    def _finish(self, source: archive.ArchiveSource, report: SkipReport) -> None:
        """Writes the report and provenance, or fails (leaving no dataset) on too many skips."""
        summary = report.summary()
        print(f"caco_geography/{self.builder_config.name}: {report.describe()}", flush=True)
        if not report.num_locations:
            raise archive.ArchiveError(f"{source.paths[0]}: no location folders found")
        if report.num_kept == 0 or report.skipped_fraction > self._max_skip_fraction:
            failed = self.data_dir_root / self.name / self.builder_config.name / FAILED_SKIP_REPORT
            failed.parent.mkdir(parents=True, exist_ok=True)
            report.write(failed)
            raise TooManySkipsError(
                f"{source.label}: skipped {report.num_skipped} of "
                f"{report.num_locations} locations ({report.skipped_fraction:.1%}), more than "
                f"max_skip_fraction={self._max_skip_fraction}; reasons: {summary['skip_reasons']}. "
                f"Report: {failed}. No dataset was written."
            )
        report.write(self.data_path / SKIP_REPORT)
        stale = self.data_dir_root / self.name / self.builder_config.name / FAILED_SKIP_REPORT
        stale.unlink(missing_ok=True)
        self.info.metadata.update(
            source_form=source.form,
            source_files=list(source.names),
            source_bytes=source.total_bytes,
            skip_report=SKIP_REPORT,
            max_skip_fraction=self._max_skip_fraction,
            **summary,
        )


class SkipReport:
    """Every location and acquisition left out or degraded, and why; written as a TSV."""

    COLUMNS = ("location_id", "product_id", "action", "reason")

    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []
        self.num_locations = 0
        self.num_kept = 0
        self.num_acquisitions = 0
        self.ignored_files = 0
        self.split_rules = collections.Counter()

    def add(self, written: shard_writer.WrittenLocation) -> None:
        decoded = written.decoded
        self.num_locations += 1
        self.ignored_files += decoded.ignored
        for product_id, action, reason in decoded.issues:
            self.rows.append((decoded.location_id, product_id, action, reason))
        if decoded.skip_reason:
            self.rows.append((decoded.location_id, "", "location skipped", decoded.skip_reason))
        else:
            self.num_kept += 1
            self.num_acquisitions += written.num_acquisitions
            self.split_rules[decoded.split_rule] += 1

    @property
    def num_skipped(self) -> int:
        return self.num_locations - self.num_kept

    @property
    def skipped_fraction(self) -> float:
        return self.num_skipped / max(self.num_locations, 1)

    def summary(self) -> dict:
        kinds = collections.Counter(
            f"{action}: {reason.split(':')[0]}" for _, _, action, reason in self.rows
        )
        return dict(
            locations_read=self.num_locations,
            locations_written=self.num_kept,
            locations_skipped=self.num_skipped,
            acquisitions_written=self.num_acquisitions,
            acquisitions_skipped=sum(r[2] == "acquisition skipped" for r in self.rows),
            ignored_files=self.ignored_files,
            window_split=dict(self.split_rules),
            skip_reasons=dict(sorted(kinds.items())),
        )

    def describe(self) -> str:
        s = self.summary()
        return (
            f"{s['locations_written']} of {s['locations_read']} locations written "
            f"({s['acquisitions_written']} acquisitions); skipped {s['locations_skipped']} "
            f"locations and {s['acquisitions_skipped']} acquisitions; "
            f"{s['ignored_files']} non-data files ignored"
        )

    def write(self, path) -> None:
        with open(os.fspath(path), "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(self.COLUMNS)
            writer.writerows(self.rows)
