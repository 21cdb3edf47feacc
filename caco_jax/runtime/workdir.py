"""The workdir: the one folder a run's tasks write into and read from, named here once.

Tasks talk to each other only through these files (pretraining writes ``encoder/``, the
evaluators read it; ``synthesize`` writes ``synthetic_archive/``, ``prepare`` reads it). Each name
below is the default of a config key that can point elsewhere (``config.data.data_dir``,
``config.eval.checkpoint``, ...); the config's own default is "", meaning "this workdir's".

  synthetic_archive/   the embedded synthetic archive (task synthesize)
  tfds/                prepared records, TFDS data_dir (task prepare; read by pretrain, embed, ...)
  checkpoints/<step>/  Orbax checkpoints of pretraining
  encoder/             the pretrained (or converted, or official) encoder export
  change/              CACo's change report: histograms per epoch, labels.csv
  metrics.jsonl        pretraining scalars, one JSON line per log step
  tensorboard/         the same as TensorBoard events
  evals.png            the curves of the evaluations run during pretraining (config.evals)
  change_map/          the change_map task's rasters, CSV, GeoJSON, figures and embeddings
  embeddings/          the embed task's GeoParquet dataset (a part per process, _manifest.json)
  locations/           sampled locations (task sample_locations)
  archive/             a downloaded archive (task download)
  results.json         what every task of the last run returned
  caco_jax.lock        the writer's lock while a run writes here (`runtime.locks`)

A workdir is a local folder or a bucket URL (``gs://...``); `path` gives an `epath.Path` either way.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from typing import TYPE_CHECKING

from caco_jax.runtime import storage

if TYPE_CHECKING:
    from etils import epath


@dataclasses.dataclass(frozen=True)
class Workdir:
    """A run's folder (an absolute local path or a URL) and the names of what lives in it."""

    root: str

    def __post_init__(self):
        root = os.fspath(self.root)
        if not storage.is_url(root):
            root = os.path.abspath(os.path.expanduser(root))
        object.__setattr__(self, "root", root.rstrip("/") or "/")

    @classmethod
    def of(cls, value: str | os.PathLike | Workdir) -> Workdir:
        return value if isinstance(value, Workdir) else cls(os.fspath(value))

    def __fspath__(self) -> str:
        return self.root

    def __str__(self) -> str:
        return self.root

    def join(self, *parts: str) -> str:
        """``<root>/<parts>`` as a string (URLs keep their scheme)."""
        if storage.is_url(self.root):
            return posixpath.join(self.root, *parts)
        return os.path.join(self.root, *parts)

    def path(self, *parts: str) -> epath.Path:
        return storage.path(self.join(*parts))

    # The files and folders, one name each (see the module docstring).
    @property
    def synthetic_archive(self) -> str:
        return self.join("synthetic_archive")

    @property
    def tfds(self) -> str:
        return self.join("tfds")

    @property
    def checkpoints(self) -> str:
        return self.join("checkpoints")

    @property
    def encoder(self) -> str:
        return self.join("encoder")

    @property
    def change(self) -> str:
        return self.join("change")

    @property
    def change_labels(self) -> str:
        return self.join("change", "labels.csv")

    @property
    def metrics(self) -> str:
        return self.join("metrics.jsonl")

    @property
    def tensorboard(self) -> str:
        return self.join("tensorboard")

    @property
    def evals_plot(self) -> str:
        return self.join("evals.png")

    @property
    def change_map(self) -> str:
        return self.join("change_map")

    @property
    def embeddings(self) -> str:
        """The embed task's GeoParquet dataset folder (`products.geoparquet`)."""
        return self.join("embeddings")

    @property
    def locations(self) -> str:
        return self.join("locations")

    @property
    def archive(self) -> str:
        return self.join("archive")

    @property
    def results(self) -> str:
        return self.join("results.json")

    @property
    def lock(self) -> str:
        """The lock file a run holds while it writes here (`runtime.locks.WriterLock`)."""
        return self.join(LOCK_FILE)


LOCK_FILE = "caco_jax.lock"  # also in a data_dir, while `prepare` writes there
