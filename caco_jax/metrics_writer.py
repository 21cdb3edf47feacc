"""Scalars to TensorBoard event files and to ``metrics.jsonl``, from process 0 only.

Every other process gets a writer that does nothing, so training code calls it unconditionally.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np


class MetricsWriter:
    """``write(step, {name: scalar})`` appends one JSON line and one TensorBoard point per
    scalar."""

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tensorboard = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        values = {name: float(np.asarray(value)) for name, value in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, int(step))

    def write_image(self, step: int, tag: str, png_path) -> None:
        """Adds a saved PNG (e.g. the change histogram; any `epath` path) to TensorBoard."""
        if not self.enabled:
            return
        import matplotlib.image
        from etils import epath

        with epath.Path(png_path).open("rb") as f:
            image = matplotlib.image.imread(f, format="png")[..., :3]
        self._tensorboard.add_image(tag, image, int(step), dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()
