"""Paths outside the records: local folders or bucket URLs (``gs://bucket/...``) alike.

Every path a user gives for the workdir, exports, evaluator results, change histograms or converted
weights goes through `path`, an etils `epath.Path`. epath reads and writes ``gs://`` through gcsfs
(the `cloud` extra: ``pip install ".[cloud]"``); Orbax checkpoints and exports write there through
tensorstore. Local paths are made absolute (Orbax requires it); URLs are kept as they are.

The records are the exception: `prepare` writes them as local files (`data/shard_writer.py`), so
`config.data.data_dir` must be a local folder or a mounted bucket (gcsfuse) when preparing.
Reading prepared records from ``gs://`` works (array_record reads ``gs://`` itself).
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `train.setup` runs where etils.epath is absent
    from etils import epath


def is_url(value) -> bool:
    """True for ``scheme://...`` paths (gs://, s3://), False for local ones."""
    return "://" in os.fspath(value)


def path(value) -> epath.Path:
    """`value` as an `epath.Path`: a URL as it is, a local path expanded and made absolute."""
    from etils import epath

    text = os.fspath(value)
    if is_url(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def append_bytes(target, data: bytes) -> None:
    """Appends ``data`` to the file ``target`` (created if missing).

    Buckets have no append. On ``gs://`` the new bytes are uploaded as an object beside the target
    and composed onto its end (GCS compose: the server concatenates), so each append sends only
    the new bytes; the extra object (``<name>.append-<id>``) is deleted then, and only a process
    killed in between leaves it behind. Other URLs are rewritten whole.
    """
    target = path(target)
    if not is_url(target):
        with target.open("ab") as f:
            f.write(data)
        return
    if not target.exists():
        target.write_bytes(data)
        return
    if not os.fspath(target).startswith("gs://"):
        target.write_bytes(target.read_bytes() + data)
        return
    import fsspec

    part = target.parent / f"{target.name}.append-{uuid.uuid4().hex}"
    part.write_bytes(data)
    gcs, name = fsspec.filesystem("gs"), os.fspath(target).removeprefix("gs://")
    try:
        gcs.merge(name, [name, os.fspath(part).removeprefix("gs://")])
        gcs.invalidate_cache(name)  # its listed size is the old one
    finally:
        part.unlink()


def append_text(target, text: str) -> None:
    """Appends ``text`` (UTF-8) to the file ``target``; see `append_bytes`."""
    append_bytes(target, text.encode("utf-8"))


def write_png(figure, target, **savefig_options) -> None:
    """A matplotlib figure as a PNG at ``target`` (local or in a bucket: through bytes), its
    folder made if missing, written whole or not at all (`replace_bytes`)."""
    import io

    target = path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    figure.savefig(image, format="png", **savefig_options)
    replace_bytes(target, image.getvalue())


def replace_bytes(target, data: bytes) -> None:
    """Writes ``data`` to ``target`` under a temporary name beside it, then renames it into place:
    a reader, or a rerun after a crash, finds the old file or the new one, never half of one."""
    target = path(target)
    temporary = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
        temporary.write_bytes(data)
        temporary.replace(target)
    finally:
        if temporary.exists():
            temporary.unlink()


def replace_text(target, text: str) -> None:
    """`replace_bytes` of ``text`` as UTF-8."""
    replace_bytes(target, text.encode("utf-8"))


def local_records_dir(data_dir: str, key: str = "config.data.data_dir") -> str:
    """`data_dir` if the record writer can write there; ValueError naming it and the fix if not."""
    if is_url(data_dir):
        raise ValueError(
            f"{key}={data_dir}: prepare writes the records as local files; prepare on a local "
            "disk or a mounted bucket (e.g. `gcsfuse BUCKET /mnt/BUCKET`, then "
            f"{key}=/mnt/BUCKET/...), then copy them to the bucket if you want to read them "
            "from there"
        )
    return data_dir
