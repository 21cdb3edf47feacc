"""The configuration schema shared by every config in `configs/`, and its validation.

A config is an `ml_collections.ConfigDict` whose top-level `tasks` lists what `run.py` does, in order
(see `caco_jax.tasks`). Each section below belongs to one stage of the data flow. `validate` checks
the values before any work starts, so that a bad value fails at once with a message naming it.
"""

from __future__ import annotations

import ml_collections


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def base_config() -> ml_collections.ConfigDict:
    """Defaults reproduce the official CACo code (SPEC sections 2 and 3)."""
    c = ml_collections.ConfigDict()
    c.tasks = ()  # e.g. ("synthesize", "prepare", "pretrain", "linear_probe")
    c.seed = 0

    # The embedded synthetic archive (caco_jax/data/synthetic.py).
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.num_locations = 64
    c.synthetic.change_fraction = 0.3
    c.synthetic.seed = 0
    c.synthetic.output = ""  # folder the archive is written to; "" = <workdir>/synthetic_archive

    # Archive -> records (caco_jax/data/builder.py).
    c.data = ml_collections.ConfigDict()
    c.data.archive = ""  # folder holding the tar.gz, the *_part* files or an extracted archive
    c.data.data_dir = ""  # TFDS data_dir of the prepared records; "" = <workdir>/tfds
    c.data.builder_config = "rgb"  # "rgb" or "all_bands"
    c.data.max_skip_fraction = 0.05  # the build fails when more locations than this are skipped
    c.data.num_workers = 0  # decode processes; 0 = one per core

    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad key."""
    from caco_jax import tasks

    unknown = [t for t in config.tasks if t not in tasks.TASKS]
    if unknown:
        raise ConfigError(f"config.tasks: unknown task(s) {unknown}; known: {sorted(tasks.TASKS)}")
    _check(config.synthetic.num_locations >= 2, "synthetic.num_locations", "must be >= 2")
    _check(0.0 <= config.synthetic.change_fraction <= 1.0, "synthetic.change_fraction", "in [0, 1]")
    _check(
        config.data.builder_config in ("rgb", "all_bands"),
        "data.builder_config",
        "must be 'rgb' or 'all_bands'",
    )
    _check(0.0 <= config.data.max_skip_fraction <= 1.0, "data.max_skip_fraction", "in [0, 1]")
    _check(config.data.num_workers >= 0, "data.num_workers", "must be >= 0")


def _check(ok: bool, key: str, requirement: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {requirement}")
