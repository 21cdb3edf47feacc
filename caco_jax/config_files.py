"""Config files by name or by path, and the command line's help.

The configs live in the repository's top-level `configs/` folder, their one source; the installed
package holds the same files as `caco_jax.configs` (in a checkout, `caco_jax/configs` links to
`configs/`). `--config demo` and `--config pretrain:caco,r18,100k` name one of them (big_vision's
`:arg` selects a variant); anything else is a path, as before (`--config configs/demo.py`,
`--config my_config.py:arg`).

`usage()` is what `caco-jax --help` prints: the configs, the tasks and the official encoders, one
line each, read without importing JAX (config files are read as text, for their docstrings).
"""

from __future__ import annotations

import ast
import os

PACKAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def names() -> list[str]:
    """The packaged configs, by name."""
    return sorted(
        name[:-3]
        for name in os.listdir(PACKAGED)
        if name.endswith(".py") and not name.startswith("_")
    )


def resolve_path(value: str) -> str:
    """A ``--config`` value as the path absl reads: a packaged config's name (``demo``,
    ``pretrain:caco,r18,100k``) becomes its file's path; a path stays as it is."""
    name, colon, arg = value.partition(":")
    if os.sep in name or name.endswith(".py") or os.path.exists(name):
        return value
    if name in names():
        return os.path.join(PACKAGED, f"{name}.py") + colon + arg
    return value  # not a name: absl names the missing file


def summary(path: str) -> str:
    """The first sentence of a config file's docstring."""
    with open(path) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    sentence = paragraph.split(". ")[0]
    return sentence.rstrip(".")


def arg_spec(path: str) -> str:
    """``[:<default>]`` (or ``[:ARG]``) for a config whose ``get_config`` takes an argument."""
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "get_config" and node.args.args:
            defaults = node.args.defaults
            default = (
                defaults[-1].value if defaults and isinstance(defaults[-1], ast.Constant) else None
            )
            return f"[:{default}]" if isinstance(default, str) else "[:ARG]"
    return ""


def usage(program: str = "caco-jax") -> str:
    """The command line's help: how to run, the packaged configs, the tasks, the encoders."""
    from caco_jax import tasks
    from caco_jax.models import registry

    lines = [
        f"{program}: runs the tasks a config lists (CACo pretraining, evaluation, encoders).",
        "",
        f"  {program} --config demo                      the embedded demo, on a CPU",
        f"  {program} --config pretrain:caco,r18,100k --config.data.archive=DIR --workdir W",
        f"  {program} --config NAME_OR_FILE.py[:ARG] [--config.SECTION.KEY=VALUE ...] "
        "[--workdir W]",
        f"  {program} --config demo --print_config       the resolved config, then exit",
        "",
        "Configs (configs/, by name or by path):",
    ]
    for name in names():
        path = os.path.join(PACKAGED, f"{name}.py")
        lines.append(_row(name + arg_spec(path), summary(path)))
    lines += ["", "Tasks (config.tasks; docs/architecture.md):"]
    lines += [_row(name, task.summary) for name, task in tasks.TASKS.items()]
    lines += ["", "Official encoders (--config.pretrained.name, --config.embed.encoder):"]
    lines += [_row(name, c.describe()) for name, c in registry.CHECKPOINTS.items()]
    lines += [
        "",
        "Flags: --config, --workdir (default workdir/<config name>), --print_config; several "
        "processes: --multihost or --coordinator_address, --num_processes, --process_id, "
        "--peer_timeout_seconds (docs/running.md). --helpfull lists absl's flags too.",
    ]
    return "\n".join(lines)


def _row(name: str, text: str, width: int = 30) -> str:
    return f"  {name:<{width}} {text}" if len(name) < width else f"  {name}\n  {'':<{width}} {text}"
