"""Scalars to TensorBoard event files and to ``metrics.jsonl``, from process 0 only.

Every other process gets a writer that does nothing, so training code calls it unconditionally.
The workdir may be a bucket URL (`caco_jax.storage`).
"""

from __future__ import annotations

import io
import json
import os

import jax
import numpy as np

from caco_jax import storage


class MetricsWriter:
    """``write(step, {name: scalar})`` appends one JSON line and one TensorBoard point per
    scalar."""

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = storage.path(workdir) / "metrics.jsonl"
        self._tensorboard = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._jsonl.parent.mkdir(parents=True, exist_ok=True)
            # tensorboardX writes gs:// itself (through google-cloud-storage).
            self._tensorboard = SummaryWriter(os.fspath(storage.path(workdir) / "tensorboard"))

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        values = {name: float(np.asarray(value)) for name, value in scalars.items()}
        storage.append_text(self._jsonl, json.dumps({"step": int(step), **values}) + "\n")
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, int(step))

    def write_image(self, step: int, tag: str, png_path) -> None:
        """Adds a saved PNG (e.g. the change histogram; any `epath` path) to TensorBoard."""
        if not self.enabled:
            return
        import matplotlib.image

        png = io.BytesIO(storage.path(png_path).read_bytes())
        image = matplotlib.image.imread(png, format="png")[..., :3]
        self._tensorboard.add_image(tag, image, int(step), dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
