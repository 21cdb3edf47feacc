"""Evaluations during pretraining (`config.evals`): a downstream curve while the encoder trains.

Named evaluators in the config, in big_vision's style, each with its type, dataset and schedule:

    config.evals.land_cover_knn = dict(type="knn", dataset="land_cover", every_epochs=1)

Types (`FACTORIES`; the evaluators live in `caco_jax.evaluators.online`, imported by name when a
run has one, so pretraining alone never imports the evaluation stack):

- ``knn``: solo-learn's ``WeightedKNNClassifier`` (InstDisc's weighted kNN): cosine similarity of
  L2-normalised pooled features, the ``k`` most similar training examples each voting for its
  class with weight exp(similarity / ``temperature``).
- ``linear_probe``: the cached-feature linear head of `evaluators.heads` (Adam, SeCo's schedule
  shape) on the training subset, scored on the test subset.
- ``change_auc``: on the synthetic archive, the ROC AUC of a per-location change score from the
  encoder's features against the archive's ground truth.

Datasets (`DATASETS`): ``land_cover`` (the synthetic archive's dominant land cover, early window,
locations split in seeded halves), ``eurosat`` (the download in ``manual_dir``, SeCo's lists),
``bigearthnet`` (the same; multi-label, micro AP), ``change`` (the synthetic archive's change,
``change_auc`` only). Each reads a seeded subset (``train_examples``, ``test_examples``) loaded
once per run, so that an evaluation costs a small, stated fraction of training.

When: at the end of every ``every_epochs``-th epoch (or every ``every_steps`` steps) and at the
last step, after that step's change labels and before its checkpoint; not at a step where the run
stops early (SIGTERM, preemption), unless it is the last. What: every process computes the
features of the current query encoder in eval mode on every device of the run's mesh
(`runtime.inference`) and the metric on the host; process 0 writes one line per evaluator,
``{"step", "epoch", "eval/<name>/<metric>", "eval/<name>/seconds"}``, to ``metrics.jsonl`` and
TensorBoard, and the run's result holds each evaluator's history (`Evaluations.finish`, which
also draws ``<workdir>/evals.png``).

An evaluation never changes the training: the encoder is a separate module merged from the
state's parameters and statistics (read, never written), its random draws are its own
(``seed``), and it touches no checkpoint; a run with evals trains bit for bit like one without.

Resume: a run resumes from its newest checkpoint, so an evaluation interrupted by a stop (or a
crash) is rerun at the next scheduled step the resumed run reaches. The eval lines that a stopped
run wrote after that checkpoint are removed from ``metrics.jsonl`` when the run resumes (the
resumed run writes them again), so its eval history has no duplicates.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax

from caco_jax.runtime import storage
from caco_jax.runtime.workdir import Workdir
from caco_jax.settings import Section, SettingsError

# type -> "module:class" of its evaluator, built as cls(spec, context) (`EvalContext`).
FACTORIES = {
    "knn": "caco_jax.evaluators.online:KnnEvaluator",
    "linear_probe": "caco_jax.evaluators.online:LinearProbeEvaluator",
    "change_auc": "caco_jax.evaluators.online:ChangeAucEvaluator",
}
CLASSIFICATION_DATASETS = ("land_cover", "eurosat", "bigearthnet")
# type -> the datasets it reads
DATASETS = {
    "knn": CLASSIFICATION_DATASETS,
    "linear_probe": CLASSIFICATION_DATASETS,
    "change_auc": ("change",),
}
EVAL_PREFIX = "eval/"  # of every metric an evaluator writes
_NAME = re.compile(r"[A-Za-z0-9_]+")


@dataclasses.dataclass(frozen=True)
class EvalSpec(Section):
    """One evaluator of `config.evals` (``config.evals.<name>``); errors name its keys as
    ``config.evals.<name>.<key>``."""

    SECTION = "evals"
    name: str = ""  # the key under config.evals
    type: str = ""  # one of FACTORIES
    dataset: str = ""  # one of DATASETS[type]; "" for change_auc = "change"
    every_epochs: int = 1  # at every n-th epoch end; 0 = at the last step only
    every_steps: int = 0  # > 0: every n steps instead of by epoch
    # Seeded subsets: examples of the training and test split (change_auc: locations, test
    # only); 0 = all.
    train_examples: int = 0
    test_examples: int = 0
    seed: int = 0  # the subsets, the land-cover split and the probe's initialisation and order
    batch_size: int = 256  # images per encoder pass (global: over every device)
    # The encoder's input size; 0 = the dataset's: the run's crop size on the synthetic archive,
    # EuroSAT's 64, BigEarthNet's 128 (SeCo's).
    image_size: int = 0
    k: int = 20  # knn: neighbours (solo-learn's default)
    temperature: float = 0.07  # knn: of exp(similarity / T)
    probe_epochs: int = 100  # linear_probe: SeCo's protocol, lr x0.1 at 60 % and 80 % of it
    probe_batch_size: int = 32
    probe_learning_rate: float = 1e-3
    # eurosat, bigearthnet: where the download and its records are, as config.eval's keys
    data_dir: str = ""  # TFDS data_dir of the records; "" = ~/tensorflow_datasets
    manual_dir: str = ""  # the download and SeCo's split lists; records are built on first use
    download_lists: bool = False
    seeded_split: bool = False

    def require(self, ok: bool, key: str, requirement: str) -> None:
        if not ok:
            raise SettingsError(f"config.evals.{self.name}.{key}: {requirement}")

    def validate(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise SettingsError(
                f"config.evals.{self.name}: an evaluator's name is letters, digits and _ "
                "(it names its metrics, eval/<name>/...)"
            )
        self.require(
            self.type in FACTORIES, "type", f"one of {sorted(FACTORIES)}, got {self.type!r}"
        )
        datasets = DATASETS[self.type]
        if self.type == "change_auc" and not self.dataset:
            object.__setattr__(self, "dataset", "change")
        self.require(
            self.dataset in datasets,
            "dataset",
            f"{self.type} reads one of {list(datasets)}, got {self.dataset!r}",
        )
        self.require(self.every_epochs >= 0, "every_epochs", "must be >= 0 (0 = at the end only)")
        self.require(self.every_steps >= 0, "every_steps", "must be >= 0 (0 = by epoch)")
        self.require(self.train_examples >= 0, "train_examples", "must be >= 0 (0 = all)")
        self.require(self.test_examples >= 0, "test_examples", "must be >= 0 (0 = all)")
        self.require(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.require(
            self.image_size == 0 or self.image_size >= 32,
            "image_size",
            "must be 0 (the dataset's) or >= 32 (a ResNet divides it by 32)",
        )
        self.require(self.k >= 1, "k", "must be >= 1")
        self.require(self.temperature > 0, "temperature", "must be > 0")
        self.require(self.probe_epochs >= 1, "probe_epochs", "must be >= 1")
        self.require(self.probe_batch_size >= 1, "probe_batch_size", "must be >= 1")
        self.require(self.probe_learning_rate > 0, "probe_learning_rate", "must be > 0")

    @classmethod
    def of(cls, name: str, values: Mapping[str, Any]) -> EvalSpec:
        """``config.evals.<name>`` from its keys; an unknown key is an error naming it."""
        known = [field.name for field in dataclasses.fields(cls) if field.name != "name"]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SettingsError(f"config.evals.{name}: unknown key(s) {unknown}; known: {known}")
        return cls(name=name, **values)

    def due(self, step: int, steps_per_epoch: int, last_step: int) -> bool:
        """Whether this evaluator runs after ``step`` (counted from 1)."""
        if step == last_step:
            return True
        if self.every_steps:
            return step % self.every_steps == 0
        return self.every_epochs > 0 and step % (self.every_epochs * steps_per_epoch) == 0


@dataclasses.dataclass(frozen=True)
class EvalsSettings(Section):
    """`config.evals`: named evaluators run during pretraining (the module docstring); empty by
    default. The section is a mapping ``{name: {key: value}}``, not a fixed set of keys."""

    SECTION = "evals"
    evaluators: tuple[EvalSpec, ...] = ()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> EvalsSettings:
        specs = []
        for name, spec in values.items():
            if not isinstance(spec, Mapping):
                raise SettingsError(
                    f"config.evals.{name}: an evaluator is a dict of its keys "
                    f"(dict(type='knn', dataset='land_cover', ...)), got {spec!r}"
                )
            specs.append(EvalSpec.of(name, spec))
        return cls(evaluators=tuple(specs))

    def to_dict(self) -> dict[str, Any]:
        return {
            spec.name: {k: v for k, v in dataclasses.asdict(spec).items() if k != "name"}
            for spec in self.evaluators
        }


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What an evaluator is built from: the run's settings and workdir, the pretraining records
    (``source``, `data.records.Records`), the encoder's input and the run's mesh."""

    settings: Any  # settings.Settings
    workdir: Workdir
    source: Any
    normalization: Any  # data.normalization.Normalization
    mesh: jax.sharding.Mesh


def evaluator_class(type_name: str):
    module_name, class_name = FACTORIES[type_name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


class Evaluations:
    """The evaluators of a pretraining run: built once, each loading its data subset (errors
    before any training), then `start`, `run_due` after each step, `finish` at the end. With no
    evaluators every call does nothing."""

    def __init__(self, settings, workdir, run, source):
        """``run``: the run's `train.Setup` (its model, mesh, input and schedule); ``source``: the
        pretraining records."""
        self.specs = settings.evals.evaluators if "evals" in settings else ()
        self.workdir = Workdir.of(workdir)
        self.model = run.model  # `state.Model`: merges an encoder from the state's leaves
        self.steps_per_epoch, self.total_steps = run.stream.steps_per_epoch, run.total_steps
        self.history: dict[str, list[dict]] = {spec.name: [] for spec in self.specs}
        self.seconds = {spec.name: 0.0 for spec in self.specs}
        self.cpu_seconds = {spec.name: 0.0 for spec in self.specs}
        self.primary = jax.process_index() == 0
        self.writer = None
        context = EvalContext(settings, self.workdir, source, run.normalization, run.mesh)
        started = time.perf_counter()
        self.evaluators = {
            spec.name: evaluator_class(spec.type)(spec, context) for spec in self.specs
        }
        self.setup_seconds = time.perf_counter() - started
        self._loop_started, self._loop_cpu = time.perf_counter(), time.process_time()

    def start(self, writer, resumed_from: int | None) -> None:
        """Before the first step: where lines go, and (process 0, resuming) the eval lines written
        after the checkpoint ``resumed_from`` removed from ``metrics.jsonl``."""
        self.writer = writer
        if self.specs and resumed_from is not None and self.primary:
            drop_eval_lines_after(self.workdir.metrics, resumed_from)
        self._loop_started, self._loop_cpu = time.perf_counter(), time.process_time()

    def run_due(self, step: int, state) -> None:
        """Runs every evaluator due after ``step`` on the state's query encoder; writes its line.
        A state that is no longer finite is not evaluated (the loop stops with its own error)."""
        due = [s for s in self.specs if s.due(step, self.steps_per_epoch, self.total_steps)]
        if not due or not bool(jax.device_get(state.all_finite)):
            return
        encoder = self.model.encoder(state.query_params, state.query_stats)
        for spec in due:
            wall, cpu = time.perf_counter(), time.process_time()
            metrics = self.evaluators[spec.name].evaluate(encoder)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            self.seconds[spec.name] += wall
            self.cpu_seconds[spec.name] += cpu
            epoch = step / self.steps_per_epoch
            self.writer.write(
                step,
                {
                    "epoch": epoch,
                    **{f"{EVAL_PREFIX}{spec.name}/{k}": v for k, v in metrics.items()},
                    f"{EVAL_PREFIX}{spec.name}/seconds": wall,
                },
            )
            self.history[spec.name].append({"step": step, "epoch": epoch, **metrics})

    def finish(self, epochs: list[dict]) -> dict:
        """The run's result entry ``evals`` ({} without evaluators): per evaluator its type,
        dataset, primary metric, history, latest values and cost; process 0 also draws
        ``<workdir>/evals.png`` (``epochs``: the run's per-epoch records, for the loss)."""
        if not self.specs:
            return {}
        elapsed = time.perf_counter() - self._loop_started
        pretraining = max(elapsed - sum(self.seconds.values()), 1e-9)
        cpu = time.process_time() - self._loop_cpu - sum(self.cpu_seconds.values())
        evals = {}
        for spec in self.specs:
            history = self.history[spec.name]
            evals[spec.name] = {
                "type": spec.type,
                "dataset": spec.dataset,
                "metric": self.evaluators[spec.name].metric,
                "history": history,
                "latest": history[-1] if history else None,
                "seconds": self.seconds[spec.name],
                "cpu_seconds": self.cpu_seconds[spec.name],
                "fraction_of_pretraining": self.seconds[spec.name] / pretraining,
            }
        result = {
            "evals": evals,
            "evals_setup_seconds": self.setup_seconds,
            "pretraining_seconds": pretraining,  # the loop's wall time without evaluations
            "pretraining_cpu_seconds": cpu,  # and its CPU time (every thread of this process)
        }
        if self.primary and any(self.history.values()):
            result["evals_plot"] = self.workdir.evals_plot
            plot(self.workdir.evals_plot, epochs, evals)
        return result


def drop_eval_lines_after(metrics_path, step: int) -> int:
    """Removes from ``metrics.jsonl`` the eval lines of steps after ``step`` (the checkpoint a run
    resumes from; the resumed run writes them again). Other lines are kept as they are. Returns
    how many were removed."""
    path = storage.path(metrics_path)
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not _eval_line_after(line, step)]
    if len(kept) == len(lines):
        return 0
    temporary = path.parent / f"{path.name}.tmp-{os.getpid()}"
    temporary.write_text("".join(kept))
    temporary.replace(path)
    return len(lines) - len(kept)


def _eval_line_after(line: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False  # not ours to judge (a line cut by a crash stays as it was)
    return (
        isinstance(record, dict)
        and record.get("step", -1) > step
        and any(key.startswith(EVAL_PREFIX) for key in record)
    )


def plot(path, epochs: list[dict], evals: dict) -> None:
    """``evals.png``: the mean contrastive loss per epoch beside each evaluator's metric."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 1 + len(evals)
    figure = Figure(figsize=(4 * panels, 3.4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, panels, 1)
    axes.plot([e["epoch"] for e in epochs], [e["loss"] for e in epochs], marker="o")
    axes.set(title="contrastive loss (epoch mean)", xlabel="epoch")
    for panel, (name, entry) in enumerate(evals.items(), start=2):
        axes = figure.add_subplot(1, panels, panel)
        points = [(h["epoch"], h[entry["metric"]]) for h in entry["history"]]
        points = [(x, y) for x, y in points if math.isfinite(y)]
        axes.plot([x for x, _ in points], [y for _, y in points], marker="o", color="tab:green")
        axes.set(title=f"{name}: {entry['metric']}", xlabel="epoch")
    figure.tight_layout()
    storage.write_png(figure, path)
