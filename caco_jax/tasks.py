"""The tasks `run.py` can chain, each a function ``run_task(config, workdir) -> dict``.

Listed as import paths so that a config naming only ``prepare`` never imports the training stack,
with the config sections each reads (`config.for_tasks` builds a config of just those). Tasks
communicate only through files in the workdir; each returns a small JSON-able dict of results that
run.py prints and writes to ``<workdir>/results.json``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

PRETRAIN_SECTIONS = (
    "data",
    "model",
    "method",
    "change",
    "train",
    "input",
    "augment",
    "checkpoint",
    "logging",
)

# name -> (function, config sections it reads)
TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "synthesize": ("caco_jax.data.synthetic:run_task", ("synthetic", "data")),
    "prepare": ("caco_jax.data.builder:run_task", ("data",)),
    "pretrain": ("caco_jax.train:run_task", PRETRAIN_SECTIONS),
    "score_change": ("caco_jax.data.synthetic.scoring:run_task", ("data",)),
    "sample_locations": ("caco_jax.sampling.task:run_task", ("sampling",)),
    "download": ("caco_jax.download.task:run_task", ("sampling", "download")),
    "linear_probe": ("caco_jax.evaluators.linear_probe:land_cover_task", ("data", "eval")),
    "eval_eurosat": ("caco_jax.evaluators.linear_probe:eurosat_task", ("eval",)),
    "eval_bigearthnet": ("caco_jax.evaluators.multilabel:bigearthnet_task", ("eval",)),
    "eval_oscd": ("caco_jax.evaluators.change_detection:oscd_task", ("eval",)),
    "eval_dynamicearthnet": ("caco_jax.evaluators.segmentation:dynamicearthnet_task", ("eval",)),
    "convert_weights": ("caco_jax.convert:run_task", ("convert",)),
    "pretrained": ("caco_jax.pretrained:run_task", ("pretrained",)),
    "embed": ("caco_jax.embed:run_task", ("embed", "pretrained")),
    "change_map": ("caco_jax.change_map:run_task", ("change_map", "pretrained")),
}


def get(name: str) -> Callable:
    module_name, function_name = TASKS[name][0].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def get_sections(name: str) -> tuple[str, ...]:
    return TASKS[name][1]
