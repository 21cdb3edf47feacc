"""Which acquisitions of a location make up a training item, per training mode (host side).

Not to be confused with `caco_jax/sampling/`, which chooses where on Earth the locations are.

Official behaviour (`utkarshmall13/CACo`, `src/datasets/seco_dataset.py`):

- caco: an item is one (location, window); t0, t1, t2 are 3 *distinct* acquisitions of that window
  (``np.random.choice(paths, 3, replace=False)``).
- teco: the same items, but the official code draws the 3 *with replacement*
  (``np.random.choice(paths, 3)``), so t0 == t2 and friends happen.
- seco: an item is a location; 3 draws *with replacement* from all its acquisitions (SeCo's code).
- moco: one acquisition; both MoCo views are augmentations of it.

`acquisition_draws = "official"` reproduces that; ``"distinct"`` draws 3 distinct acquisitions in
every mode (the paper's description). Every draw comes from a generator seeded by (seed, epoch,
location, window), so it does not depend on which worker makes it nor on how many workers there are.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MODES = ("caco", "teco", "seco", "moco")
ACQUISITION_DRAWS = ("official", "distinct")


@dataclasses.dataclass(frozen=True)
class ModeLayout:
    """How a mode turns a location into batch rows."""

    items_per_location: int  # 2 for caco/teco (one item per window), else 1
    acquisitions_per_item: int  # V in the batch's images [B, V, H, W, C]
    per_window: bool  # draws come from the item's window (else from all acquisitions)
    official_replace: bool  # the official code draws with replacement


LAYOUTS = {
    "caco": ModeLayout(2, 3, per_window=True, official_replace=False),
    "teco": ModeLayout(2, 3, per_window=True, official_replace=True),
    "seco": ModeLayout(1, 3, per_window=False, official_replace=True),
    "moco": ModeLayout(1, 1, per_window=False, official_replace=False),
}


def layout(mode: str) -> ModeLayout:
    if mode not in LAYOUTS:
        raise ValueError(f"unknown training mode {mode!r}; known: {MODES}")
    return LAYOUTS[mode]


def item_rng(seed: int, epoch: int, location_index: int, window: int) -> np.random.Generator:
    """The generator of one item's draws: a pure function of its coordinates."""
    return np.random.default_rng([seed, epoch, location_index, window])


def draw_acquisitions(
    windows: np.ndarray,
    *,
    mode: str,
    item_window: int,
    rng: np.random.Generator,
    acquisition_draws: str = "official",
    location: str = "?",
) -> np.ndarray:
    """Indices (into the location's time-ordered acquisitions) of the item's t0, t1, t2 (or t0).

    `windows` is the window (0 early, 1 late) of each acquisition; `item_window` is ignored when the
    mode draws from all acquisitions. Raises ValueError naming `location` when too few acquisitions.
    """
    if acquisition_draws not in ACQUISITION_DRAWS:
        raise ValueError(
            f"acquisition_draws must be one of {ACQUISITION_DRAWS}, got {acquisition_draws!r}"
        )
    spec = layout(mode)
    windows = np.asarray(windows)
    if spec.per_window:
        candidates = np.flatnonzero(windows == item_window)
    else:
        candidates = np.arange(len(windows))
    replace = spec.official_replace and acquisition_draws == "official"
    needed = 1 if replace else spec.acquisitions_per_item
    if len(candidates) < needed:
        where = f"window {item_window}" if spec.per_window else "all windows"
        raise ValueError(
            f"location {location}: {mode} needs {needed} acquisition(s) in {where}, "
            f"found {len(candidates)}"
        )
    return rng.choice(candidates, spec.acquisitions_per_item, replace=replace)
