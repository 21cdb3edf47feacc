"""benchmarks/device_check.py: its --smoke run on a machine that has only JAX, Flax, Optax and numpy
(the data, checkpoint and plotting packages blocked), its config, and the official PyTorch step."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

# What the GPU machine lacks. Flax and Optax import absl and etils themselves, so those are there;
# etils.epath (which caco_jax uses for exports) needs extra packages, so it is blocked.
BLOCKED = (
    "tensorflow_datasets",
    "tensorflow",
    "grain",
    "rasterio",
    "ml_collections",
    "dm_pix",
    "orbax",
    "etils.epath",
    "matplotlib",
    "tensorboardX",
    "tqdm",
    "sklearn",
)

RUN_BLOCKED = """
import runpy, sys

BLOCKED = {blocked!r}


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"{{name}} is blocked", name=name)
        return None


sys.meta_path.insert(0, Blocker())
sys.argv = ["device_check.py", *{argv!r}]
runpy.run_path("benchmarks/device_check.py", run_name="__main__")
loaded = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
print("blocked modules loaded:", loaded)
"""


def test_smoke_run_writes_every_row_without_the_data_and_checkpoint_packages(tmp_path):
    out = tmp_path / "rows.jsonl"
    argv = ["--smoke", "--out", str(out), "--peak_tflops", "2"]
    script = RUN_BLOCKED.format(blocked=BLOCKED, argv=argv)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "blocked modules loaded: []" in result.stdout

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["row"] for row in rows] == ["machine", "caco_jax", "supervised", "torch"]
    machine, caco, supervised, torch_row = rows
    assert (machine["batch"], machine["crop"], machine["platform"]) == (4, 32, "cpu")
    for row in (caco, supervised):
        assert (row["depth"], row["dtype"]) == (18, "float32")
        assert row["step_time_s"] > 0 and row["xla_tflop_per_step"] > 0
        assert row["samples_per_s"] == pytest.approx(4 / row["step_time_s"])
        assert row["mfu"] == pytest.approx(row["model_tflop_per_step"] / row["step_time_s"] / 2)
    # The same encoder FLOPs per item, 7 forward-equivalents per CACo item against 3.
    assert caco["model_tflop_per_step"] / supervised["model_tflop_per_step"] == pytest.approx(7 / 3)
    assert supervised["ratio"] == pytest.approx(caco["step_time_s"] / supervised["step_time_s"])
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert torch_row["skipped"] in ("torch is not installed", "torchvision is not installed")
    else:
        assert torch_row["ratio"] == pytest.approx(torch_row["step_time_s"] / caco["step_time_s"])
    # Each row was printed as a table line too.
    assert result.stdout.count(" R18 ") == 3


def test_peak_follows_the_precision_and_the_override():
    import device_check

    assert device_check.peak_for("NVIDIA H200", "bfloat16", None) == 989.0
    assert device_check.peak_for("NVIDIA H100 80GB HBM3", "float32", None) == 494.0
    assert device_check.peak_for("NVIDIA A100-SXM4-80GB", "float32", None) == 156.0
    assert device_check.peak_for("cpu", "float32", None) is None
    assert device_check.peak_for("cpu", "float32", (100.0, 50.0)) == 50.0
    assert device_check.peak_for("NVIDIA H200", "float32", (7.0,)) == 7.0


def official_model(torch, batch, queue):
    import official_caco_torch as official

    class TinyResNet(torch.nn.Module):
        """conv, BatchNorm, ReLU, pooling, then ``fc`` last, as a torchvision ResNet orders them."""

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.relu = torch.nn.ReLU()
            self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
            self.fc = torch.nn.Linear(8, 128)

    torch.manual_seed(0)
    return official, official.OfficialCaco(
        TinyResNet, 8, num_items=batch, emb_dim=4, num_negatives=queue
    )


def test_official_step_builds_the_official_logits_and_updates_queue_ema_and_change():
    torch = pytest.importorskip("torch")
    batch, queue = 4, 8
    official, model = official_model(torch, batch, queue)
    img_q, img_k, mmweights, inds = official.random_batch(batch, 8, "cpu")
    assert mmweights.tolist() == [0, 0, 1, 1]  # the first location changed

    logits, targets = model(img_q, img_k, mmweights, inds)
    # Per window: half the queue (4), then for subspaces 1 and 2 both other subspaces' keys (2 x 4),
    # then the other window's items (2), after the positive.
    assert [tuple(out.shape) for out in logits] == [(4, 7), (4, 15), (4, 15)]
    assert targets.tolist() == [0, 0, 0, 0]
    for out in logits:
        # Rows are window 0's items (0, 2) then window 1's (1, 3). Item 0 and 1 belong to the
        # changed location: their partner's logit (the first partner column) is pushed down.
        partner = out.shape[1] - 2
        assert out[0, partner] < -1e8 and out[2, partner] < -1e8
        assert out.dtype == torch.float64  # the official float64 weight matrix promotes them
        assert torch.all(out[[1, 3], partner] > -1 / 0.07 - 1e-3)
        assert torch.all(out[1].abs() <= 1 / 0.07 + 1e-3)
    assert model.queue_ptr.flatten().tolist() == [batch % queue] * 3
    assert model.change_counts.tolist() == [1.0] * batch
    assert np.all(model.change_values[:, 2] >= 0)

    optimizer = model.optimizer()
    key_before = next(model.encoder_k.parameters()).detach().clone()
    query_before = next(model.encoder_q.parameters()).detach().clone()
    loss, accuracies = official.training_step(model, optimizer, (img_q, img_k, mmweights, inds))
    assert torch.isfinite(loss) and len(accuracies) == 3
    query_after = next(model.encoder_q.parameters()).detach().clone()
    assert not torch.equal(query_after, query_before)  # SGD moved the query encoder
    official.training_step(model, optimizer, (img_q, img_k, mmweights, inds))
    # The second forward's EMA: key = 0.999 key + 0.001 query (after the first update).
    expected = key_before * 0.999 + query_after * 0.001
    torch.testing.assert_close(next(model.encoder_k.parameters()).detach(), expected)
