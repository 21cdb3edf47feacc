"""Scalars to TensorBoard event files and to ``metrics.jsonl``, from process 0 only.

Every other process gets a writer that does nothing, so training code calls it unconditionally.

The workdir may be a bucket URL (`runtime.storage`). A bucket object cannot be appended to in
place, so there the JSON lines and the TensorBoard events are held back and appended in one go by
`flush` (`storage.append_bytes`: on gs:// only the new bytes are sent, other URLs are rewritten):
pretraining flushes at every checkpoint, `close` flushes, and a `write` flushes once `flush_seconds`
have passed since the last flush. A crash loses what came after the last flush (at most
``flush_seconds`` of lines, and never a line before a checkpoint). TensorBoard writes its event
files into a local temporary folder meanwhile. In a local workdir every line is appended at once and
TensorBoard writes there itself.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from caco_jax.runtime import storage
from caco_jax.runtime.workdir import Workdir
from caco_jax.settings import Section

FLUSH_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class LoggingSettings(Section):
    """`config.logging`: how often pretraining writes its scalars, and its progress bar."""

    SECTION = "logging"
    every_steps: int = 50
    progress_bar: bool = True

    def validate(self) -> None:
        self.require(self.every_steps >= 1, "every_steps", "must be >= 1")


class MetricsWriter:
    """``write(step, {name: scalar})`` adds one JSON line and one TensorBoard point per scalar
    (appended at once locally, queued until the next flush in a bucket)."""

    def __init__(
        self, workdir: str, *, enabled: bool | None = None, flush_seconds: float = FLUSH_SECONDS
    ):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        workdir = Workdir.of(workdir)
        self._jsonl = storage.path(workdir.metrics)
        self._events = storage.path(workdir.tensorboard)
        in_bucket = storage.is_url(workdir.root)
        self._flush_seconds = flush_seconds if in_bucket else 0.0
        self._pending: list[str] = []  # lines not yet in metrics.jsonl
        self._sent: dict[str, int] = {}  # bytes of each staged event file already in the bucket
        self._flushed_at = time.monotonic()
        self._staging = None  # the local folder of TensorBoard's event files for a bucket
        self._tensorboard = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._jsonl.parent.mkdir(parents=True, exist_ok=True)
            if in_bucket:
                self._staging = tempfile.mkdtemp(prefix="caco_jax_tensorboard_")
            self._tensorboard = SummaryWriter(self._staging or os.fspath(self._events))

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        values = {name: float(np.asarray(value)) for name, value in scalars.items()}
        self._pending.append(json.dumps({"step": int(step), **values}) + "\n")
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, int(step))
        if time.monotonic() - self._flushed_at >= self._flush_seconds:
            self.flush()

    def write_record(self, step: int, record: dict) -> None:
        """Adds one JSON line ``{"step": step, **record}`` that is not a scalar (an event such as
        a setting changed on resume); TensorBoard does not get it."""
        if not self.enabled:
            return
        self._pending.append(json.dumps({"step": int(step), **record}) + "\n")
        if time.monotonic() - self._flushed_at >= self._flush_seconds:
            self.flush()

    def write_image(self, step: int, tag: str, png_path) -> None:
        """Adds a saved PNG (e.g. the change histogram; any `epath` path) to TensorBoard."""
        if not self.enabled:
            return
        import matplotlib.image

        png = io.BytesIO(storage.path(png_path).read_bytes())
        image = matplotlib.image.imread(png, format="png")[..., :3]
        self._tensorboard.add_image(tag, image, int(step), dataformats="HWC")

    def flush(self) -> None:
        """Appends the held-back lines (and, for a bucket, the new event bytes) to the workdir."""
        if not self.enabled:
            return
        if self._pending:
            storage.append_text(self._jsonl, "".join(self._pending))
            self._pending = []
        if self._staging:
            self._tensorboard.flush()
            self._send_events()
        self._flushed_at = time.monotonic()

    def _send_events(self) -> None:
        """Appends what each staged event file gained since the last call to its bucket copy."""
        for name in sorted(os.listdir(self._staging)):
            with open(os.path.join(self._staging, name), "rb") as f:
                f.seek(self._sent.get(name, 0))
                new = f.read()
            if new:
                storage.append_bytes(self._events / name, new)
                self._sent[name] = self._sent.get(name, 0) + len(new)

    def close(self) -> None:
        if not self.enabled:
            return
        self._tensorboard.close()  # its last events reach the staged files
        self.flush()
        if self._staging:
            shutil.rmtree(self._staging)
        self.enabled = False  # closed: later calls do nothing
