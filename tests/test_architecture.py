"""The house: its wings and floors (docs/architecture.md), read from every import in the package,
function-level imports included. An import runs down a floor or stays inside its own wing; two
wings on one floor do not import each other; no two modules import each other, however far round.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "caco_jax")

# Wing -> floor (docs/architecture.md). A module belongs to the longest wing its name starts with.
FLOORS = {
    "caco_jax.settings": 0,
    "caco_jax.methods": 1,
    "caco_jax.runtime": 2,
    "caco_jax.data": 3,
    "caco_jax.sources": 4,
    "caco_jax.models": 4,
    "caco_jax.pretrain": 5,
    "caco_jax.evaluators": 6,
    "caco_jax.products": 6,
    "caco_jax.tasks": 7,
    "caco_jax.config": 8,
    "caco_jax.config_files": 8,  # the packaged configs, found by name
    "caco_jax.main": 9,
    "caco_jax": 9,  # the package itself: importing it registers the TFDS builder
}


def modules() -> dict[str, str]:
    """{dotted module name: file path} of every module of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def imports(path: str, known: set[str]) -> set[str]:
    """The package's modules that the file at ``path`` imports, anywhere in its code."""
    targets = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("caco_jax"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            targets |= {a.name for a in node.names if a.name.startswith("caco_jax")}
    return targets


def wing(module: str) -> str:
    return max((w for w in FLOORS if module == w or module.startswith(w + ".")), key=len)


def graph() -> dict[str, set[str]]:
    found = modules()
    return {m: imports(path, set(found)) - {m} for m, path in found.items()}


def test_every_module_has_a_floor():
    assert all(wing(module) for module in modules())


def test_imports_run_down_or_stay_in_their_wing():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            here, there = wing(module), wing(target)
            if here == there or FLOORS[there] < FLOORS[here]:
                continue
            wrong.append(f"{module} (floor {FLOORS[here]}) -> {target} (floor {FLOORS[there]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle():
    edges = graph()
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not cycles, cycles
