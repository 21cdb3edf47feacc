"""What the dense evaluations (OSCD change detection, DynamicEarthNet segmentation) share: the
decoder's training protocol and its optimiser, SeCo's `main_oscd.py`."""

from __future__ import annotations

import dataclasses

import optax

from caco_jax.settings import Section


@dataclasses.dataclass(frozen=True)
class DecoderSettings(Section):
    """How a U-Net decoder trains on the encoder's maps: SeCo's OSCD protocol (Adam with L2 weight
    decay, lr x `lr_decay` per epoch, batch 32, 100 epochs). `config.oscd` and
    `config.dynamicearthnet` extend it."""

    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3  # Adam
    weight_decay: float = 1e-4  # L2 term of torch's Adam
    lr_decay: float = 0.95  # learning rate x this per epoch
    tile_size: int = 96  # training tiles and prediction tiles, px

    def validate(self) -> None:
        self.require(self.epochs >= 1, "epochs", "must be >= 1")
        self.require(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.require(self.learning_rate > 0, "learning_rate", "must be > 0")
        self.require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self.require(0.0 < self.lr_decay <= 1.0, "lr_decay", "in (0, 1]")
        self.require(
            self.tile_size >= 32 and self.tile_size % 32 == 0,
            "tile_size",
            "must be a multiple of 32 (the decoder undoes the encoder's 5 halvings)",
        )


def adam_with_l2(
    learning_rate: float, *, weight_decay: float, lr_decay: float, steps_per_epoch: int
) -> optax.GradientTransformation:
    """torch's Adam(weight_decay=...): the L2 term added to the gradient before the moments, the
    learning rate x ``lr_decay`` per epoch (SeCo's ExponentialLR stepped per epoch)."""
    schedule = optax.exponential_decay(learning_rate, steps_per_epoch, lr_decay, staircase=True)
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_adam(),
        optax.scale_by_learning_rate(schedule),
    )
