r"""One command for a GPU machine: CACo step throughput and MFU, against a supervised step and the
official PyTorch step, in one run.

  python benchmarks/device_check.py --out results.jsonl
  python benchmarks/device_check.py --smoke --out /tmp/smoke.jsonl     # CPU, tiny, seconds

Needs only jax, flax, optax and numpy (torch and torchvision for the PyTorch rows, skipped with a
note where absent): no tensorflow-datasets, grain, rasterio, ml_collections, dm-pix, orbax, etils,
matplotlib or tensorboardX. For each ResNet depth and precision (default ResNet-18 and -50, batch
256, 224x224, float32 and bfloat16) it measures, one row at a time, each written to --out (JSONL)
and printed as soon as it is measured:

  caco_jax    the CACo pretraining step of `caco_jax.pretrain.train.setup` (augmentation of four
              views, four key-encoder forwards, one query forward and backward, queue, EMA,
              SGD), one device
  supervised  ResNet + linear head, cross-entropy, SGD with momentum: one forward and backward;
              the row gives the ratio CACo / supervised
  torch       the official CACo step (benchmarks/official_caco_torch.py) with a torchvision
              ResNet on the same GPU; the row gives the ratio torch / caco_jax step time

MFU counts the model's work: the encoder's forward FLOPs per image (XLA's cost analysis of the
lowered forward) x 7 per CACo item (four key forwards, a query forward and its backward at about
twice a forward) or x 3 per supervised item; heads, the queue's logits and the augmentation are
under 2 % and left out. It is measured against the peak of the precision used: TF32 for float32
(XLA's and, set here, PyTorch's default for float32 matmuls and convolutions on these GPUs),
bfloat16 for bfloat16 (`--peak_tflops` overrides the table). XLA's own FLOP count of the whole
compiled step is reported next to it (``xla_tflop_per_step``, ``xla_flops_utilisation``).

Rows run until --budget_s (default 270 s) has passed; the rest are written as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import types

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory to PyTorch

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense peak TFLOPS (bfloat16, TF32) by device name, SXM parts unless named; the first match wins.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.0, 494.0),
    ("H200", 989.0, 494.0),
    ("A100", 312.0, 156.0),
)


def import_caco_jax():
    """caco_jax's pretraining (`train.setup`), mesh and ResNet modules, and its settings types,
    without the package initialiser.

    ``caco_jax/__init__.py`` registers the TFDS builder (it imports tensorflow-datasets); building
    and running a step needs none of that, so the package is entered as a bare folder. Where
    caco_jax is already imported (with all its dependencies) that import is used as it is.
    """
    if "caco_jax" not in sys.modules:
        package = types.ModuleType("caco_jax")
        package.__path__ = [os.path.join(ROOT, "caco_jax")]
        sys.modules["caco_jax"] = package
    from caco_jax.models.resnet import ResNet
    from caco_jax.pretrain import train
    from caco_jax.runtime import mesh

    return train, mesh, ResNet


def make_settings(depth: int, batch: int, crop: int, dtype: str, num_negatives: int):
    """The settings `train.setup` reads: every section's defaults (the official pretraining),
    built from the settings dataclasses themselves (no ml_collections), with this row's sizes."""
    from caco_jax.methods import MethodSettings
    from caco_jax.pretrain.augment import AugmentSettings
    from caco_jax.pretrain.change import ChangeSettings
    from caco_jax.pretrain.state import ModelSettings
    from caco_jax.pretrain.train import TrainSettings
    from caco_jax.settings import Settings

    return Settings(
        seed=0,
        sections=dict(
            model=ModelSettings(depth=depth, compute_dtype=dtype),
            method=MethodSettings(num_negatives=num_negatives),
            change=ChangeSettings(),
            train=TrainSettings(batch_size=batch),
            augment=AugmentSettings(crop_size=crop),
        ),
    )


def cost_flops(stage) -> float | None:
    """XLA's FLOP count of a lowered or compiled program (None where the backend gives none)."""
    analysis = stage.cost_analysis()
    if isinstance(analysis, list | tuple):  # one entry per program in older JAX versions
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def encoder_forward_flops(resnet_cls, depth: int, crop: int, dtype) -> float:
    """FLOPs of one image through the encoder: XLA's count of a forward of 8 images, over 8.

    Counted on the lowered program (shapes only: nothing is initialised or compiled).
    """
    encoder = nnx.eval_shape(lambda: resnet_cls(depth, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(encoder)
    images = jax.ShapeDtypeStruct((8, crop, crop, 3), dtype)

    def forward(state, images):
        return nnx.merge(graphdef, state)(images)

    return cost_flops(jax.jit(forward).lower(state, images)) / 8


def timed(call, args, sync) -> float:
    """Seconds per call over ``args.steps`` calls, after ``args.warmup`` untimed ones."""
    for _ in range(args.warmup):
        sync(call())
    steps = args.steps
    start = time.perf_counter()
    for _ in range(steps):
        result = call()
    sync(result)
    return (time.perf_counter() - start) / steps


def caco_jax_row(modules, args, depth, dtype) -> dict:
    train, mesh_lib, _ = modules
    settings = make_settings(depth, args.batch, args.crop, dtype, args.queue)
    mesh = mesh_lib.data_mesh(jax.devices()[:1])
    run = train.setup(settings, args.batch // 2, mesh=mesh)
    rng = np.random.default_rng(0)
    local = {
        "images": rng.integers(0, 256, (args.batch, 3, args.crop, args.crop, 3), dtype=np.uint8),
        "item_id": np.arange(args.batch, dtype=np.int32),
        "window": (np.arange(args.batch) % 2).astype(np.int32),
        "location_index": (np.arange(args.batch) // 2).astype(np.int32),
    }
    batch = mesh_lib.global_batch(local, mesh)
    state = [mesh_lib.replicate(run.initial_state, mesh)]
    start = time.perf_counter()
    compiled = run.train_step.lower(state[0], batch).compile()
    compile_s = time.perf_counter() - start

    def one():
        state[0], metrics = compiled(state[0], batch)
        return metrics

    seconds = timed(one, args, jax.block_until_ready)
    return {"step_time_s": seconds, "compile_s": compile_s, "xla_flops": cost_flops(compiled)}


def supervised_row(modules, args, depth, dtype) -> dict:
    _, _, resnet_cls = modules
    compute = jnp.dtype(dtype)
    encoder = resnet_cls(depth, rngs=nnx.Rngs(0), dtype=compute)
    classifier = nnx.Linear(encoder.feature_dim, 10, rngs=nnx.Rngs(1), dtype=compute)
    graphdef, params, stats = nnx.split((encoder, classifier), nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    optimizer = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.03, momentum=0.9))

    def step(params, stats, opt_state, images, labels):
        def loss_fn(params):
            encoder, classifier = nnx.merge(graphdef, params, stats)
            logits = classifier(encoder(images)).astype(jnp.float32)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, nnx.to_pure_dict(nnx.state((encoder, classifier), nnx.BatchStat))

        grads, new_stats = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state

    images = jax.random.normal(jax.random.key(0), (args.batch, args.crop, args.crop, 3), compute)
    labels = jnp.arange(args.batch) % 10
    carry = [params, stats, optimizer.init(params)]
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*carry, images, labels).compile()
    compile_s = time.perf_counter() - start

    def one():
        carry[:] = compiled(*carry, images, labels)
        return carry[0]

    seconds = timed(one, args, jax.block_until_ready)
    return {"step_time_s": seconds, "compile_s": compile_s, "xla_flops": cost_flops(compiled)}


def torch_row(modules, args, depth, dtype) -> dict:
    """The official step in PyTorch; ``{"skipped": why}`` without torch or torchvision."""
    del modules  # the PyTorch step uses nothing of caco_jax
    try:
        import torch
        import torchvision
    except ImportError as error:
        return {"skipped": f"{error.name} is not installed"}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import official_caco_torch as official

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Like XLA's default for float32 on these GPUs: TF32 matmuls and convolutions.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    make_resnet = getattr(torchvision.models, f"resnet{depth}")
    model = official.OfficialCaco(
        lambda: make_resnet(num_classes=128),
        512 if depth < 50 else 2048,
        num_items=args.batch,
        num_negatives=args.queue,
    ).to(device)
    optimizer = model.optimizer()
    batch = official.random_batch(args.batch, args.crop, device)
    autocast = torch.bfloat16 if dtype == "bfloat16" else None

    def sync(_):
        if device.type == "cuda":
            torch.cuda.synchronize()

    seconds = timed(lambda: official.training_step(model, optimizer, batch, autocast), args, sync)
    return {"step_time_s": seconds, "torch": torch.__version__}


# (row, forward-equivalents of encoder work per item, how it is measured), in the order run.
ROWS = (("caco_jax", 7, caco_jax_row), ("supervised", 3, supervised_row), ("torch", 7, torch_row))


def peak_for(device_kind: str, dtype: str, override) -> float | None:
    """Peak TFLOPS of the precision used: bfloat16, or TF32 for float32."""
    if override is not None:
        return override[0] if dtype == "bfloat16" or len(override) == 1 else override[1]
    for name, bf16, tf32 in PEAK_TFLOPS:
        if name in device_kind:
            return bf16 if dtype == "bfloat16" else tf32
    return None


def parse_peaks(text: str) -> tuple[float, ...]:
    """``989`` (every precision) or ``989,494`` (bfloat16, TF32)."""
    try:
        peaks = tuple(float(part) for part in text.split(","))
    except ValueError:
        peaks = ()
    if not 1 <= len(peaks) <= 2 or min(peaks) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BF16 or BF16,TF32 in TFLOPS, > 0")
    return peaks


class Report:
    """Writes each row to the JSONL file and prints it as a table line, as soon as it comes."""

    COLUMNS = ("row", "depth", "dtype", "samples_per_s", "step_ms", "mfu", "ratio", "note")

    def __init__(self, path: str):
        self._file = open(path, "w")
        print("  ".join(f"{c:>13}" for c in self.COLUMNS), flush=True)

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if row["row"] == "machine":
            print(f"machine: {row['device_kind']} ({row['platform']}), jax {row['jax']}")
            return
        step_ms = row.get("step_time_s") and row["step_time_s"] * 1e3
        cells = {
            "row": row["row"],
            "depth": f"R{row['depth']}",
            "dtype": row["dtype"],
            "samples_per_s": _number(row.get("samples_per_s"), "{:.1f}"),
            "step_ms": _number(step_ms, "{:.1f}"),
            "mfu": _number(row.get("mfu"), "{:.1%}"),
            "ratio": _number(row.get("ratio"), "{:.2f}"),
            "note": row.get("ratio_of") or row.get("skipped") or row.get("error", ""),
        }
        print("  ".join(f"{cells[c]:>13}" for c in self.COLUMNS), flush=True)

    def close(self) -> None:
        self._file.close()


def _number(value, form: str) -> str:
    return "-" if value is None else form.format(value)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="device_check.jsonl", help="JSONL file of the rows")
    parser.add_argument("--smoke", action="store_true", help="ResNet-18, batch 4, 32x32, 1 step")
    parser.add_argument("--depths", default="18,50")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--queue", type=int, default=16384, help="keys per subspace (official)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--peak_tflops", type=parse_peaks, default=None)
    parser.add_argument("--budget_s", type=float, default=270.0)
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch rows")
    args = parser.parse_args(argv)
    if args.smoke:
        args.depths, args.dtypes, args.batch, args.crop = "18", "float32", 4, 32
        args.queue, args.steps, args.warmup = 16, 1, 0
        # Its timings mean nothing: compile as fast as XLA can instead.
        jax.config.update("jax_disable_most_optimizations", True)
    depths = [int(d) for d in args.depths.split(",")]
    dtypes = args.dtypes.split(",")
    if not set(depths) <= {18, 50} or not set(dtypes) <= {"float32", "bfloat16"}:
        parser.error("--depths takes 18 and/or 50, --dtypes float32 and/or bfloat16")
    if args.batch % 2 or args.queue % args.batch or args.steps < 1 or args.warmup < 0:
        parser.error(
            "--batch must be even and divide --queue (official queue), --steps >= 1, --warmup >= 0"
        )

    started = time.perf_counter()
    modules = import_caco_jax()
    device = jax.devices()[0]
    report = Report(args.out)
    report.write(
        {
            "row": "machine",
            "device_kind": device.device_kind,
            "platform": device.platform,
            "jax": jax.__version__,
            "python": platform.python_version(),
            "batch": args.batch,
            "crop": args.crop,
            "queue": args.queue,
            "timed_steps": args.steps,
        }
    )
    for depth in depths:
        for dtype in dtypes:
            per_item = encoder_forward_flops(modules[2], depth, args.crop, jnp.dtype(dtype))
            peak = peak_for(device.device_kind, dtype, args.peak_tflops)
            measured = {}
            for name, work, measure in ROWS:
                row = {"row": name, "depth": depth, "dtype": dtype, "batch": args.batch}
                if time.perf_counter() - started > args.budget_s:
                    row["skipped"] = f"time budget of {args.budget_s:.0f} s spent"
                elif name == "torch" and args.no_torch:
                    row["skipped"] = "--no_torch"
                else:
                    try:
                        row.update(measure(modules, args, depth, dtype))
                    except Exception as error:  # one failed row (out of memory...) ends no run
                        first_line = (str(error).strip().splitlines() or [""])[0]
                        row["error"] = f"{type(error).__name__}: {first_line}"[:300]
                if "step_time_s" in row:
                    measured[name] = row["step_time_s"]
                    row.update(utilisation(row, args.batch, work * per_item, peak, measured, name))
                report.write(row)
    report.close()
    print(f"rows written to {args.out} in {time.perf_counter() - started:.0f} s")


def utilisation(row, batch, flops_per_item, peak, measured, name) -> dict:
    """Samples/s, model TFLOP per step, MFU and the row's ratio to its reference row."""
    seconds = row["step_time_s"]
    model_flops = flops_per_item * batch
    out = {
        "samples_per_s": batch / seconds,
        "model_tflop_per_step": model_flops / 1e12,
        "peak_tflops": peak,
        "mfu": model_flops / seconds / (peak * 1e12) if peak else None,
    }
    if row.get("xla_flops"):
        out["xla_tflop_per_step"] = row["xla_flops"] / 1e12
        out["xla_flops_utilisation"] = row["xla_flops"] / seconds / (peak * 1e12) if peak else None
    reference = {"supervised": "caco_jax", "torch": "caco_jax"}.get(name)
    if reference in measured:
        # supervised: CACo step time / supervised; torch: official PyTorch / caco_jax.
        first, second = ("caco_jax", name) if name == "supervised" else (name, "caco_jax")
        out["ratio"] = measured[first] / measured[second]
        out["ratio_of"] = f"{first}/{second} step time"
    return out


if __name__ == "__main__":
    main()
