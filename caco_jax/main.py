r"""Runs the tasks a config lists: build the synthetic archive, prepare records, pretrain, evaluate.

  python run.py --config configs/demo.py --workdir workdir/demo
  caco-jax --config configs/caco_r18_100k.py --config.data.archive=/data/caco --workdir ...

`run.py` (a checkout) and the `caco-jax` command (an installed package) are this module's `run`.
Any config value can be overridden with `--config.<key>=<value>`.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for outputs; default workdir/<config name>."
)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from caco_jax import config as config_lib
    from caco_jax import tasks

    if not flags.FLAGS["verbosity"].present:
        # Orbax and grain log every checkpoint operation at INFO; `--verbosity=0` shows them.
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as error:
        raise app.UsageError(str(error)) from None
    workdir = _WORKDIR.value or os.path.join(
        "workdir", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    )
    os.makedirs(workdir, exist_ok=True)
    print(f"workdir: {os.path.abspath(workdir)}", flush=True)
    results = {}
    for name in config.tasks:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        results[name] = tasks.get(name)(config, workdir) or {}
        print(f"== {name} done in {time.perf_counter() - start:.1f}s", flush=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(json.dumps(results, indent=2, default=str))


def parse_flags(argv):
    """absl's parser, with one-line errors for bad flags and overrides of missing config keys."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"{_program(argv)}: {error}")
    except (KeyError, AttributeError) as error:
        key = str(error).strip("\"'")
        sys.exit(
            f"{_program(argv)}: a --config.* override names {key!r}, which the config does not have"
        )


def _program(argv) -> str:
    return os.path.basename(argv[0]) if argv else "caco-jax"


def run() -> None:
    """The command line: `python run.py ...` or `caco-jax ...`."""
    app.run(main, flags_parser=parse_flags)
