"""The change estimate: which items' long-term partner is a real negative.

What the official code does (``moco2_module.py`` at subspace 1, ``utils/histogram_callback.py``):

- Every CACo step, with no gradient and after that step's EMA update, the KEY encoder (in train
  mode: BatchNorm normalises with the query batch's own statistics) and key head 1 (the
  time-invariant subspace) embed the query images: e(q), L2-normalised. e(k1) is key head 1 on the
  k1 views, i.e. ``z_k[1, 1]`` of the objective. For item i with long-term partner i^1 (rows 2l,
  2l+1): d_lt = ||e(q_i) - e(q_{i^1})||, d_st = ||e(q_i) - e(k1_i)||, R = d_lt / (d_st + 1e-4).
  (d_lt is the same number for both items of a location within one step.)
- Per item (indexed by dataset item id = 2 * location + window) it keeps the triple (d_lt, d_st, R):
  the first visit stores it, later visits store 0.8 * old + 0.2 * new, each of the three separately
  (r is the EMA of ratios, not the ratio of EMAs). The values persist over epochs.
- At the end of each epoch it fits ``sklearn.mixture.GaussianMixture(n_components=2)`` (all
  defaults: full covariance, tol 1e-3, reg_covar 1e-6, max_iter 100, n_init 1, k-means init,
  random_state None) to the r of every item seen so far, labels them with ``gmm.predict``, and calls
  the component with the higher mean "changed". Never-seen items get label -1, which the loss treats
  as not changed. Labels from epoch e drive the mask in epoch e+1; in epoch 0 every label is 0
  (nothing changed).
- The diagnostic: per epoch, histograms of d_lt, d_st (bins of 0.02 on [0, 2]) and r (bins of 0.05
  on [0, 8]) split by label, saved as ``histogram_caco/histogram_epoch=NNN.png``.

Deliberate differences: the mixture is seeded (deterministic), non-finite values are excluded with a
warning, and degenerate inputs (fewer than two usable items, all values equal) label nothing changed
instead of crashing. The running values live in arrays indexed by item id inside the training state,
so they survive a resume and are updated on device.
"""

from __future__ import annotations

import dataclasses
import logging

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from caco_jax.settings import Section

# Columns of the statistics triple, as in the official ``train_dataset.loss`` array.
LONG_TERM, SHORT_TERM, RATIO = 0, 1, 2
STATISTIC_COLUMNS = {"ratio": RATIO, "long_term": LONG_TERM}

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ChangeSettings(Section):
    """`config.change`: the change estimate (read by method "caco" only); the official values and
    the paper's ablations."""

    SECTION = "change"
    beta: float = 0.8  # running value r = beta r + (1 - beta) R; the first visit takes R
    use_ema: bool = True  # False: r = the latest R (paper ablation)
    statistic: str = "ratio"  # "ratio" d_lt / (d_st + eps), or "long_term" d_lt (ablation)
    per_location: bool = False  # True: one decision per location (paper ablation)
    epsilon: float = 1e-4

    def validate(self) -> None:
        self.require(0.0 <= self.beta < 1.0, "beta", "in [0, 1)")
        self.require(
            self.statistic in STATISTIC_COLUMNS,
            "statistic",
            f"must be one of {sorted(STATISTIC_COLUMNS)}",
        )
        self.require(self.epsilon > 0, "epsilon", "must be > 0")


def _partners(x):
    """Row 2l <-> row 2l+1."""
    if x.shape[0] % 2:
        raise ValueError(f"rows come in location pairs (2l, 2l+1): got an odd count {x.shape[0]}")
    return x.reshape(x.shape[0] // 2, 2, *x.shape[1:])[:, ::-1].reshape(x.shape)


def change_statistics(e_q, e_k1, eps: float = 1e-4):
    """[N, 3] = (d_lt, d_st, R) per row; e_q, e_k1 [N, D] key-side subspace-1 embeddings.

    The long-term partner of row 2l is row 2l+1 and vice versa, so pass whole locations (any even
    slice of the batch that starts at an even row, e.g. one device's rows).
    """
    if e_q.shape != e_k1.shape or e_q.ndim != 2:
        raise ValueError(f"e_q and e_k1 must both be [N, D], got {e_q.shape} and {e_k1.shape}")
    dtype = jnp.promote_types(e_q.dtype, jnp.float32)
    e_q = jax.lax.stop_gradient(e_q).astype(dtype)
    e_k1 = jax.lax.stop_gradient(e_k1).astype(dtype)
    d_lt = jnp.linalg.norm(e_q - _partners(e_q), axis=1)
    d_st = jnp.linalg.norm(e_q - e_k1, axis=1)
    return jnp.stack([d_lt, d_st, d_lt / (d_st + eps)], axis=1)


def change_ratio(e_q, e_k1, eps: float = 1e-4):
    """R [N] = d_lt / (d_st + eps); see ``change_statistics``."""
    return change_statistics(e_q, e_k1, eps)[:, RATIO]


@flax.struct.dataclass
class RunningChange:
    """Running (d_lt, d_st, r) per item id, and whether the item was ever visited."""

    values: jax.Array  # [num_items, 3] float32; meaningless where not seen
    seen: jax.Array  # [num_items] bool


def init_running_change(num_items: int) -> RunningChange:
    return RunningChange(
        values=jnp.zeros((num_items, 3), jnp.float32), seen=jnp.zeros((num_items,), bool)
    )


def update_running_change(
    running: RunningChange,
    item_ids,
    statistics,
    *,
    beta: float = 0.8,
    use_ema: bool = True,
) -> RunningChange:
    """Folds one step's statistics into the running values: first visit takes them, later visits
    ``beta * old + (1 - beta) * new`` (``use_ema=False``: the newest value alone).

    ``item_ids`` [N] int (distinct, in [0, num_items); JAX drops out-of-range writes) and
    ``statistics`` [N, 3] of the GLOBAL batch: inside ``jax.shard_map`` gather both over the data
    axes first (``jax.lax.all_gather(..., tiled=True, to="invarying")``), so that every device
    applies every item, wherever it was computed, and the replicated state stays identical.
    """
    if statistics.shape != (item_ids.shape[0], 3):
        raise ValueError(
            f"statistics must be [n, 3] for {item_ids.shape[0]} ids, got {statistics.shape}"
        )
    statistics = jax.lax.stop_gradient(statistics).astype(running.values.dtype)
    old = running.values[item_ids]
    keep = beta if use_ema else 0.0
    blended = keep * old + (1.0 - keep) * statistics
    new = jnp.where(running.seen[item_ids][:, None], blended, statistics)
    return RunningChange(
        values=running.values.at[item_ids].set(new), seen=running.seen.at[item_ids].set(True)
    )


def _location_values(x, seen):
    """Mean of the seen items of each location (items 2l, 2l+1); NaN where neither was seen."""
    if x.shape[0] % 2:
        raise ValueError(f"per-location labels need an even number of items, got {x.shape[0]}")
    pairs = np.where(seen, x, 0.0).reshape(-1, 2)
    counts = seen.reshape(-1, 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pairs.sum(axis=1) / counts, counts > 0


def fit_change_labels(
    values, seen, *, seed: int, granularity: str = "item", statistic: str = "ratio"
) -> np.ndarray:
    """Epoch-end labels [num_items] bool from the running values (host side, NumPy + scikit-learn).

    Args:
      values: [num_items, 3] running (d_lt, d_st, r), e.g. ``RunningChange.values``.
      seen: [num_items] bool.
      seed: random_state of the Gaussian mixture (e.g. seed + epoch); the official code leaves it
        unset.
      granularity: "item" (official: one decision per (location, window) item) or "location" (paper
        variant: the mixture is fitted to the per-location mean of its seen items' values and both
        items get the location's label).
      statistic: "ratio" (official, r) or "long_term" (paper variant: d_lt alone).

    Returns:
      True = "changed" (the long-term partner is a negative). Unseen items, non-finite values, and
      every item when fewer than two usable values or only one distinct value exist, are False.
    """
    if granularity not in ("item", "location"):
        raise ValueError(f"granularity must be 'item' or 'location', got {granularity!r}")
    if statistic not in STATISTIC_COLUMNS:
        raise ValueError(f"statistic must be one of {sorted(STATISTIC_COLUMNS)}, got {statistic!r}")
    values = np.asarray(values, np.float64)
    seen = np.asarray(seen, bool)
    if values.ndim != 2 or values.shape != (seen.shape[0], 3):
        raise ValueError(
            f"values must be [num_items, 3] matching seen {seen.shape}, got {values.shape}"
        )
    x = values[:, STATISTIC_COLUMNS[statistic]]
    if granularity == "location":
        x, seen = _location_values(x, seen)
    changed = np.zeros(x.shape[0], bool)
    finite = np.isfinite(x)
    if np.any(seen & ~finite):
        _log.warning(
            "change labels: %d seen %ss have a non-finite %s; labelled not changed",
            int(np.sum(seen & ~finite)),
            granularity,
            statistic,
        )
    usable = seen & finite
    sample = x[usable]
    if sample.size < 2 or np.all(sample == sample[0]):
        _log.warning(
            "change labels: %d usable %ss with %d distinct values; nothing labelled changed",
            sample.size,
            granularity,
            np.unique(sample).size,
        )
    else:
        from sklearn.mixture import GaussianMixture

        mixture = GaussianMixture(n_components=2, random_state=seed).fit(sample[:, None])
        means = mixture.means_[:, 0]
        if means[0] != means[1]:
            changed[usable] = mixture.predict(sample[:, None]) == np.argmax(means)
    return np.repeat(changed, 2) if granularity == "location" else changed


def epoch_end_labels(
    running: RunningChange, settings: ChangeSettings, *, seed: int
) -> tuple[np.ndarray, float]:
    """CACo's epoch end: the next epoch's labels from the running values (host arrays), and the
    fraction of the seen items labelled changed. ``seed`` seeds the mixture (the run's seed plus
    the epoch)."""
    labels = fit_change_labels(
        running.values,
        running.seen,
        seed=seed,
        granularity="location" if settings.per_location else "item",
        statistic=settings.statistic,
    )
    seen = np.asarray(running.seen, bool)
    return labels, float(labels[seen].mean()) if seen.any() else 0.0
