"""Config files and the command line in, typed settings out.

A config is an `ml_collections.ConfigDict`: ``tasks`` (what `run.py` does, in order; see
`caco_jax.tasks`), ``seed`` (every random choice) and one section per config section those tasks
read. `for_tasks` builds one with each section's defaults, which are the fields of the section's
settings dataclass (`SECTIONS`: the module that reads a section owns its dataclass, and the
defaults reproduce the official code). A config file then sets only what differs, in big_vision's
style (``get_config(arg)``, ``configs/pretrain.py:caco,r18,100k``), and the command line overrides
any key (``--config.train.batch_size=512``).

`resolve` turns the ConfigDict into `settings.Settings`, checking every value before any work
starts: a bad one fails at once with a `SettingsError` naming ``config.<section>.<key>``.
"""

from __future__ import annotations

import importlib

import ml_collections

from caco_jax import tasks as tasks_lib
from caco_jax.settings import Section, Settings, SettingsError

# Config section -> "module:Class" of its settings dataclass (imported only when needed).
SECTIONS: dict[str, str] = {
    "synthetic": "caco_jax.sources.synthetic:SyntheticSettings",
    "data": "caco_jax.data.dataset:DataSettings",
    "model": "caco_jax.pretrain.state:ModelSettings",
    "method": "caco_jax.methods:MethodSettings",
    "change": "caco_jax.pretrain.change:ChangeSettings",
    "train": "caco_jax.pretrain.train:TrainSettings",
    "input": "caco_jax.data.pipeline:InputSettings",
    "augment": "caco_jax.pretrain.augment:AugmentSettings",
    "checkpoint": "caco_jax.runtime.checkpointing:CheckpointSettings",
    "logging": "caco_jax.runtime.metrics_writer:LoggingSettings",
    "evals": "caco_jax.pretrain.evals:EvalsSettings",
    "sampling": "caco_jax.sources.sampling.task:SamplingSettings",
    "download": "caco_jax.sources.download.downloader:DownloadSettings",
    "eval": "caco_jax.evaluators.common:EvalSettings",
    "eurosat": "caco_jax.evaluators.eurosat:EurosatSettings",
    "land_cover": "caco_jax.evaluators.land_cover:LandCoverSettings",
    "bigearthnet": "caco_jax.evaluators.bigearthnet:BigEarthNetSettings",
    "oscd": "caco_jax.evaluators.oscd:OscdSettings",
    "dynamicearthnet": "caco_jax.evaluators.dynamicearthnet:DynamicEarthNetSettings",
    "convert": "caco_jax.models.convert:ConvertSettings",
    "pretrained": "caco_jax.models.pretrained:PretrainedSettings",
    "embed": "caco_jax.products.embed:EmbedSettings",
    "change_map": "caco_jax.products.change_map:ChangeMapSettings",
}


def section_class(name: str) -> type[Section]:
    """The settings dataclass of config section ``name``."""
    module_name, class_name = SECTIONS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def for_tasks(*tasks: str) -> ml_collections.ConfigDict:
    """A config for ``tasks`` (in order) holding only the sections they read, with defaults."""
    _check_tasks(tasks)
    config = ml_collections.ConfigDict()
    config.tasks = tuple(tasks)
    config.seed = 0  # every random choice: synthetic archive, sampling, training, evaluation
    needed = {name for task in tasks for name in tasks_lib.TASKS[task].sections}
    for name in SECTIONS:
        if name in needed:
            config[name] = section_class(name)().to_dict()
    return config


def resolve(config: ml_collections.ConfigDict) -> Settings:
    """The typed settings of ``config``; raises SettingsError naming the first bad key: an unknown
    task, a task without a section it reads, a bad value in a section, or a value a task cannot
    work with."""
    names = tuple(config.tasks)
    _check_tasks(names)
    sections = {}
    for task in names:
        missing = [s for s in tasks_lib.TASKS[task].sections if s not in config]
        if missing:
            raise SettingsError(
                f"config.tasks: task {task!r} reads config sections {missing}, which this config "
                "lacks (build it with config.for_tasks)"
            )
    for name in config:
        if name in ("tasks", "seed"):
            continue
        if name not in SECTIONS:
            raise SettingsError(f"config.{name}: not a config section; known: {sorted(SECTIONS)}")
        sections[name] = section_class(name).from_mapping(config[name].to_dict())
    settings = Settings(tasks=names, seed=int(config.seed), sections=sections)
    for task in dict.fromkeys(names):
        if tasks_lib.TASKS[task].check:
            tasks_lib.function(tasks_lib.TASKS[task].check)(settings)
    return settings


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises SettingsError naming the first bad key (see `resolve`)."""
    resolve(config)


def _check_tasks(names) -> None:
    unknown = [t for t in names if t not in tasks_lib.TASKS]
    if unknown:
        raise SettingsError(
            f"config.tasks: unknown task(s) {unknown}; known: {sorted(tasks_lib.TASKS)}"
        )
