"""One protocol for every evaluation: what a dataset module declares, and the one runner.

A dataset module (`eurosat`, `bigearthnet`, `oscd`, `dynamicearthnet`, `land_cover`) subclasses
`Evaluation` and declares:

- `task` (the metrics file is `<checkpoint>_<task>.json`) and `columns` (the console table's);
- `dataset_key(encoder)`: which dataset an encoder row reads (e.g. the RGB or the all-bands
  records); it checks the row's input bands against the dataset and raises naming both;
- `load(key)`: that dataset, in memory or as a data source, loaded once for every row;
- `evaluate(encoder, data)`: one row's metrics, a JSON-able dict;
- `describe(data)`: what the metrics file records about the data and the protocol.

`run` is the runner every evaluation task uses: the encoder rows (`common.encoders`: the
checkpoint, a random encoder, the ImageNet encoder), every row's export and input checked before
any work, each dataset loaded once, each row's result written to the metrics file as soon as it
finishes (`"complete": false` until the last row), the table printed at the end.

Evaluations during pretraining (`config.evals`) are cheaper monitors on data subsets
(`evaluators.online`); they reuse the datasets' loaders and `heads`, not this runner.
"""

from __future__ import annotations

import abc
from collections.abc import Hashable

from caco_jax.evaluators import common


class Evaluation(abc.ABC):
    """A dataset's evaluation under its protocol (see the module docstring)."""

    task: str = ""
    columns: tuple[str, ...] = ()

    def __init__(self, settings):
        self.settings = settings  # the resolved `settings.Settings`: eval, the dataset's section

    @abc.abstractmethod
    def dataset_key(self, encoder: common.Encoder) -> Hashable:
        """Which dataset `encoder` reads; raises when it cannot read it (its bands)."""

    @abc.abstractmethod
    def load(self, key: Hashable):
        """The dataset `key` names."""

    @abc.abstractmethod
    def evaluate(self, encoder: common.Encoder, data) -> dict:
        """One encoder's metrics on `data`."""

    def describe(self, data) -> dict:
        """What the metrics file records about `data` and the protocol."""
        return {}


def run(evaluation: Evaluation, workdir) -> dict:
    """Evaluates every encoder row (see the module docstring); returns the task's result."""
    shared, seed = evaluation.settings.eval, evaluation.settings.seed
    encoders = common.encoders(shared, seed, workdir)
    keys = common.check_inputs(encoders, evaluation.dataset_key)  # every row, before any work
    checkpoint = common.checkpoint_dir(shared, workdir)
    path = common.metrics_path(checkpoint, evaluation.task)
    datasets, rows = {}, []
    for encoder, key in zip(encoders, keys, strict=True):
        if key not in datasets:
            datasets[key] = evaluation.load(key)
        rows.append(
            {
                "encoder": encoder.name,
                "source": encoder.source,
                **evaluation.evaluate(encoder, datasets[key]),
            }
        )
        record = {
            "task": evaluation.task,
            "checkpoint": checkpoint,
            "complete": len(rows) == len(encoders),
            "rows": rows,
            **evaluation.describe(datasets[keys[0]]),
        }
        common.write_metrics(path, record)
    print(common.format_table(f"{evaluation.task} (percent)", rows, evaluation.columns), flush=True)
    return {"metrics_file": path, "rows": rows}


def is_validation_epoch(epoch: int, every: int, epochs: int) -> bool:
    """Whether the official loop validates after `epoch` (counted from 1): every `every`-th epoch
    (Lightning's `check_val_every_n_epoch`) and, here, always after the last; `every` = 0: the
    last only."""
    return epoch == epochs or (every > 0 and epoch % every == 0)


def best_and_last(history: list[dict], primary: str) -> dict:
    """A row's metrics from its validations (`history`: one dict per validated epoch, with
    `epoch`): the last validation's metrics at the top level (what the run ends with), the epoch
    with the highest `primary` (the first on ties) as `best_epoch` and `best_<primary>`, and every
    validation under `history`."""
    last = history[-1]
    best = max(history, key=lambda entry: entry[primary])
    return {
        **last,
        "best_epoch": best["epoch"],
        f"best_{primary}": best[primary],
        "history": history,
    }
