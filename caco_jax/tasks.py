"""The tasks `run.py` can chain: one table says, for each, what runs, what it reads, and where.

A task is a function ``run_task(settings, workdir) -> dict`` named by its import path, so that a
config listing only ``prepare`` never imports the training stack. It reads the config sections it
lists (`config.for_tasks` builds a config of just those) and talks to the other tasks only through
files in the workdir (`runtime.workdir`); what it returns is printed and written to
``<workdir>/results.json``.

In a run of several processes (`runtime.multihost`) a task runs on every process (pretraining: they
train together; embeddings and change maps: each takes its share), on process 0 while the others
wait for its result or skip it (writing the synthetic archive and the records), or it is a
one-process task that such a run refuses up front.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

EVERY_PROCESS = "every_process"
PROCESS_0 = "process_0"
ONE_PROCESS = "one_process"


@dataclasses.dataclass(frozen=True)
class Task:
    run: str  # "module:function", called as function(settings, workdir) -> dict
    sections: tuple[str, ...]  # the config sections it reads
    runs_on: str = ONE_PROCESS  # EVERY_PROCESS, PROCESS_0 or ONE_PROCESS
    others: str = ""  # PROCESS_0 tasks: what the other processes run meanwhile ("" = nothing)
    check: str = ""  # "module:function(settings)": raises SettingsError before any task starts
    summary: str = ""  # one line for `caco-jax --help`


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
    "evals",
)
EVAL = "caco_jax.evaluators"

TASKS: dict[str, Task] = {
    "synthesize": Task(
        "caco_jax.sources.synthetic:run_task",
        ("synthetic", "data"),
        PROCESS_0,
        check="caco_jax.sources.synthetic:check_task",
        summary="write the embedded synthetic archive in the published layout",
    ),
    "prepare": Task(
        "caco_jax.data.dataset:run_task",
        ("data",),
        PROCESS_0,
        others="caco_jax.data.dataset:wait_for_dataset",
        check="caco_jax.data.dataset:check_task",
        summary="an archive (tar.gz, parts or folder) -> TFDS records",
    ),
    "pretrain": Task(
        "caco_jax.pretrain.train:run_task",
        PRETRAIN_SECTIONS,
        EVERY_PROCESS,
        summary="CACo, TeCo, SeCo or MoCo v2 on the records -> checkpoints, an encoder",
    ),
    "score_change": Task(
        f"{EVAL}.change_scoring:run_task",
        ("data",),
        summary="the run's change labels against the synthetic archive's ground truth",
    ),
    "change_map": Task(
        "caco_jax.products.change_map:run_task",
        ("change_map", "pretrained"),
        EVERY_PROCESS,
        check="caco_jax.products.change_map:check_task",
        summary="which places changed between two dates, from an encoder alone: maps, GeoTIFF",
    ),
    "eval_land_cover": Task(
        f"{EVAL}.land_cover:run_task",
        ("data", "eval", "land_cover"),
        summary="the demo's land-cover probe on the synthetic archive",
    ),
    "eval_eurosat": Task(
        f"{EVAL}.eurosat:run_task",
        ("eval", "eurosat"),
        summary="EuroSAT linear probe (the paper's protocol)",
    ),
    "eval_bigearthnet": Task(
        f"{EVAL}.bigearthnet:run_task",
        ("eval", "bigearthnet"),
        summary="BigEarthNet-19 multi-label classification, frozen or fine-tuned",
    ),
    "eval_oscd": Task(
        f"{EVAL}.oscd:run_task",
        ("eval", "oscd"),
        summary="OSCD change detection with SeCo's U-Net decoder",
    ),
    "eval_dynamicearthnet": Task(
        f"{EVAL}.dynamicearthnet:run_task",
        ("eval", "dynamicearthnet"),
        summary="DynamicEarthNet semantic segmentation, frozen or fine-tuned",
    ),
    "pretrained": Task(
        "caco_jax.models.pretrained:run_task",
        ("pretrained",),
        check="caco_jax.models.pretrained:check_task",
        summary="an official encoder by name -> an export (and a PyTorch file)",
    ),
    "embed": Task(
        "caco_jax.products.embed:run_task",
        ("embed", "pretrained"),
        EVERY_PROCESS,
        check="caco_jax.products.embed:check_task",
        summary="embeddings of Sentinel-2 scenes, an archive or records -> GeoParquet",
    ),
    "convert_weights": Task(
        "caco_jax.models.convert:run_task",
        ("convert",),
        check="caco_jax.models.convert:check_task",
        summary="PyTorch weights (.pth, .ckpt, .safetensors) -> an encoder export",
    ),
    "sample_locations": Task(
        "caco_jax.sources.sampling.task:run_task",
        ("sampling",),
        summary="the paper's change-aware sample of locations (the `sampling` extra)",
    ),
    "download": Task(
        "caco_jax.sources.download.task:run_task",
        ("sampling", "download", "logging"),
        summary="Sentinel-2 images of sampled locations from Earth Engine -> an archive",
    ),
}


def function(path: str) -> Callable:
    """The function a "module:function" path names (imported on first use)."""
    module_name, function_name = path.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def get(name: str) -> Callable:
    """The function that runs task ``name`` in a single process."""
    return function(TASKS[name].run)


def multiprocess_refusals(names) -> list[str]:
    """The tasks of ``names`` that a run of several processes cannot run."""
    return [name for name in names if TASKS[name].runs_on == ONE_PROCESS]


def run(name: str, settings, workdir, *, process_index: int = 0, process_count: int = 1) -> dict:
    """Runs task ``name`` on this process as the table says; returns its result."""
    task = TASKS[name]
    if process_count > 1 and task.runs_on == PROCESS_0 and process_index != 0:
        if not task.others:
            return {"skipped": "process 0 runs this task"}
        return function(task.others)(settings, workdir) or {}
    return function(task.run)(settings, workdir) or {}
