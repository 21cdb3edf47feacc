"""Typed settings: one frozen dataclass per config section, owned by the module that reads it.

Config files build an `ml_collections.ConfigDict` (`caco_jax.config.for_tasks`), which is what the
command line overrides (``--config.<section>.<key>=<value>``). `caco_jax.config.resolve` turns
each section into its `Section` dataclass, whose ``__post_init__`` checks the values and names a
bad one as ``config.<section>.<key>``, and returns them together as `Settings`. From there on a
component takes its own section (``make_views(..., settings=settings.augment)``), never the
ConfigDict. The defaults of a section are the fields of its dataclass and exist nowhere else.

No JAX and no ml_collections here: a bare accelerator image builds settings from the dataclasses
alone (benchmarks/device_check.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar


class SettingsError(ValueError):
    """A config value that cannot work; the message names ``config.<section>.<key>``."""


def _frozen(value):
    """Lists (from JSON or a config file) as tuples, recursively: settings are hashable."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class Section:
    """Base of the settings dataclasses. A subclass names its config section in ``SECTION`` and
    checks its values in `validate` with `require`."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list | tuple):
                object.__setattr__(self, field.name, _frozen(value))
        self.validate()

    def validate(self) -> None:
        """Raises SettingsError (through `require`) for a value that cannot work."""

    def require(self, ok: bool, key: str, requirement: str) -> None:
        if not ok:
            where = f"config.{self.SECTION}.{key}" if self.SECTION else key
            raise SettingsError(f"{where}: {requirement}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]):
        """The section from a mapping of its keys (a ConfigDict section, JSON); a key the section
        does not have is an error naming it."""
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SettingsError(
                f"config.{cls.SECTION}: unknown key(s) {unknown}; the section has {known}"
            )
        return cls(**{key: values[key] for key in values})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Settings:
    """A resolved config: the tasks to run, the seed of every random choice, and the `Section` of
    each config section the tasks read, as attributes (``settings.train.batch_size``)."""

    tasks: tuple[str, ...] = ()
    seed: int = 0
    sections: Mapping[str, Section] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "sections", dict(self.sections))

    def __getattr__(self, name: str) -> Section:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(
            f"these settings have no section {name!r} (they hold {sorted(sections)})"
        )

    def __contains__(self, name: str) -> bool:
        return name in self.sections

    def replace(self, **changes) -> Settings:
        """A copy with changes: ``seed=...``, ``tasks=...``, or per section a `Section` (added or
        replacing it) or a dict of its keys to change (checked like any value):
        ``settings.replace(train={"max_steps": 1})``."""
        top = {key: changes.pop(key) for key in ("tasks", "seed") if key in changes}
        sections = dict(self.sections)
        for name, change in changes.items():
            if isinstance(change, Section):
                sections[name] = change
            elif name in sections:
                sections[name] = sections[name].replace(**change)
            else:
                raise SettingsError(f"config.{name}: these settings have no such section")
        return dataclasses.replace(self, sections=sections, **top)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: what a checkpoint records of the run."""
        return {
            "tasks": list(self.tasks),
            "seed": self.seed,
            **{name: section.to_dict() for name, section in self.sections.items()},
        }
