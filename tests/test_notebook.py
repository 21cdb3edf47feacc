"""notebooks/caco_jax_colab.ipynb: it runs top to bottom in a real kernel of this Python with tiny
settings and shows its figures and the probe, its encoder section embeds a GeoTIFF, maps the
change between two dates and exports the encoder for PyTorch, its install cell then does nothing
(elsewhere it asks for REPOSITORY or installs, a folder named caco_jax notwithstanding), its
default settings are configs/demo.py's, and the committed file carries no outputs."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import nbformat
import numpy as np
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
FIGURES = {"views": 1, "loss": 2, "change": 1, "map": 1, "probe": 1, "scene-change": 1}


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
    # The demo's curve: the land-cover kNN at every epoch end (the loss cell draws evals.png).
    knn = [r["eval/land_cover_knn/top1"] for r in epochs if "eval/land_cover_knn/top1" in r]
    assert len(knn) == TINY["EPOCHS"] and all(0.0 <= value <= 1.0 for value in knn)


def test_the_encoder_section_embeds_maps_and_exports(executed):
    """With the run's export: the before scene's tiles embedded and written as GeoParquet (the
    Encoder giving the first tile's row), a change map of the two dates as GeoTIFFs and GeoJSON on
    the same tiles, and the weights as a torchvision state dict with its JSON."""
    import rasterio
    from safetensors.numpy import load_file

    from caco_jax.data import layout
    from caco_jax.products import embed

    notebook, workdir = executed
    # The synthetic scenes' side over the tile size, the last tile ending at the edge.
    per_side = -(-layout.PIXELS_AT_RESOLUTION[10] // TINY["CROP_SIZE"])
    width = TINY["WIDTH"]
    embeddings = embed.Embeddings.read(workdir / "embeddings")
    assert embeddings.embeddings.shape == (per_side**2, 8 * width)  # ResNet-18: 8 x its width
    assert np.isfinite(embeddings.embeddings).all() and embeddings.footprints is not None
    printed = texts(cell(notebook, "embed"))
    assert f"{per_side**2} tiles x {8 * width} features" in printed
    assert float(re.search(r"max \|difference\| (\S+)", printed).group(1)) < 1e-5

    scene_change = workdir / "scene_change"
    with rasterio.open(scene_change / "change_ratio.tif") as ratio_tif:
        ratio = ratio_tif.read(1)
        assert ratio_tif.crs is not None
    with rasterio.open(scene_change / "changed.tif") as changed_tif:
        changed = changed_tif.read(1)
    assert ratio.shape == changed.shape == (per_side, per_side)
    assert np.isfinite(ratio).all() and set(np.unique(changed)) <= {0, 1}
    with open(scene_change / "change_map.geojson") as f:
        assert len(json.load(f)["features"]) == per_side**2
    summary = re.search(r"(\d+) of (\d+) tiles changed", texts(cell(notebook, "scene-change")))
    assert summary.groups() == (str(int(changed.sum())), str(per_side**2))

    state = load_file(workdir / "pytorch" / "encoder.safetensors")
    assert state["conv1.weight"].shape == (width, 3, 7, 7)
    assert state["layer4.1.bn2.weight"].shape == (8 * width,)
    with open(workdir / "pytorch" / "encoder.json") as f:
        sidecar = json.load(f)
    assert sidecar["image_size"] == TINY["CROP_SIZE"]
    assert sidecar["recipe"]["bands"] == ["B4", "B3", "B2"]


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


def run_install_cell(folder, repository: str = "", before: str = "", after: str = ""):
    """The install cell run by this Python in ``folder`` without the checkout on its path,
    REPOSITORY set to ``repository``, between the code ``before`` and ``after``, and pip replaced
    by a print of its command line."""
    source = cell(read_notebook(), "install").source
    assert source.count('REPOSITORY = ""') == 1
    source = source.replace('REPOSITORY = ""', f"REPOSITORY = {repository!r}")
    stub = "import json, subprocess\nsubprocess.run = lambda cmd, check: print(json.dumps(cmd))\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", "\n".join([stub, before, source, after])],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
    )


def pip_command(package: str) -> list[str]:
    # No CUDA plugin or libtpu in this environment: the plain JAX build.
    return [sys.executable, "-m", "pip", "install", "-q", package, "jax"]


def test_the_install_cell_asks_for_the_repository_or_installs_from_it(tmp_path):
    """Where caco_jax is not importable (no checkout on the path): without a repository the cell
    stops naming REPOSITORY; with a URL it runs pip on the package from git and this runtime's
    JAX, with a checkout's folder on that folder."""
    asked = run_install_cell(tmp_path)
    assert (asked.returncode, asked.stdout) == (1, "")
    assert asked.stderr.strip() == (
        "caco_jax is not installed: set REPOSITORY in this cell to the caco_jax git "
        "repository's URL or a checkout's folder"
    )

    installed = run_install_cell(tmp_path, "https://example.org/caco_jax")
    assert installed.returncode == 0, installed.stderr
    assert json.loads(installed.stdout) == pip_command(
        "caco_jax @ git+https://example.org/caco_jax"
    )

    (tmp_path / "checkout").mkdir()
    installed = run_install_cell(tmp_path, "checkout")
    assert installed.returncode == 0, installed.stderr
    assert json.loads(installed.stdout) == pip_command(str(tmp_path / "checkout"))


def test_the_install_cell_installs_over_a_folder_named_caco_jax(tmp_path):
    """A folder named caco_jax in the working directory that is not the package (a clone's top
    folder) imports as an empty namespace package: the cell names it and installs all the same,
    from a URL or from that folder, dropping the namespace package this session imported."""
    (tmp_path / "caco_jax").mkdir()
    note = f"({tmp_path / 'caco_jax'}: a folder without __init__.py, not the package)"
    asked = run_install_cell(tmp_path)
    assert (asked.returncode, asked.stdout) == (1, "")
    assert asked.stderr.strip() == (
        f"caco_jax is not installed {note}: set REPOSITORY in this cell to the caco_jax git "
        "repository's URL or a checkout's folder"
    )

    url = "https://example.org/caco_jax"
    (tmp_path / "caco_jax" / "sub").mkdir()
    imported = "import caco_jax.sub\nassert caco_jax.__file__ is None  # a namespace package"
    left = "print([m for m in sys.modules if m.split('.')[0] == 'caco_jax'])"
    installed = run_install_cell(tmp_path, url, before=imported, after=left)
    assert installed.returncode == 0, installed.stderr
    told, command, modules = installed.stdout.splitlines()
    assert told == f"caco_jax {note}: installing it from {url}"
    assert json.loads(command) == pip_command(f"caco_jax @ git+{url}")
    assert modules == "[]"

    installed = run_install_cell(tmp_path, "caco_jax")  # the clone itself
    assert installed.returncode == 0, installed.stderr
    assert json.loads(installed.stdout.splitlines()[-1]) == pip_command(str(tmp_path / "caco_jax"))


def test_the_committed_notebook_has_no_outputs():
    notebook = read_notebook()
    nbformat.validate(notebook)
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert code_cells
    for code_cell in code_cells:
        assert code_cell.outputs == [] and code_cell.execution_count is None, code_cell.id
    assert "widgets" not in notebook.metadata
    assert notebook.cells[1].get("id") == "install"
