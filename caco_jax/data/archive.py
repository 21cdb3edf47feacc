"""Reading a CACo archive, in any of its published forms, as a stream of locations.

One entry point, `find_archive(path)`, accepts a single `.tar.gz`, the ordered `*_part*` files of
a split archive (read as ONE stream: their byte concatenation is the tar.gz, so no concatenated copy
is made), or an already extracted folder, with or without its enclosing top folder.
`read_locations` then yields one `Location` (the raw bytes of the files a config needs) at a time:
nothing is extracted to disk and only the location being read is held in memory. `decode_location`
turns those bytes into pixels, dates and windows; it runs in worker processes (see builder.py), so
it takes and returns picklable values only.

A tar location is complete when the stream moves past its folder. The published tars are written
folder by folder; a location whose members are not contiguous is an error naming it, never a silent
split.

Sizes are checked before anything is read: a file larger than the layout allows
(`layout.max_file_bytes`) is skipped unread and reported, a location keeps at most
`layout.MAX_ACQUISITIONS_PER_LOCATION` acquisition folders (more skips it), and a band's width,
height, count and type come from its GeoTIFF header before any pixel is decoded. So one location
holds at most `max_location_bytes` in memory, whatever the archive holds.
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import json
import math
import os
import re
import tarfile
import zlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from caco_jax.data import layout
from caco_jax.runtime import errors

_DRAIN_BYTES = 1 << 20
_TAR_SUFFIXES = (".tar.gz", ".tgz")
_PART = re.compile(r"^(?P<base>.+)_part(?P<index>[0-9]+|[a-z]+)(?P<suffix>(\.tar)?\.gz|\.tgz)?$")
# Files an acquisition folder is expected to hold (a config reads some of them).
_ACQUISITION_FILES = frozenset({layout.METADATA_FILE} | {layout.band_file(b) for b in layout.BANDS})
# Directory entries that may precede the first acquisition of a tar before its layout is known.
_MAX_LEADING_ENTRIES = 10_000


class ArchiveError(errors.UserError):
    """The archive cannot be read as a whole (truncated, corrupt, ambiguous, out of order)."""


@dataclasses.dataclass(frozen=True)
class ArchiveSource:
    """Where an archive is and in which form: 'tar.gz', 'parts' (in stream order) or 'folder'."""

    form: str
    paths: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(os.path.basename(os.path.normpath(p)) for p in self.paths)

    @property
    def label(self) -> str:
        """The archive's name for messages: the file, the first part (+ how many) or the folder."""
        more = f" (+{len(self.names) - 1} parts)" if len(self.names) > 1 else ""
        return self.names[0] + more

    @property
    def total_bytes(self) -> int:
        """Compressed bytes of the stream; 0 for a folder (its size is not known without a walk)."""
        return 0 if self.form == "folder" else sum(os.path.getsize(p) for p in self.paths)

    def fingerprint(self) -> dict:
        """What tells this archive from another or from itself changed, without reading it: the
        name, size and modification time (whole seconds) of each file of a tar form; the name and
        the number of location folders of a folder. JSON-able; prepare stores it with the
        records and reuses them only while it matches."""
        if self.form == "folder":
            root = self.paths[0]
            count = sum(1 for entry in os.scandir(root) if _is_data_dir(entry))
            return {"form": self.form, "files": list(self.names), "locations": count}
        files = []
        for path in self.paths:
            status = os.stat(path)
            files.append([os.path.basename(path), status.st_size, int(status.st_mtime)])
        return {"form": self.form, "files": files}


@dataclasses.dataclass
class Location:
    """The raw files of one location folder that a config needs.

    `acquisitions` maps each acquisition folder name (product id) to {file name: bytes}; files that
    could not be read are in `unreadable` ({"<product id>/<file name>": reason}) instead.
    `ignored` counts the files that are not data: preview `.tif` siblings and unknown files (stray
    files such as `.DS_Store` are skipped without counting).
    """

    location_id: str
    acquisitions: dict[str, dict[str, bytes]] = dataclasses.field(default_factory=dict)
    unreadable: dict[str, str] = dataclasses.field(default_factory=dict)
    ignored: int = 0
    # Acquisition folders beyond `layout.MAX_ACQUISITIONS_PER_LOCATION`, not read: the location is
    # skipped.
    dropped_acquisitions: set[str] = dataclasses.field(default_factory=set)

    def add_acquisition(self, product_id: str) -> dict[str, bytes] | None:
        """The files of acquisition ``product_id`` (created on first sight), or None when the
        location already holds the most acquisitions a reader keeps."""
        if product_id in self.acquisitions:
            return self.acquisitions[product_id]
        if len(self.acquisitions) >= layout.MAX_ACQUISITIONS_PER_LOCATION:
            self.dropped_acquisitions.add(product_id)
            return None
        return self.acquisitions.setdefault(product_id, {})

    def keep_file(self, product_id: str, name: str, size: int, read) -> None:
        """Keeps the bytes of a file the config needs (``read()`` gives them) when its ``size``
        is one the layout allows; otherwise records it as unreadable, unread."""
        files = self.add_acquisition(product_id)
        if files is None:
            return
        limit = layout.max_file_bytes(name)
        if size > limit:
            self.unreadable[f"{product_id}/{name}"] = (
                f"{size:,} bytes, more than the {limit:,} a {name} of the archive's layout can "
                "hold (not read)"
            )
            return
        try:
            files[name] = read()
        except OSError as error:
            self.unreadable[f"{product_id}/{name}"] = str(error)


def max_location_bytes(keep: frozenset[str]) -> int:
    """The most bytes of the files in ``keep`` that one location can hold in memory."""
    per_acquisition = sum(layout.max_file_bytes(name) for name in keep)
    return layout.MAX_ACQUISITIONS_PER_LOCATION * per_acquisition


def find_archive(path: str | os.PathLike) -> ArchiveSource:
    """Resolves `path` to one archive: a `.tar.gz` file, one `*_part*` file or a folder holding one
    archive in any form (a tar.gz, the parts, or the extracted folder, with or without top folder).

    Raises ArchiveError naming what was found when there is no archive or more than one.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ArchiveError(f"{path}: no such file or folder (expected a CACo archive)")
    if os.path.isfile(path):
        parts = _part_groups([path])
        if parts:
            base = next(iter(parts))
            return _parts_source(base, _part_groups(_files_in(os.path.dirname(path) or "."))[base])
        if path.endswith(_TAR_SUFFIXES):
            return ArchiveSource("tar.gz", (path,))
        raise ArchiveError(f"{path}: not a CACo archive (expected *.tar.gz, *_part* or a folder)")
    if _is_archive_folder(path):
        return ArchiveSource("folder", (path,))
    files = _files_in(path)
    candidates = [ArchiveSource("tar.gz", (f,)) for f in files if f.endswith(_TAR_SUFFIXES)]
    candidates = [c for c in candidates if not _PART.match(os.path.basename(c.paths[0]))]
    candidates += [_parts_source(b, ps) for b, ps in sorted(_part_groups(files).items())]
    candidates += [
        ArchiveSource("folder", (d,))
        for d in sorted(e.path for e in os.scandir(path) if _is_data_dir(e))
        if _is_archive_folder(d)
    ]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ArchiveError(
            f"{path}: no CACo archive found: expected a *.tar.gz, *_part* files, or an extracted "
            "folder of location folders holding acquisition folders (YYYYMMDDTHHMMSS_...)"
        )
    found = "; ".join(f"{c.form}: {', '.join(c.names)}" for c in candidates)
    raise ArchiveError(f"{path}: holds several archives ({found}); point at one of them")


def read_locations(
    source: ArchiveSource, keep: frozenset[str], progress: ReadProgress | None = None
) -> Iterator[Location]:
    """Yields the archive's locations one at a time, with the bytes of the acquisition files in
    `keep` (e.g. {"B4.tif", "B3.tif", "B2.tif", "metadata.json"}); other files are skipped unread.

    Folder form: locations and acquisitions in name order. Tar forms: in stream order.
    `progress.bytes_read` follows the compressed bytes consumed (tar forms).
    """
    if source.form == "folder":
        yield from _read_folder(source.paths[0], keep)
    else:
        yield from _read_tar(source, keep, progress or ReadProgress())


# ---------------------------------------------------------------------------------------------
# Input forms.


@dataclasses.dataclass
class ReadProgress:
    """How far a tar stream got: compressed bytes consumed and the file being read."""

    bytes_read: int = 0
    current_file: str = ""


def _files_in(folder: str) -> list[str]:
    return sorted(
        e.path for e in os.scandir(folder) if e.is_file() and not layout.is_stray_name(e.name)
    )


def _is_data_dir(entry: os.DirEntry) -> bool:
    return entry.is_dir() and not layout.is_stray_name(entry.name)


def _is_archive_folder(folder: str) -> bool:
    """A folder one of whose first few location folders holds an acquisition folder."""
    locations = sorted((e for e in os.scandir(folder) if _is_data_dir(e)), key=lambda e: e.name)
    return any(
        _is_data_dir(e) and layout.is_acquisition_name(e.name)
        for location in locations[:5]
        for e in os.scandir(location)
    )


def _is_unknown_file(name: str) -> bool:
    return name not in _ACQUISITION_FILES and not layout.is_stray_name(name)


def _natural_key(index: str) -> tuple[int, str]:
    return (int(index), "") if index.isdigit() else (-1, index)


def _part_groups(files: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """{base name: [(index, path), ...] in stream order} of the `<base>_part<index>` files."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for f in files:
        match = _PART.match(os.path.basename(f))
        if match:
            groups.setdefault(match["base"], []).append((match["index"], f))
    for parts in groups.values():
        parts.sort(key=lambda p: _natural_key(p[0]))
    return groups


def _parts_source(base: str, parts: list[tuple[str, str]]) -> ArchiveSource:
    """The parts as one source, once their names show none is missing before the last: numbered
    from 0 (or 1) or lettered from ``a``/``aa`` (split's suffixes), without gaps, the first one
    starting a gzip stream."""
    indices = [index for index, _ in parts]
    if all(i.isdigit() for i in indices):
        numbers = [int(i) for i in indices]
        first = 0 if numbers[0] == 0 or not _starts_gzip(parts[0][1]) else 1
        names = [str(n) for n in numbers]
    elif all(i.isalpha() and len(i) == len(indices[0]) for i in indices):
        numbers = [_letter_number(i) for i in indices]
        first = 0
        names = indices
    else:
        raise ArchiveError(
            f"{base}_part*: parts {indices} mix numbered and lettered names; keep one download's "
            "parts only"
        )
    missing = sorted(set(range(first, numbers[-1] + 1)) - set(numbers))
    if missing:
        width = len(indices[0])
        label = [str(n) if indices[0].isdigit() else _number_letters(n, width) for n in missing]
        hint = ""
        if missing[0] == first and first == numbers[0] - 1:
            hint = f" ({os.path.basename(parts[0][1])} does not start a gzip stream)"
        raise ArchiveError(
            f"{base}_part*: found parts {names}, missing {label}{hint}; the archive is the "
            "concatenation of all its parts: download the missing ones"
        )
    return ArchiveSource("parts", tuple(path for _, path in parts))


def _starts_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _letter_number(letters: str) -> int:
    """split's suffix as a number: a = 0 ... z = 25, aa = 0, ab = 1, ..."""
    number = 0
    for letter in letters:
        number = number * 26 + ord(letter) - ord("a")
    return number


def _number_letters(number: int, width: int) -> str:
    letters = ""
    for _ in range(width):
        number, digit = divmod(number, 26)
        letters = chr(ord("a") + digit) + letters
    return letters


class _ConcatenatedFiles:
    """A read-only stream over files in order, as if they were one file (no copy on disk)."""

    def __init__(self, paths: Sequence[str], progress: ReadProgress):
        self._paths = list(paths)
        self._progress = progress
        self._file = None
        self._next = 0

    def read(self, size: int = -1) -> bytes:
        chunks = []
        while size != 0:
            if self._file is None:
                if self._next == len(self._paths):
                    break
                self._file = open(self._paths[self._next], "rb")  # closed in read() or close()
                self._progress.current_file = self._paths[self._next]
                self._next += 1
            chunk = self._file.read(size)
            if not chunk:
                self._file.close()
                self._file = None
                continue
            chunks.append(chunk)
            self._progress.bytes_read += len(chunk)
            size = size - len(chunk) if size > 0 else size
        return b"".join(chunks)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _read_folder(root: str, keep: frozenset[str]) -> Iterator[Location]:
    for entry in sorted((e for e in os.scandir(root) if _is_data_dir(e)), key=lambda e: e.name):
        location = Location(entry.name)
        for child in sorted(os.scandir(entry.path), key=lambda e: e.name):
            if layout.is_stray_name(child.name):
                continue
            if not (child.is_dir() and layout.is_acquisition_name(child.name)):
                location.ignored += 1  # preview .tif siblings and anything unknown
                continue
            if location.add_acquisition(child.name) is None:
                continue  # more acquisitions than a location may hold: not read
            for item in os.scandir(child.path):
                if item.name not in keep:
                    location.ignored += _is_unknown_file(item.name)
                    continue
                try:
                    size = item.stat().st_size
                except OSError as error:
                    location.unreadable[f"{child.name}/{item.name}"] = str(error)
                    continue
                location.keep_file(child.name, item.name, size, lambda path=item.path: _read(path))
        yield location


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_tar(
    source: ArchiveSource, keep: frozenset[str], progress: ReadProgress
) -> Iterator[Location]:
    where = source.label
    with open(source.paths[0], "rb") as first:
        magic = first.read(2)
    if magic != b"\x1f\x8b":
        raise ArchiveError(f"{source.paths[0]}: not a gzip file (starts with {magic!r})")
    stream = _ConcatenatedFiles(source.paths, progress)
    # GzipFile, not tarfile's own "r|gz": tarfile takes a stream that ends early for the end of the
    # archive, GzipFile raises EOFError unless the gzip trailer (CRC and length) is reached.
    uncompressed = gzip.GzipFile(fileobj=stream, mode="rb")
    parser = _TarLayout(where, keep)
    try:
        # tarfile's default block (10 KiB): its stream re-slices its buffer on every read, so a
        # larger one costs more than it saves.
        with tarfile.open(fileobj=uncompressed, mode="r|") as tar:
            for member in tar:
                read = lambda member=member: tar.extractfile(member).read()
                yield from parser.add(
                    member.name, member.isdir(), member.isfile(), read, member.size
                )
                tar.members = []  # TarFile keeps every member it has read: memory would grow
        while uncompressed.read(_DRAIN_BYTES):  # the padding after the tar's end marker
            pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        last = parser.last_complete or "none"
        parts = (
            " (or download the parts after the last one, if there are more)"
            if source.form == "parts"
            else ""
        )
        raise ArchiveError(
            f"{where}: truncated or corrupt archive: failed after {progress.bytes_read:,} of "
            f"{source.total_bytes:,} compressed bytes "
            f"(in {os.path.basename(progress.current_file)}), "
            f"after {parser.num_complete} complete locations (last: {last}): "
            f"{type(error).__name__}: {' '.join(str(error).split())}. Download it again{parts}."
        ) from error
    finally:
        stream.close()
    yield from parser.finish()


class _TarLayout:
    """Recognises the published layout in tar member paths, in stream order.

    A path is `[top folders/]<location>/<acquisition>/<file>`; the acquisition folder is the first
    component named like a product id (YYYYMMDDTHHMMSS_...), the location is the one before it, and
    the top folders (if any) are learnt from the first acquisition and must then stay the same.
    """

    def __init__(self, where: str, keep: frozenset[str]):
        self._where = where
        self._keep = keep
        self._prefix: tuple[str, ...] | None = None
        self._leading_dirs: list[tuple[str, ...]] = []
        self._current: Location | None = None
        self._complete_ids: set[str] = set()
        self.num_complete = 0
        self.last_complete = ""

    @staticmethod
    def _components(name: str) -> tuple[str, ...] | None:
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        return None if any(layout.is_stray_name(p) for p in parts) else parts

    def add(
        self, name: str, is_dir: bool, is_file: bool, read, size: int = 0
    ) -> Iterator[Location]:
        """Files the config needs are read (`read()` returns their ``size`` bytes) when the layout
        allows their size; others are skipped unread."""
        parts = self._components(name)
        if not parts:
            return
        k = next((i for i, p in enumerate(parts) if layout.is_acquisition_name(p)), None)
        if k is None:
            yield from self._add_outside_acquisitions(parts, is_dir)
            return
        if k == 0:
            raise ArchiveError(
                f"{self._where}: {name}: acquisition folder outside a location folder"
            )
        if self._prefix is None:
            self._prefix = parts[: k - 1]
            for leading in self._leading_dirs:
                yield from self._add_outside_acquisitions(leading, True)
            self._leading_dirs = []
        if parts[: k - 1] != self._prefix:
            raise ArchiveError(
                f"{self._where}: {name}: outside the archive's top folder "
                f"{'/'.join(self._prefix) or '(none)'}"
            )
        yield from self._enter(parts[k - 1], name)
        location = self._current
        if k == len(parts) - 1:  # the acquisition folder itself, or a preview file beside it
            if is_dir:
                location.add_acquisition(parts[k])
            else:
                location.ignored += 1
        elif k == len(parts) - 2 and is_file:
            if parts[-1] in self._keep:
                location.keep_file(parts[k], parts[-1], size, read)
            elif location.add_acquisition(parts[k]) is not None:
                location.ignored += _is_unknown_file(parts[-1])
        elif not is_dir:
            location.ignored += 1

    def _add_outside_acquisitions(self, parts: tuple[str, ...], is_dir: bool) -> Iterator[Location]:
        if self._prefix is None:
            if is_dir:
                self._leading_dirs.append(parts)
                if len(self._leading_dirs) > _MAX_LEADING_ENTRIES:
                    raise ArchiveError(
                        f"{self._where}: no acquisition folder (YYYYMMDDTHHMMSS_...) in the first "
                        f"{_MAX_LEADING_ENTRIES} entries: not a CACo archive"
                    )
            return
        depth = len(self._prefix)
        if (
            parts[:depth] != self._prefix
            or len(parts) == depth
            or (len(parts) == depth + 1 and not is_dir)
        ):
            return  # the top folders themselves, or a file beside the location folders
        yield from self._enter(parts[depth], "/".join(parts))
        if not is_dir:
            self._current.ignored += 1

    def _enter(self, location_id: str, name: str) -> Iterator[Location]:
        if self._current is not None and self._current.location_id == location_id:
            return
        yield from self.finish()
        if location_id in self._complete_ids:
            raise ArchiveError(
                f"{self._where}: {name}: location {location_id} continues after other locations; "
                "the members of a location must be contiguous (repack the archive folder by "
                "folder, e.g. with `tar --sort=name`)"
            )
        self._current = Location(location_id)

    def finish(self) -> Iterator[Location]:
        if self._current is not None:
            location, self._current = self._current, None
            self._complete_ids.add(location.location_id)
            self.num_complete += 1
            self.last_complete = location.location_id
            yield location


# ---------------------------------------------------------------------------------------------
# Decoding one location (runs in worker processes).


def assign_windows(times: Sequence[datetime.datetime]) -> list[int]:
    """Window index (0 early, 1 late) of each acquisition, given their times in ascending order.

    A complete location (2 x 5 acquisitions) follows the official loader: the 5 newest are the late
    window. Any other count is split at the largest time gap between consecutive acquisitions: the
    two windows are about 4 years apart and each spans at most a year, so that gap separates them,
    where counting 5 from the end would move acquisitions of one window into the other.
    """
    n = len(times)
    if n == 2 * layout.ACQUISITIONS_PER_WINDOW:
        first_late = n - layout.ACQUISITIONS_PER_WINDOW
    elif n < 2:
        first_late = n
    else:
        gaps = [(times[i + 1] - times[i]).total_seconds() for i in range(n - 1)]
        first_late = int(np.argmax(gaps)) + 1
    return [int(i >= first_late) for i in range(n)]


@dataclasses.dataclass
class DecodedLocation:
    """What a worker returns for one location: an example for the records, or the reason it was
    skipped, plus every acquisition-level problem (`issues`: (product id, action, reason))."""

    location_id: str
    example: dict | None
    skip_reason: str
    issues: list[tuple[str, str, str]]
    ignored: int
    split_rule: str


class _BadAcquisition(Exception):
    pass


def decode_location(location: Location, groups: Mapping[str, tuple[str, ...]]) -> DecodedLocation:
    """Decodes the bands of `groups` ({feature name: bands, stacked as channels}) of every
    acquisition, splits the acquisitions into windows, and checks there are enough per window.

    An unreadable, missing, oversized or ungeoreferenced band skips its acquisition; a location is
    skipped when a window then has fewer than `layout.MIN_ACQUISITIONS_PER_WINDOW` acquisitions
    (the official loader draws 3), or when it has more acquisition folders than a reader keeps.
    """
    import rasterio

    if location.dropped_acquisitions:
        total = len(location.acquisitions) + len(location.dropped_acquisitions)
        return DecodedLocation(
            location_id=location.location_id,
            example=None,
            skip_reason=(
                f"{total} acquisition folders, more than the "
                f"{layout.MAX_ACQUISITIONS_PER_LOCATION} a location may hold (a complete one has "
                f"{2 * layout.ACQUISITIONS_PER_WINDOW}); not read"
            ),
            issues=[],
            ignored=location.ignored,
            split_rule="",
        )
    product_ids = sorted(location.acquisitions)  # name order is time order
    times = [layout.sensing_time(p) for p in product_ids]
    windows = assign_windows(times)
    complete = len(product_ids) == 2 * layout.ACQUISITIONS_PER_WINDOW
    issues: list[tuple[str, str, str]] = []
    acquisitions, centre = [], None
    # Nothing beside the in-memory file to look for: skip GDAL's sibling-file probing.
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR", GDAL_PAM_ENABLED="NO"):
        for product_id, time, window in zip(product_ids, times, windows, strict=True):
            files = location.acquisitions[product_id]
            try:
                pixels, georef = _decode_acquisition(location, product_id, files, groups)
            except _BadAcquisition as error:
                issues.append((product_id, "acquisition skipped", str(error)))
                continue
            centre = centre or _centre_lat_lon(*georef)
            cloud, problem = _cloud_percentage(files.get(layout.METADATA_FILE))
            unread = location.unreadable.get(f"{product_id}/{layout.METADATA_FILE}")
            if unread:
                problem = f"{layout.METADATA_FILE} unreadable: {unread}"
            if problem:
                issues.append((product_id, "cloud unknown", problem))
            acquisitions.append(
                dict(
                    product_id=product_id,
                    date=time.isoformat(),
                    window=window,
                    cloud=np.float32(cloud),
                    **pixels,
                )
            )
    per_window = [sum(a["window"] == w for a in acquisitions) for w in (0, 1)]
    result = DecodedLocation(
        location_id=location.location_id,
        example=None,
        skip_reason="",
        issues=issues,
        ignored=location.ignored,
        split_rule="newest 5" if complete else "largest gap",
    )
    if not product_ids:
        result.skip_reason = "no acquisition folders"
    elif min(per_window) < layout.MIN_ACQUISITIONS_PER_WINDOW:
        dropped = len(product_ids) - len(acquisitions)
        result.skip_reason = (
            f"too few acquisitions: {per_window[0]} early, {per_window[1]} late "
            f"(need >= {layout.MIN_ACQUISITIONS_PER_WINDOW} per window"
            + (f"; {dropped} of {len(product_ids)} acquisitions unusable)" if dropped else ")")
        )
    else:
        result.example = dict(
            location_id=location.location_id,
            lat=np.float32(centre[0]),
            lon=np.float32(centre[1]),
            acquisitions=acquisitions,
        )
    return result


def _decode_acquisition(location, product_id, files, groups):
    from rasterio.io import MemoryFile

    pixels, georef = {}, None
    for feature, bands in groups.items():
        channels = []
        for band in bands:
            name = layout.band_file(band)
            if f"{product_id}/{name}" in location.unreadable:
                raise _BadAcquisition(
                    f"unreadable band {band}: {location.unreadable[product_id + '/' + name]}"
                )
            if name not in files:
                raise _BadAcquisition(f"missing band {band}")
            try:
                with MemoryFile(files[name]) as memory, memory.open() as dataset:
                    # The header first: nothing is decoded from a file of another shape or type.
                    _check_band_header(dataset, band)
                    band_pixels = dataset.read(1)
                    # After the pixels: a truncated file's tags do not read either, and is
                    # unreadable rather than unplaced.
                    _check_georeferenced(dataset, band)
                    georef = georef or (
                        dataset.transform,
                        dataset.width,
                        dataset.height,
                        dataset.crs,
                    )
            except _BadAcquisition:
                raise
            except Exception as error:  # GDAL reports corrupt files with several exception types
                raise _BadAcquisition(
                    f"unreadable band {band}: {' '.join(str(error).split())}"
                ) from None
            channels.append(band_pixels)
        pixels[feature] = np.stack(channels, axis=-1)
    return pixels, georef


def _check_band_header(dataset, band: str) -> None:
    """Raises _BadAcquisition unless ``dataset`` (an open GeoTIFF) holds one uint8 band of the
    band's shape; reads no pixels."""
    expected = layout.band_shape(band)
    if dataset.count != 1:
        raise _BadAcquisition(f"band {band} has {dataset.count} bands in its file, expected 1")
    dtype, shape = dataset.dtypes[0], (dataset.height, dataset.width)
    if dtype != "uint8" or shape != expected:
        raise _BadAcquisition(f"band {band} is {dtype}{shape}, expected uint8{expected}")


def _check_georeferenced(dataset, band: str) -> None:
    """Raises _BadAcquisition unless ``dataset`` is placed on the Earth by a CRS and a transform
    (without them rasterio gives the identity transform, and pixel coordinates would pass for
    degrees)."""
    if dataset.crs is None or dataset.transform.is_identity:
        missing = " and ".join(
            what
            for what, absent in (
                ("CRS", dataset.crs is None),
                ("transform", dataset.transform.is_identity),
            )
            if absent
        )
        raise _BadAcquisition(
            f"band {band} is not georeferenced (no {missing}): its location cannot be placed"
        )


def _centre_lat_lon(transform, width, height, crs) -> tuple[float, float]:
    x, y = transform @ (width / 2.0, height / 2.0)
    if crs is not None and not crs.is_geographic:
        from rasterio.warp import transform as reproject

        xs, ys = reproject(crs, "EPSG:4326", [x], [y])
        x, y = xs[0], ys[0]
    return float(y), float(x)


def _cloud_percentage(metadata: bytes | None) -> tuple[float, str]:
    """(cloud %, problem): NaN without a problem when there is no metadata.json."""
    if metadata is None:
        return math.nan, ""
    try:
        value = json.loads(metadata).get(layout.CLOUD_PROPERTY)
        return (math.nan, "") if value is None else (float(value), "")
    except (ValueError, TypeError, AttributeError) as error:
        return math.nan, f"{layout.METADATA_FILE} unreadable: {error}"
