"""pyproject.toml's ranges admit the tested lock files, and the package installs and runs alone."""

import ast
import os
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each group of pyproject.toml and the lock file that pins it (its own lines, not its `-r` ones).
LOCKS = {
    "dependencies": "requirements.txt",
    "torch": "requirements-torch.txt",
    "earthengine": "requirements-earthengine.txt",
    "cloud": "requirements-cloud.txt",
    "notebook": "requirements-notebook.txt",
    "sampling": "requirements-sampling.txt",
    "dev": "requirements-dev.txt",
}


def project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def ranges(group: str) -> dict[str, Requirement]:
    meta = project()
    if group == "dependencies":
        lines = meta["dependencies"]
    else:
        lines = meta["optional-dependencies"][group]
    requirements = [Requirement(line) for line in lines]
    # `caco_jax[torch]` stands for another group, as `-r requirements-torch.txt` does in the lock.
    return {canonicalize_name(r.name): r for r in requirements if r.name != meta["name"]}


def pins(lock: str) -> dict[str, Version]:
    pinned = {}
    with open(os.path.join(ROOT, lock)) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if not line or line.startswith("-r"):
                continue
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"{lock}: {line!r} is not an exact pin"
            pinned[canonicalize_name(requirement.name)] = Version(specifier.version)
    return pinned


@pytest.mark.parametrize("group", sorted(LOCKS))
def test_every_locked_version_lies_in_its_range_and_the_package_sets_match(group):
    declared, locked = ranges(group), pins(LOCKS[group])
    assert set(declared) == set(locked), (
        f"only in pyproject: {sorted(set(declared) - set(locked))}, "
        f"only in {LOCKS[group]}: {sorted(set(locked) - set(declared))}"
    )
    for name, requirement in declared.items():
        assert requirement.specifier, f"{name} has no range in pyproject.toml"
        assert not any(s.operator == "==" for s in requirement.specifier), (
            f"{name} is pinned in pyproject.toml; give a range"
        )
        assert requirement.specifier.contains(locked[name]), (
            f"{LOCKS[group]} pins {name}=={locked[name]}, outside {requirement.specifier}"
        )


def test_the_core_names_every_third_party_module_the_package_imports():
    """Each top-level import of caco_jax resolves to the standard library, caco_jax, or a core
    dependency (torch and ee only inside the functions of their optional tasks)."""
    provided_by = {  # import name -> distribution, where they differ
        "sklearn": "scikit-learn",
        "PIL": "pillow",
        "pix": "dm-pix",
        "dm_pix": "dm-pix",
        "orbax": "orbax-checkpoint",
        "tensorflow_datasets": "tensorflow-datasets",
        "array_record": "array-record",
        "absl": "absl-py",
        "ml_collections": "ml-collections",
        "importlib_resources": "importlib-resources",
        "tensorboardX": "tensorboardx",
    }
    core = set(ranges("dependencies"))
    imported = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "caco_jax")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    statements = ast.parse(f.read()).body
                for statement in statements:
                    if isinstance(statement, ast.Import):
                        imported |= {alias.name.split(".")[0] for alias in statement.names}
                    elif isinstance(statement, ast.ImportFrom) and statement.level == 0:
                        imported.add(statement.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"caco_jax", "__future__"}
    missing = {
        module
        for module in third_party
        if canonicalize_name(provided_by.get(module, module)) not in core
    }
    assert not missing, f"imported at module level but not a core dependency: {sorted(missing)}"


def test_the_license_is_apache_2():
    assert project()["license"] == "Apache-2.0"
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_the_installed_package_runs_without_the_checkout(tmp_path):
    """`pip install --no-deps` of a copy of the checkout (so that the build leaves no files in it),
    then the `caco-jax` command from another folder: it imports the installed caco_jax, finds the
    packaged configs by name, lists them in its help, and stops on a bad config override with the
    one-line message."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    shutil.copytree(
        os.path.join(ROOT, "caco_jax"),
        source / "caco_jax",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    target = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    assert (target / "caco_jax" / "main.py").exists()
    assert (target / "caco_jax" / "configs" / "demo.py").exists()
    assert (target / "caco_jax" / "sources" / "synthetic" / "cities.npz").exists()
    assert not (target / "configs").exists() and not (target / "tests").exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [
            str(target / "bin" / "caco-jax"),
            "--config",
            "smoke",
            "--config.train.bogus=1",
            "--workdir",
            str(elsewhere / "w"),
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == "caco-jax: --config.train.bogus: the config has no key 'bogus'\n", (
        result.stderr[-2000:]
    )
    helped = subprocess.run(
        [str(target / "bin" / "caco-jax"), "--help"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0, helped.stderr[-2000:]
    for listed in ("  demo ", "  pretrain[:caco,r18,100k] ", "  eval_oscd ", "  r18_100k_caco "):
        assert listed in helped.stdout, helped.stdout
    located = subprocess.run(
        [sys.executable, "-c", "import caco_jax; print(caco_jax.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert located.stdout.strip() == str(target / "caco_jax" / "__init__.py"), located.stderr
