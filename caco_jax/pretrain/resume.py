"""Resuming pretraining: the checkpoint's settings against this run's, before the run goes on.

Every checkpoint records the settings of the run that wrote it (``config/``: `Settings.to_dict()`,
plus the changes accepted on earlier resumes under `CHANGES_KEY`). A rerun in the same workdir
resumes from it, and must not silently become another run: `compare` lists every setting that
differs and would change what is trained (the optimiser, its schedule, the augmentation, the
objective, the model, the data, the seed), and `check` refuses them in one line naming each key
with both values, unless ``config.train.allow_config_change`` accepts them, in which case the
change is recorded in ``metrics.jsonl`` and in every later checkpoint.

Settings that do not change what is trained pass freely (`FREE_KEYS`): how long the run is
(``train.epochs``, ``train.max_steps``: a longer run continues, a shorter one stops sooner), how
the host reads, logging, checkpoint cadence. A change that alters the state's shapes cannot be
resumed even when accepted (`StateChangedError` names the settings instead of blaming damage), nor
can one of the input stream's position (batch size, seed, method, dataset size: `ResumeError`).

A checkpoint written before checkpoints recorded comparable settings resumes with a note.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from caco_jax.runtime import errors

# The sections whose keys can change what pretraining computes, and beside them the seed.
TRAINING_SECTIONS = ("data", "model", "method", "change", "train", "input", "augment")
# Keys of those sections that do not: how long the run is, how the host reads and prepares.
FREE_KEYS = frozenset(
    {
        "train.epochs",
        "train.max_steps",
        "train.allow_config_change",
        "input.num_workers",
        "input.num_threads",
        "input.prefetch_batches",
        "data.num_workers",
        "data.max_skip_fraction",
        "data.wait_seconds",
    }
)
# Where a checkpoint's config keeps the changes accepted on earlier resumes.
CHANGES_KEY = "config_changes"
_NOT_RECORDED = "(not recorded)"


class ConfigChangedError(errors.UserError):
    """This run's settings differ from the checkpoint's in what they train."""


class StateChangedError(errors.UserError):
    """The checkpoint's state has other shapes than this run's: a setting changed them."""


class ResumeError(errors.UserError):
    """The checkpoint cannot be continued by this run (its input position has no meaning here)."""


@dataclasses.dataclass(frozen=True)
class Change:
    key: str  # "seed" or "<section>.<key>"
    saved: Any
    current: Any

    def describe(self) -> str:
        return f"{self.key} {_show(self.saved)} -> {_show(self.current)}"


def compare(saved: dict | None, settings) -> list[Change] | None:
    """The settings of ``settings`` that differ from ``saved`` (a checkpoint's config) and change
    what is trained, in key order; None when ``saved`` holds no comparable settings (a checkpoint
    written before they were recorded)."""
    if not isinstance(saved, dict) or "seed" not in saved or "train" not in saved:
        return None
    current = _plain(settings.to_dict())
    changes = []
    if saved.get("seed") != current["seed"]:
        changes.append(Change("seed", saved.get("seed"), current["seed"]))
    for section in TRAINING_SECTIONS:
        if section not in settings:
            continue
        now = current[section]
        then = saved.get(section) if isinstance(saved.get(section), dict) else {}
        defaults = _plain(type(settings.sections[section])().to_dict())
        for key in sorted(set(now) | set(then)):
            name = f"{section}.{key}"
            if name in FREE_KEYS:
                continue
            if key not in then:
                # A key added since the checkpoint was written: the old run had its default.
                if now.get(key) != defaults.get(key):
                    changes.append(Change(name, _NOT_RECORDED, now.get(key)))
            elif key not in now:
                changes.append(Change(name, then[key], "(no such key now)"))
            elif then[key] != now[key]:
                changes.append(Change(name, then[key], now[key]))
    return changes


def check(saved: dict | None, settings, *, step: int, where: str) -> tuple[list[Change], str]:
    """``(accepted changes, note)`` for resuming checkpoint ``step`` (in folder ``where``) whose
    config is ``saved``: no changes, or changes ``config.train.allow_config_change`` accepts, or
    ConfigChangedError listing them. The note says what was compared ("" when all is the same)."""
    changes = compare(saved, settings)
    if changes is None:
        return [], (
            f"checkpoint step {step} records no comparable settings (written before checkpoints "
            "recorded them): resuming without comparing them"
        )
    if not changes:
        return [], ""
    listed = _listed(changes)
    if not settings.train.allow_config_change:
        raise ConfigChangedError(
            f"checkpoint step {step} in {where} was trained with other settings (saved -> now): "
            f"{listed}. Resuming would mix two configurations in one run: restore those values, "
            "start afresh in another workdir, or accept the change and have it recorded with "
            "--config.train.allow_config_change=True"
        )
    return changes, (
        f"accepted by config.train.allow_config_change and recorded in metrics.jsonl and the "
        f"checkpoints: {listed}"
    )


def record(changes: list[Change], step: int) -> dict:
    """The JSON entry of changes accepted when resuming at ``step``."""
    return {"step": step, "changes": {c.key: [c.saved, c.current] for c in changes}}


def checkpoint_config(settings, history: list) -> dict:
    """What a checkpoint records of the run: its settings and the changes accepted so far."""
    return {**settings.to_dict(), CHANGES_KEY: list(history)}


def history(saved: dict | None) -> list:
    """The changes accepted on earlier resumes, as recorded in a checkpoint's config."""
    if isinstance(saved, dict) and isinstance(saved.get(CHANGES_KEY), list):
        return list(saved[CHANGES_KEY])
    return []


def state_changed(error, changes: list[Change] | None, *, allowed: bool) -> StateChangedError:
    """The error for a checkpoint whose state has other shapes (`checkpointing.StateMismatchError`
    ``error``), naming the settings that changed them rather than damage."""
    if changes:
        cause = f"the settings changed since it was written: {_listed(changes)}"
        if allowed:
            cause += " (config.train.allow_config_change cannot accept a change of shapes)"
    elif changes is None:
        cause = "it records no comparable settings; a model, method or queue setting changed?"
    else:
        cause = "no training setting changed; was it written by another version?"
    return StateChangedError(
        f"checkpoint step {error.step} in {error.directory} holds a state of other shapes than "
        f"this run's ({error.summary}): {cause}. It is not damaged: restore the saved values, or "
        "start afresh in another workdir"
    )


def position_changed(error: Exception, changes: list[Change], *, step: int) -> ResumeError:
    """The error for an input position this run cannot continue (another batch size, seed,
    method or dataset size; ``error`` is `pipeline.Position.start_batch`'s)."""
    accepted = f" (accepted changes: {_listed(changes)})" if changes else ""
    return ResumeError(
        f"checkpoint step {step} cannot be resumed by this run: {error}{accepted}; the saved "
        "input position (the next global batch) means other data here, which "
        "config.train.allow_config_change cannot accept: restore the saved value, or start "
        "afresh in another workdir"
    )


def _listed(changes: list[Change]) -> str:
    return "; ".join(change.describe() for change in changes)


def _plain(value):
    """JSON's view of a value: tuples as lists, as a checkpoint's config holds them."""
    return json.loads(json.dumps(value))


def _show(value) -> str:
    return value if value in (_NOT_RECORDED, "(no such key now)") else json.dumps(value)
