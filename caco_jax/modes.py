"""The training methods as data: what each of caco, teco, seco and moco plugs into the shared step.

The step never asks which method it runs; it reads these fields. The batch layout and the
acquisition
draws of a method live in `caco_jax.data.item_sampler.LAYOUTS` (the host side), the views in
`caco_jax.augment` (keyed by the same name), the objective and the queue layout here.

| mode | items/location | subspaces = key views | queue             | objective | change stats |
|------|----------------|-----------------------|-------------------|-----------|--------------|
| caco | 2 (one/window) | 3 (k0, k1, k2)        | per-window halves | caco_loss | yes          |
| teco | 2              | 3                     | per-window halves | teco_loss | no           |
| seco | 1              | 3                     | one [K]           | seco_loss | no           |
| moco | 1              | 1 (k0)                | one [K]           | moco_loss | no           |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from caco_jax import objectives
from caco_jax import queue as queue_lib


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    num_subspaces: int  # embedding subspaces = projection heads = key views
    # (z_q [S, n, D], z_k [S, S, N, D], queue, changed [n], temperature, query_offset)
    #   -> (loss, metrics)
    objective: Callable
    # (key, num_subspaces, K, D) -> (queue, pointer)
    init_queue: Callable
    # (queue, pointer, keys [S, N, D], windows [N]) -> (queue, pointer)
    enqueue: Callable
    # Whether the step estimates per-item change and the objective reads the labels (CACo only).
    tracks_change: bool


def _caco(z_q, z_k, queue, changed, temperature, query_offset):
    return objectives.caco_loss(z_q, z_k, queue, changed, temperature, query_offset=query_offset)


def _teco(z_q, z_k, queue, changed, temperature, query_offset):
    del changed  # TeCo treats every long-term partner as changed
    return objectives.teco_loss(z_q, z_k, queue, temperature, query_offset=query_offset)


def _seco(z_q, z_k, queue, changed, temperature, query_offset):
    del changed
    return objectives.seco_loss(z_q, z_k, queue, temperature, query_offset=query_offset)


def _moco(z_q, z_k, queue, changed, temperature, query_offset):
    del changed
    return objectives.moco_loss(z_q, z_k, queue, temperature, query_offset=query_offset)


def _enqueue_by_window(queue, pointer, keys, windows):
    return queue_lib.enqueue(queue, pointer, keys, windows)


def _enqueue_plain(queue, pointer, keys, windows):
    del windows  # one queue for all items
    return queue_lib.enqueue(queue, pointer, keys)


MODES: dict[str, Mode] = {
    "caco": Mode("caco", 3, _caco, queue_lib.init_window_queue, _enqueue_by_window, True),
    "teco": Mode("teco", 3, _teco, queue_lib.init_window_queue, _enqueue_by_window, False),
    "seco": Mode("seco", 3, _seco, queue_lib.init_queue, _enqueue_plain, False),
    "moco": Mode("moco", 1, _moco, queue_lib.init_queue, _enqueue_plain, False),
}


def get(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"unknown training mode {name!r}; known: {sorted(MODES)}")
    return MODES[name]
