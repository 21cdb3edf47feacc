"""notebooks/caco_jax_colab.ipynb: it runs top to bottom in a real kernel of this Python with tiny
settings and shows its figures and the probe, its install cell then does nothing, its default
settings are configs/demo.py's, and the committed file carries no outputs."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import nbformat
import pytest
from helpers import xla_flags
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "caco_jax_colab.ipynb")

# tests/helpers.py's tiny network and crops; 16 locations = 2 steps of 8 per epoch (and the
# land-cover probe one batch of 32 training images: 8 locations x 5 early acquisitions).
TINY = {"NUM_LOCATIONS": 16, "CROP_SIZE": 32, "WIDTH": 8, "BATCH_SIZE": 16, "EPOCHS": 2}
# Cells that draw, by id, and how many PNGs each shows.
FIGURES = {"views": 1, "loss": 1, "change": 1, "map": 1, "probe": 1}


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def cell(notebook, cell_id):
    (found,) = [c for c in notebook.cells if c.get("id") == cell_id]
    return found


def kernel_of_this_python(tmp_path) -> KernelManager:
    """A kernel spec that starts ipykernel with sys.executable, whatever kernels are installed."""
    folder = tmp_path / "kernels" / "caco-jax-test"
    folder.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "caco_jax test",
        "language": "python",
    }
    (folder / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="caco-jax-test", kernel_spec_manager=specs)


def kernel_environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    # One CPU device, as a CPU runtime has (conftest.py simulates 8 for the other tests, and its
    # compile flags and cache are kept), and the kernel's own inline figures (ipykernel's default
    # when MPLBACKEND is unset).
    env["XLA_FLAGS"] = xla_flags(1)
    env.pop("MPLBACKEND", None)
    # Should the install cell run pip after all, it fails here instead of reaching the network.
    env["PIP_NO_INDEX"] = "1"
    env["GIT_ALLOW_PROTOCOL"] = "file"
    return env


def texts(code_cell, stream="stdout") -> str:
    return "".join(
        o.get("text", "")
        for o in code_cell.outputs
        if o.output_type == "stream" and o.name == stream
    )


def pngs(code_cell) -> int:
    return sum(
        "image/png" in o.get("data", {})
        for o in code_cell.outputs
        if o.output_type in ("display_data", "execute_result")
    )


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook run with TINY injected after its `parameters` cell (as papermill does), and a
    last cell reporting the kernel's Python and caco_jax."""
    tmp_path = tmp_path_factory.mktemp("notebook")
    notebook = read_notebook()
    position = notebook.cells.index(cell(notebook, "parameters")) + 1
    injected = nbformat.v4.new_code_cell(
        "\n".join(f"{name} = {value!r}" for name, value in TINY.items()),
        id="injected-parameters",
        metadata={"tags": ["injected-parameters"]},
    )
    notebook.cells.insert(position, injected)
    notebook.cells.append(
        nbformat.v4.new_code_cell(
            "import caco_jax\nprint(sys.executable)\nprint(caco_jax.__file__)", id="which-python"
        )
    )
    workdir = tmp_path / "run"
    workdir.mkdir()
    client = NotebookClient(
        notebook,
        km=kernel_of_this_python(tmp_path),
        timeout=600,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(env=kernel_environment())  # raises CellExecutionError naming a failed cell
    return notebook, workdir / "caco_demo"


def test_every_cell_ran_in_this_python_and_the_install_cell_did_nothing(executed):
    notebook, _ = executed
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code_cells)
    assert not [o for c in code_cells for o in c.outputs if o.output_type == "error"]
    assert cell(notebook, "install").outputs == []
    assert texts(cell(notebook, "which-python")).splitlines() == [
        sys.executable,
        os.path.join(ROOT, "caco_jax", "__init__.py"),
    ]
    assert "devices: [CpuDevice(id=0)]" in texts(cell(notebook, "config"))


def test_the_figures_and_the_probe_are_shown(executed):
    notebook, workdir = executed
    for cell_id, count in FIGURES.items():
        assert pngs(cell(notebook, cell_id)) == count, cell_id
    assert f"{TINY['NUM_LOCATIONS']} locations," in texts(cell(notebook, "data"))
    assert "agreement with the ground truth" in texts(cell(notebook, "change"))
    printed = texts(cell(notebook, "probe"))
    top1 = dict(re.findall(r"^\s*(\w+): top-1 ([\d.]+) %", printed, flags=re.MULTILINE))
    assert set(top1) == {"checkpoint", "random", "chance"}, printed
    assert all(0.0 <= float(value) <= 100.0 for value in top1.values())
    with open(workdir / "encoder_eval_land_cover.json") as f:
        rows = {row["encoder"]: row["top1"] for row in json.load(f)["rows"]}
    assert float(top1["random"]) == pytest.approx(100 * rows["random"], abs=0.05)
    epochs = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert sum("epoch/loss" in record for record in epochs) == TINY["EPOCHS"]


def test_the_default_settings_are_the_demo_config():
    """The parameters and config cells, run here, build configs/demo.py's config (the notebook
    only adds change_map.overwrite, so that its cell can be run again)."""
    from absl import logging

    notebook = read_notebook()
    spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "configs", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    expected = demo.get_config()
    expected.change_map.overwrite = True
    namespace = {}
    verbosity = logging.get_verbosity()
    try:
        for cell_id in ("parameters", "config"):
            exec(cell(notebook, cell_id).source, namespace)
    finally:
        logging.set_verbosity(verbosity)
    assert namespace["config"].to_dict() == expected.to_dict()


def test_the_install_cell_asks_for_the_repository_or_installs_from_it(tmp_path):
    """Where caco_jax is not importable (no checkout on the path): without a repository URL the
    cell stops naming REPOSITORY; with one it runs pip on the package and this runtime's JAX."""
    source = cell(read_notebook(), "install").source
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = lambda code: subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    asked = run(source)
    assert asked.returncode == 1
    assert asked.stderr.strip() == (
        "caco_jax is not installed: set REPOSITORY to its repository's URL"
    )

    stub = "import json, subprocess\nsubprocess.run = lambda cmd, check: print(json.dumps(cmd))\n"
    with_url = source.replace('REPOSITORY = ""', 'REPOSITORY = "https://example.org/caco_jax"')
    assert with_url != source
    installed = run(stub + with_url)
    assert installed.returncode == 0, installed.stderr
    # No CUDA plugin or libtpu in this environment: the plain JAX build.
    assert json.loads(installed.stdout) == [
        sys.executable, "-m", "pip", "install", "-q",
        "caco_jax @ git+https://example.org/caco_jax", "jax",
    ]  # fmt: skip


def test_the_committed_notebook_has_no_outputs():
    notebook = read_notebook()
    nbformat.validate(notebook)
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert code_cells
    for code_cell in code_cells:
        assert code_cell.outputs == [] and code_cell.execution_count is None, code_cell.id
    assert "widgets" not in notebook.metadata
    assert notebook.cells[1].get("id") == "install"
