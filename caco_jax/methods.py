"""The pretraining methods as one table: what CACo, TeCo, SeCo and MoCo v2 each plug into the
shared pipeline and step.

Nothing else lists the methods. Config validation, the host sampler (`data.item_sampler`), the
views (`augment`), the queue (`queue`) and the step (`step`) read these fields; none of them asks
which method it runs. No JAX here, so validating a config or feeding the input pipeline never
imports it.

| method | items/location | acq./item      | drawn from  | subspaces | views | queue      | epoch |
|--------|----------------|----------------|-------------|-----------|-------|------------|-------|
| caco   | 2 (per window) | 3 distinct     | item window | 3         | seco  | per_window | loc.  |
| teco   | 2              | 3, replacement | item window | 3         | seco  | per_window | loc.  |
| seco   | 1              | 3, replacement | all         | 3         | seco  | single     | loc.  |
| moco   | 1              | 1              | each once   | 1         | moco  | single     | acq.  |

Only caco estimates change (``tracks_change``). An epoch (``epoch_over``) visits every location
once (loc.), drawing its items' acquisitions, except MoCo's, which visits every acquisition once
(acq.: one item each, nothing drawn), as the official MoCo baseline's dataset lists every
acquisition of every location (``resnet{18,50}_moco_geo_100k_200``: 200 such epochs, learning
rate x0.1 at 120 and 160).

The draws are the official code's (`utkarshmall13/CACo`, ``src/datasets/seco_dataset.py``: caco
``np.random.choice(paths, 3, replace=False)``, teco and seco ``np.random.choice(paths, 3)``);
``config.input.acquisition_draws = "distinct"`` gives the paper's distinct draws everywhere.

The objective follows from the queue and the change estimate (`step`): a per-window queue means
CACo's negatives (the queued keys of the query's window, the other items' keys, the long-term
partner), with the partner removed for items estimated unchanged; without a change estimate
(TeCo) every partner is a negative. A single queue means SeCo's negatives (MoCo v2 is SeCo with
one subspace).
"""

from __future__ import annotations

import dataclasses

from caco_jax.settings import Section

VIEW_RECIPES = ("seco", "moco")  # implemented in `augment.VIEW_RECIPES`
QUEUE_KINDS = ("per_window", "single")  # implemented in `queue.QUEUES`
# The two other choices the step reads, whatever the method: how BatchNorm batches are formed
# across devices (`step.bn_axis`), and the compute dtype (parameters stay float32).
BN_MODES = ("per_device", "sync", "shuffle")
COMPUTE_DTYPES = ("float32", "bfloat16")
EPOCHS_OVER = ("locations", "acquisitions")  # implemented in `data.pipeline`


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    # Batch rows per location: 2 = one item per window (rows 2l, 2l+1), 1 = one item per location.
    items_per_location: int
    acquisitions_per_item: int  # V of the batch's images [B, V, H, W, C]: t0, t1, t2 or t0
    draws_within_window: bool  # an item's acquisitions come from its window (else from all)
    official_draws_with_replacement: bool
    num_subspaces: int  # embedding subspaces = projection heads = key views
    views: str  # a VIEW_RECIPES entry
    queue: str  # a QUEUE_KINDS entry
    tracks_change: bool  # estimates per-item change; the objective reads the labels
    # What an epoch visits once (an EPOCHS_OVER entry); over acquisitions, each is one item.
    epoch_over: str = "locations"

    def __post_init__(self):
        if self.epoch_over not in EPOCHS_OVER or (
            self.epoch_over == "acquisitions" and self.items_per_location != 1
        ):
            raise ValueError(
                f"method {self.name}: epoch_over must be one of {EPOCHS_OVER}, 'acquisitions' "
                f"only with one item per location; got {self.epoch_over!r}"
            )

    @property
    def paired(self) -> bool:
        """Both windows of a location sit side by side in a batch (rows 2l, 2l+1)."""
        return self.items_per_location == 2


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("caco", 2, 3, True, False, 3, views="seco", queue="per_window", tracks_change=True),
        Method("teco", 2, 3, True, True, 3, views="seco", queue="per_window", tracks_change=False),
        Method("seco", 1, 3, False, True, 3, views="seco", queue="single", tracks_change=False),
        Method(
            "moco",
            1,
            1,
            False,
            False,
            1,
            views="moco",
            queue="single",
            tracks_change=False,
            epoch_over="acquisitions",
        ),
    )
}
NAMES = tuple(METHODS)


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {list(NAMES)}")
    return METHODS[name]


@dataclasses.dataclass(frozen=True)
class MethodSettings(Section):
    """`config.method`: which method, and the contrastive hyper-parameters of the official code."""

    SECTION = "method"
    name: str = "caco"  # one of NAMES
    num_negatives: int = 16384  # queue length K (per window for caco/teco: K/2 each)
    temperature: float = 0.07
    key_momentum: float = 0.999  # EMA of the key encoder and heads

    def validate(self) -> None:
        self.require(self.name in NAMES, "name", f"must be one of {NAMES}")
        self.require(self.num_negatives >= 2, "num_negatives", "must be >= 2")
        self.require(
            self.num_negatives % 2 == 0,
            "num_negatives",
            "must be even (the queue holds one half per time window)",
        )
        self.require(self.temperature > 0, "temperature", "must be > 0")
        self.require(0.0 <= self.key_momentum < 1.0, "key_momentum", "in [0, 1)")

    @property
    def method(self) -> Method:
        return get(self.name)
