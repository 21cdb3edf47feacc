"""The tasks `run.py` can chain, each a function `run_task(config, workdir) -> dict`.

Listed as import paths so that a config naming only `prepare` never imports the training stack.
Tasks communicate only through files in the workdir; each returns a small JSON-able dict of results
that run.py prints and writes to `<workdir>/results.json`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

TASKS: dict[str, str] = {
    "synthesize": "caco_jax.data.synthetic:run_task",
    "prepare": "caco_jax.data.builder:run_task",
    "pretrain": "caco_jax.train:run_task",
    "sample_locations": "caco_jax.sampling.task:run_task",
    "download": "caco_jax.download.task:run_task",
    "linear_probe": "caco_jax.evaluators.linear_probe:land_cover_task",
    "eval_eurosat": "caco_jax.evaluators.linear_probe:eurosat_task",
    "eval_bigearthnet": "caco_jax.evaluators.multilabel:bigearthnet_task",
    "eval_oscd": "caco_jax.evaluators.change_detection:oscd_task",
    "eval_dynamicearthnet": "caco_jax.evaluators.segmentation:dynamicearthnet_task",
    "convert_weights": "caco_jax.convert:run_task",
}


def get(name: str) -> Callable:
    module_name, function_name = TASKS[name].split(":")
    return getattr(importlib.import_module(module_name), function_name)
