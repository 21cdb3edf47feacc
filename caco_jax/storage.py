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


def append_text(target: epath.Path, text: str) -> None:
    """Appends `text` to the file `target`. Buckets have no append: there the object is rewritten
    with the old content and `text` (the files appended to, like metrics.jsonl, stay small)."""
    if is_url(target):
        old = target.read_text() if target.exists() else ""
        target.write_text(old + text)
        return
    with target.open("a") as f:
        f.write(text)


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
