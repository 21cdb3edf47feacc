"""The evaluators run during pretraining (`config.evals`, scheduled by `pretrain.evals`).

Each is built once per run from its `pretrain.evals.EvalSpec` and the run's `EvalContext`, loading
its seeded data subset into memory; `evaluate(encoder)` then computes the pooled features of the
query encoder in eval mode on every device of the run's mesh (`runtime.inference.FrozenModel`:
every process passes the same batches and gets every row back) and the metric on the host, so
every process computes the same numbers.

- `KnnEvaluator`: solo-learn's ``WeightedKNNClassifier`` (k = 20, T = 0.07, after InstDisc):
  `knn_class_scores`. Metric ``top1`` (single-label), ``micro_ap`` (BigEarthNet, the votes as
  class scores). Ties between classes go to the lower class index.
- `LinearProbeEvaluator`: `heads.train_linear_head` on cached features (Adam at
  ``probe_learning_rate``, batch ``probe_batch_size``, ``probe_epochs`` with the learning rate x0.1
  at 60 % and 80 % of them, SeCo's schedule shape), scored on the test subset.
- `ChangeAucEvaluator`: per location of the synthetic archive, the features' mean distance between
  its early and late acquisitions (d_lt) over their mean distance within a window (d_st): the
  ROC AUC of d_lt / d_st (``ratio_auc``, a pooled-feature analogue of CACo's ratio) and of d_lt
  alone (``long_term_auc``) against the ground truth's changed flag. The change maps
  (`products.change_map.location_statistics`) take d_lt between the two windows' mean features
  instead: both rank the same way when a window's features are tight, not in general.

Datasets: ``land_cover`` and ``change`` read the pretraining records themselves and the synthetic
archive's ground truth (`sources.synthetic`); their input is the pretraining input (the run's
stretch, resized to ``image_size``, default the crop size, then its mean/std; `land_cover`'s
recipe). ``eurosat`` and ``bigearthnet`` read the downloads through their evaluators' loaders
(`eurosat.load_eurosat`, `bigearthnet.load_bigearthnet`: records built from ``manual_dir`` on
first use, by process 0 while the others wait) with their protocols' inputs.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from caco_jax.data.normalization import Normalization, merge_band_groups
from caco_jax.evaluators import bigearthnet, change_scoring, common, eurosat, heads, metrics
from caco_jax.models.heads import l2_normalize
from caco_jax.pretrain.evals import EvalContext, EvalSpec
from caco_jax.runtime import errors, inference, multihost
from caco_jax.sources import synthetic


class EvalInputError(errors.UserError, ValueError):
    """Data an evaluator of `config.evals` cannot evaluate on; the message names its key."""


# solo-learn's max_distance_matrix_size: test rows per chunk x training rows stays below it.
KNN_CHUNK_ELEMENTS = 5_000_000


# --------------------------------------------------------------------------------------------------
# The kNN classifier.


@functools.partial(jax.jit, static_argnames=("k",))
def _knn_chunk(train_features, train_targets, test_features, temperature, *, k: int):
    similarities = test_features @ train_features.T  # cosine: both sides L2-normalised
    top, indices = jax.lax.top_k(similarities, k)
    weights = jnp.exp(top / temperature)
    return jnp.einsum("mk,mkc->mc", weights, train_targets[indices])


def knn_class_scores(
    train_features: np.ndarray,
    train_targets: np.ndarray,
    test_features: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_elements: int = KNN_CHUNK_ELEMENTS,
) -> np.ndarray:
    """Class scores [M, C] of a weighted kNN (solo-learn's ``WeightedKNNClassifier``, cosine):
    features L2-normalised, each test row's ``k`` most similar training rows (k at most their
    count), each adding exp(similarity / ``temperature``) times its target row (one-hot or
    multi-hot [N, C]) to the row's scores. Computed in chunks of test rows of at most
    ``chunk_elements`` similarities, each chunk one compiled call (the last one padded)."""
    train = l2_normalize(jnp.asarray(train_features, jnp.float32))
    test = l2_normalize(jnp.asarray(test_features, jnp.float32))
    targets = jnp.asarray(train_targets, jnp.float32)
    count, k = test.shape[0], min(k, train.shape[0])
    chunk = max(1, min(count, chunk_elements // max(train.shape[0], 1)))
    scores = []
    for start in range(0, count, chunk):
        rows = test[start : start + chunk]
        padded = jnp.pad(rows, ((0, chunk - rows.shape[0]), (0, 0)))
        out = _knn_chunk(train, targets, padded, jnp.float32(temperature), k=k)
        scores.append(np.asarray(out)[: rows.shape[0]])
    return np.concatenate(scores) if scores else np.zeros((0, targets.shape[1]), np.float32)


# --------------------------------------------------------------------------------------------------
# Labelled data: a training and a test subset, in memory.


@dataclasses.dataclass
class Labelled:
    """A dataset's training and test subsets, its targets and its input recipe."""

    train_images: np.ndarray
    train_targets: np.ndarray  # [N] class indices, or [N, C] multi-hot (multilabel)
    test_images: np.ndarray
    test_targets: np.ndarray
    num_classes: int
    multilabel: bool
    preprocess: object  # hashable: images -> the encoder's input, on the devices

    @property
    def metric(self) -> str:
        return "micro_ap" if self.multilabel else "top1"

    def one_hot(self, targets: np.ndarray) -> np.ndarray:
        if self.multilabel:
            return np.asarray(targets, np.float32)
        return np.eye(self.num_classes, dtype=np.float32)[targets]

    def score(self, scores: np.ndarray) -> dict[str, float]:
        """The metric of class scores (or logits) [M, C] on the test subset."""
        if self.multilabel:
            return {"micro_ap": metrics.micro_average_precision(self.test_targets, scores)}
        return {"top1": metrics.top1_accuracy(scores, self.test_targets)}


def subset(indices: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded subset of ``size`` of ``indices`` (all for 0 or more than there are), sorted."""
    indices = np.asarray(indices)
    if size == 0 or size >= indices.size:
        return indices
    return np.sort(rng.choice(indices, size=size, replace=False))


def _rename_keys(error: Exception, spec: EvalSpec) -> Exception:
    """An evaluator loader's error naming ``config.eval.<key>`` renamed to the spec's key."""
    message = str(error).replace("config.eval.", f"config.evals.{spec.name}.")
    return type(error)(message) if message != str(error) else error


def _after_process_0(load):
    """``load()`` on process 0 first (it may build records from the download), then on the
    others, so that no two processes build the same records at once. Process 0 reaches the
    barrier even when its load fails, so the others do not wait for it for ever."""
    data = None
    try:
        if jax.process_index() == 0:
            data = load()
    finally:
        multihost.barrier("caco_jax evals: records ready")
    return load() if data is None else data


def _shared_settings(spec: EvalSpec) -> common.EvalSettings:
    """`config.eval`'s keys of the download, from the spec."""
    return common.EvalSettings(
        data_dir=spec.data_dir,
        manual_dir=spec.manual_dir,
        download_lists=spec.download_lists,
        seeded_split=spec.seeded_split,
        extract_batch_size=spec.batch_size,
    )


@dataclasses.dataclass(frozen=True)
class Resized:
    """``inner`` (an input recipe) then a bilinear resize to ``size``: hashable, so it keys the
    compiled encoder call."""

    inner: object
    size: int

    def __call__(self, images):
        x = self.inner(images)
        return jax.image.resize(x, (x.shape[0], self.size, self.size, x.shape[-1]), "bilinear")


def load_eurosat(spec: EvalSpec, context: EvalContext) -> Labelled:
    config_name = eurosat.eurosat_config_name(context.normalization)
    preprocess = eurosat.eurosat_input(context.normalization, config_name)
    try:
        data = _after_process_0(
            lambda: eurosat.load_eurosat(_shared_settings(spec), spec.seed, config_name)
        )
    except (FileNotFoundError, ValueError) as error:
        raise _rename_keys(error, spec) from error
    if spec.image_size and spec.image_size != data.images.shape[1]:
        preprocess = Resized(preprocess, spec.image_size)
    rng = np.random.default_rng(spec.seed)
    train = subset(data.train, spec.train_examples, rng)
    test = subset(data.val, spec.test_examples, rng)
    return Labelled(
        data.images[train],
        data.labels[train],
        data.images[test],
        data.labels[test],
        eurosat.EUROSAT_CLASSES,
        False,
        preprocess,
    )


def load_bigearthnet(spec: EvalSpec, context: EvalContext) -> Labelled:
    config_name = bigearthnet.bigearthnet_config_name(context.normalization)
    image_size = spec.image_size or bigearthnet.BigEarthNetSettings.image_size
    preprocess = bigearthnet.bigearthnet_input(context.normalization, config_name, image_size)
    protocol = bigearthnet.BigEarthNetSettings()  # every training patch: the spec subsets them
    try:
        data = _after_process_0(
            lambda: bigearthnet.load_bigearthnet(
                _shared_settings(spec), protocol, spec.seed, config_name
            )
        )
    except (FileNotFoundError, ValueError) as error:
        raise _rename_keys(error, spec) from error
    rng = np.random.default_rng(spec.seed)
    train = subset(data.train, spec.train_examples, rng)
    test = subset(data.val, spec.test_examples, rng)
    return Labelled(
        data.images(train),
        data.targets[train],
        data.images(test),
        data.targets[test],
        len(bigearthnet.CLASSES_19),
        True,
        preprocess,
    )


# The synthetic archive: the pretraining records and the ground truth beside the archive.


@functools.cache
def standardized(normalization: Normalization):
    """The second half of the pretraining input (mean/std) for images `pretraining_input`
    already stretched and resized; keyed by the normalisation (hashable)."""

    def preprocess(x):
        return normalization.standardize(x, jnp)

    return preprocess


@functools.partial(jax.jit, static_argnames=("normalization", "size"))
def _stretch_and_resize(raw, *, normalization: Normalization, size: int):
    x = normalization.stretch(raw, jnp)
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "bilinear")


def pretraining_input(raw: np.ndarray, normalization: Normalization, size: int) -> np.ndarray:
    """The run's stretch and the resize to ``size`` (`land_cover.pretraining_input` without the
    mean/std, which `standardized` applies on the devices), done once at load time: float32
    [N, size, size, C], a fraction of the raw images' memory."""
    out = [
        np.asarray(_stretch_and_resize(raw[i : i + 64], normalization=normalization, size=size))
        for i in range(0, raw.shape[0], 64)
    ]
    return np.concatenate(out) if out else np.zeros((0, size, size, raw.shape[-1]), np.float32)


def _ground_truth(spec: EvalSpec, context: EvalContext) -> dict:
    path = synthetic.ground_truth_path(context.settings.data.archive_dir(context.workdir))
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"config.evals.{spec.name}.dataset: {spec.dataset!r} scores the synthetic archive "
            f"against its ground truth, and there is no {path} (does this run train on the "
            "synthetic archive? see config.data.archive)"
        )
    truth = {row.location_id: row for row in synthetic.read_ground_truth(path)}
    source = context.source
    missing = [
        source.location_id(i) for i in range(len(source)) if source.location_id(i) not in truth
    ]
    if missing:
        raise EvalInputError(
            f"config.evals.{spec.name}.dataset: locations {missing[:5]} of the records are not in "
            f"{path} (records of another archive?)"
        )
    return truth


def read_acquisitions(context: EvalContext, picks, size: int) -> np.ndarray:
    """The pretraining input (stretched, resized) of ``picks`` [(location, acquisition)]."""
    source, bands = context.source, context.normalization.bands
    by_location: dict[int, list[int]] = {}
    for location, acquisition in picks:
        by_location.setdefault(int(location), []).append(int(acquisition))
    images = []
    for location, acquisitions in by_location.items():
        pixels = source.pixels(location, acquisitions)
        if isinstance(pixels, dict):  # all_bands: the encoder's bands on the 10 m grid
            pixels = np.asarray(merge_band_groups(pixels, bands)).astype(np.uint8)
        images.append(pretraining_input(np.asarray(pixels), context.normalization, size))
    return np.concatenate(images)


def load_land_cover(spec: EvalSpec, context: EvalContext) -> Labelled:
    """The early-window acquisitions of the pretraining records labelled with their location's
    dominant land cover (`land_cover`'s task), locations split in seeded halves."""
    truth, source = _ground_truth(spec, context), context.source
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(source))
    halves = (np.sort(order[: len(source) // 2]), np.sort(order[len(source) // 2 :]))
    size = spec.image_size or context.settings.augment.crop_size
    subsets = []
    for locations, examples in zip(halves, (spec.train_examples, spec.test_examples), strict=True):
        early = [
            (location, a)
            for location in locations
            for a in np.flatnonzero(source.windows(location) == 0)
        ]
        picks = [early[i] for i in subset(np.arange(len(early)), examples, rng)]
        labels = np.asarray([truth[source.location_id(loc)].land_cover for loc, _ in picks])
        subsets.append((read_acquisitions(context, picks, size), labels))
    (train_images, train_labels), (test_images, test_labels) = subsets
    return Labelled(
        train_images,
        train_labels,
        test_images,
        test_labels,
        len(synthetic.LAND_COVER_CLASSES),
        False,
        standardized(context.normalization),
    )


LOADERS = {"land_cover": load_land_cover, "eurosat": load_eurosat, "bigearthnet": load_bigearthnet}


# --------------------------------------------------------------------------------------------------
# The evaluators.


def features(
    encoder, images: np.ndarray, preprocess, spec: EvalSpec, mesh, rows: int = 0
) -> np.ndarray:
    """Pooled features [N, d] of the encoder in eval mode, over every device of ``mesh``, in
    batches of ``spec.batch_size`` images, or of ``rows`` (default N) when fewer: a small subset
    is not padded to a large batch."""
    batch_size = min(spec.batch_size, max(rows or images.shape[0], 1))
    frozen = inference.FrozenModel(encoder, preprocess, batch_size=batch_size, mesh=mesh)
    out = [
        frozen(images[start : start + frozen.batch_size])
        for start in range(0, images.shape[0], frozen.batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, encoder.feature_dim), np.float32)


class Evaluator(abc.ABC):
    """Built once per run (its data loaded); `evaluate` per scheduled step."""

    metric: str = ""  # the primary metric: the curve of the summary and the plot

    def __init__(self, spec: EvalSpec, context: EvalContext):
        self.spec, self.mesh = spec, context.mesh

    @abc.abstractmethod
    def evaluate(self, encoder) -> dict[str, float]:
        """The metrics of ``encoder`` (an nnx ResNet, not modified)."""


class _Classification(Evaluator):
    def __init__(self, spec: EvalSpec, context: EvalContext):
        super().__init__(spec, context)
        self.data = LOADERS[spec.dataset](spec, context)
        self.metric = self.data.metric

    def _features(self, encoder) -> tuple[np.ndarray, np.ndarray]:
        data = self.data
        rows = max(data.train_images.shape[0], data.test_images.shape[0])  # one batch shape
        return (
            features(encoder, data.train_images, data.preprocess, self.spec, self.mesh, rows),
            features(encoder, data.test_images, data.preprocess, self.spec, self.mesh, rows),
        )


class KnnEvaluator(_Classification):
    """Weighted kNN on the test subset, the training subset as the memory bank."""

    def evaluate(self, encoder) -> dict[str, float]:
        train, test = self._features(encoder)
        scores = knn_class_scores(
            train,
            self.data.one_hot(self.data.train_targets),
            test,
            k=self.spec.k,
            temperature=self.spec.temperature,
        )
        return self.data.score(scores)


def probe_settings(spec: EvalSpec) -> heads.HeadSettings:
    """SeCo's linear protocol over ``probe_epochs``: the learning rate x0.1 at 60 % and 80 %."""
    epochs = spec.probe_epochs
    milestones = sorted({m for m in (round(0.6 * epochs), round(0.8 * epochs)) if 0 < m < epochs})
    return heads.HeadSettings(
        epochs=epochs,
        batch_size=spec.probe_batch_size,
        learning_rate=spec.probe_learning_rate,
        milestones=tuple(milestones),
    )


class LinearProbeEvaluator(_Classification):
    """A linear head trained on the cached training features, scored on the test subset."""

    def __init__(self, spec: EvalSpec, context: EvalContext):
        super().__init__(spec, context)
        self.head_settings = probe_settings(spec)
        count = self.data.train_images.shape[0]
        if spec.probe_batch_size > count:  # before training, not at the first evaluation
            raise EvalInputError(
                f"config.evals.{spec.name}.probe_batch_size: {spec.probe_batch_size} is more "
                f"than the {count} training examples of its subset"
            )

    def evaluate(self, encoder) -> dict[str, float]:
        train, test = self._features(encoder)
        data = self.data
        loss = heads.multilabel_soft_margin if data.multilabel else heads.softmax_cross_entropy
        params = heads.train_linear_head(
            train,
            np.asarray(data.train_targets, np.float32) if data.multilabel else data.train_targets,
            num_outputs=data.num_classes,
            loss_fn=loss,
            settings=self.head_settings,
            seed=self.spec.seed,
            description=f"eval {self.spec.name}",
        )
        return data.score(np.asarray(heads.linear(params, test)))


@dataclasses.dataclass
class ChangeLocations:
    images: np.ndarray  # the pretraining input of every acquisition of the chosen locations
    location: np.ndarray  # [N] which of them each image is
    window: np.ndarray  # [N] 0 early, 1 late
    changed: np.ndarray  # [L] the ground truth


def load_change(spec: EvalSpec, context: EvalContext) -> ChangeLocations:
    """Every acquisition of a seeded subset of ``test_examples`` locations (0 = all) with both
    windows and two acquisitions in one of them."""
    truth, source = _ground_truth(spec, context), context.source
    usable = []
    for location in range(len(source)):
        counts = np.bincount(source.windows(location), minlength=2)
        if counts.min() >= 1 and counts.max() >= 2:
            usable.append(location)
    if not usable:
        raise EvalInputError(
            f"config.evals.{spec.name}: no location has both windows and two acquisitions in one"
        )
    chosen = subset(np.asarray(usable), spec.test_examples, np.random.default_rng(spec.seed))
    picks, owners, windows = [], [], []
    for index, location in enumerate(chosen):
        location_windows = source.windows(location)
        picks += [(location, a) for a in range(location_windows.size)]
        owners += [index] * location_windows.size
        windows += location_windows.tolist()
    size = spec.image_size or context.settings.augment.crop_size
    return ChangeLocations(
        read_acquisitions(context, picks, size),
        np.asarray(owners),
        np.asarray(windows),
        np.asarray([truth[source.location_id(loc)].changed for loc in chosen], bool),
    )


def change_distances(
    features_: np.ndarray, location: np.ndarray, window: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """(d_lt, d_st) [count] per location: the mean Euclidean distance of its L2-normalised
    features across the two windows, and within a window (each pair once)."""
    normalized = np.asarray(l2_normalize(jnp.asarray(features_, jnp.float32)), np.float64)
    long_term, short_term = np.zeros(count), np.zeros(count)
    for index in range(count):
        mine = location == index
        f, w = normalized[mine], window[mine]
        distances = np.linalg.norm(f[:, None] - f[None], axis=-1)
        across = w[:, None] != w[None]
        within = (w[:, None] == w[None]) & np.triu(np.ones_like(across), k=1)
        long_term[index] = distances[across].mean()
        short_term[index] = distances[within].mean()
    return long_term, short_term


class ChangeAucEvaluator(Evaluator):
    """How well the encoder's features separate changed from unchanged synthetic locations."""

    metric = "ratio_auc"

    def __init__(self, spec: EvalSpec, context: EvalContext):
        super().__init__(spec, context)
        self.data = load_change(spec, context)
        self.preprocess = standardized(context.normalization)

    def evaluate(self, encoder) -> dict[str, float]:
        data = self.data
        f = features(encoder, data.images, self.preprocess, self.spec, self.mesh)
        long_term, short_term = change_distances(f, data.location, data.window, data.changed.size)
        return {
            "ratio_auc": change_scoring.ratio_auc(long_term / (short_term + 1e-4), data.changed),
            "long_term_auc": change_scoring.ratio_auc(long_term, data.changed),
        }
