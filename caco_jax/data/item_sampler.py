"""Which acquisitions of a location make up a training item (host side).

Not to be confused with `sources.sampling`, which chooses where on Earth the locations are.
What each method draws is in `caco_jax.methods`: caco draws 3 distinct acquisitions of the item's
window, teco 3 of the window with replacement, seco 3 of all acquisitions with replacement, moco
one. ``acquisition_draws = "official"`` reproduces those draws; ``"distinct"`` draws 3 distinct
acquisitions in every method (the paper's description). Every draw comes from a generator seeded
by (seed, epoch, location, window), so it does not depend on which worker makes it nor on how many
workers there are.
"""

from __future__ import annotations

import numpy as np

from caco_jax import methods

ACQUISITION_DRAWS = ("official", "distinct")


def item_rng(seed: int, epoch: int, location_index: int, window: int) -> np.random.Generator:
    """The generator of one item's draws: a pure function of its coordinates."""
    return np.random.default_rng([seed, epoch, location_index, window])


def draw_acquisitions(
    windows: np.ndarray,
    *,
    method: methods.Method,
    item_window: int,
    rng: np.random.Generator,
    acquisition_draws: str = "official",
    location: str = "?",
) -> np.ndarray:
    """Indices (into the location's time-ordered acquisitions) of the item's t0, t1, t2 (or t0).

    `windows` is the window (0 early, 1 late) of each acquisition; `item_window` is ignored when the
    method draws from all acquisitions. Raises ValueError naming `location` when too few
    acquisitions.
    """
    if acquisition_draws not in ACQUISITION_DRAWS:
        raise ValueError(
            f"acquisition_draws must be one of {ACQUISITION_DRAWS}, got {acquisition_draws!r}"
        )
    windows = np.asarray(windows)
    if method.draws_within_window:
        candidates = np.flatnonzero(windows == item_window)
    else:
        candidates = np.arange(len(windows))
    replace = method.official_draws_with_replacement and acquisition_draws == "official"
    needed = 1 if replace else method.acquisitions_per_item
    if len(candidates) < needed:
        where = f"window {item_window}" if method.draws_within_window else "all windows"
        raise ValueError(
            f"location {location}: {method.name} needs {needed} acquisition(s) in {where}, "
            f"found {len(candidates)}"
        )
    return rng.choice(candidates, method.acquisitions_per_item, replace=replace)
