"""Encoder forward pass: time, images/s and FLOPs of ResNet-18/50 at 224x224.

Counts the work side by side: XLA's own count for the compiled program
(``compiled.cost_analysis()["flops"]``, a multiply-add = 2 FLOPs), and analytic counts of the
convolutions' multiply-adds walked from the model's kernels: all taps (the usual convention;
torchvision's "1.82 / 4.1 GFLOPs" are such multiply-add counts) and only taps that fall inside the
image (XLA does not count products with padding zeros). The forward runs in training mode (batch
statistics, running averages updated), as in pretraining, unless --mode eval.

Timing is wall clock (median over repeats) and the process CPU time of the same runs; on a shared
machine the CPU time divided by the core count estimates the wall time of an otherwise idle one.

  .venv/bin/python benchmarks/encoder.py --batch 32 --depths 18 50 --dtypes float32 bfloat16
"""

import argparse
import functools
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from caco_jax.models.resnet import ResNet


def conv_output_size(size, kernel, stride, padding):
    return (size + padding[0] + padding[1] - kernel) // stride + 1


def taps_per_axis(size, kernel, stride, padding, count_padding):
    """Kernel taps summed over the output positions of one spatial axis."""
    out = conv_output_size(size, kernel, stride, padding)
    if count_padding:
        return out * kernel, out
    inside = sum(
        1 for o in range(out) for t in range(kernel) if 0 <= o * stride - padding[0] + t < size
    )
    return inside, out


def conv_macs(conv, size, count_padding):
    """(multiply-adds, output size) of a conv on a square input."""
    kernel, _, cin, cout = conv.kernel.shape
    taps, out = taps_per_axis(size, kernel, conv.strides[0], conv.padding[0], count_padding)
    return taps * taps * cin * cout, out


def analytic_macs(model, size, count_padding=True):
    """Multiply-adds per image of every convolution (BatchNorm, ReLU, pooling are not counted)."""
    conv_macs_ = functools.partial(conv_macs, count_padding=count_padding)
    total, size = conv_macs_(model.conv1, size)
    size = conv_output_size(size, 3, 2, (1, 1))  # max pool
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            block_input = size
            for name in ("conv1", "conv2", "conv3"):
                if hasattr(block, name):
                    macs, size = conv_macs_(getattr(block, name), size)
                    total += macs
            if block.downsample is not None:
                total += conv_macs_(block.downsample[0], block_input)[0]
    return total


def xla_flops(compiled):
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older JAX returned one dict per device program
        analysis = analysis[0]
    return float(analysis["flops"])


def benchmark(depth, dtype, batch, size, mode, repeats):
    model = ResNet(depth, rngs=nnx.Rngs(0), dtype=dtype)
    model.train() if mode == "train" else model.eval()
    graphdef, state = nnx.split(model)

    def forward(state, images):
        model = nnx.merge(graphdef, state)
        return model(images), nnx.state(model, nnx.BatchStat)

    images = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)
    start = time.perf_counter()
    compiled = jax.jit(forward).lower(state, images).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(state, images))  # warm-up
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(state, images))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    seconds = statistics.median(times)
    return {
        "depth": depth,
        "dtype": jnp.dtype(dtype).name,
        "compile_s": compile_s,
        "seconds": seconds,
        "cpu_seconds": statistics.median(cpu_times),
        "images_per_s": batch / seconds,
        "xla_gflops_per_image": xla_flops(compiled) / batch / 1e9,
        "analytic_gmacs_per_image": analytic_macs(model, size) / 1e9,
        "inside_gmacs_per_image": analytic_macs(model, size, count_padding=False) / 1e9,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[18, 50])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--mode", choices=["train", "eval"], default="train")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = jax.devices()[0]
    cpu = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            names = [
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            ]
        cpu = names[0] if names else cpu
    print(
        f"# Encoder forward pass: batch {args.batch}, {args.size}x{args.size}x3, {args.mode} mode, "
        f"median of {args.repeats} after a warm-up"
    )
    print(
        f"# machine: {device.platform} {device.device_kind}, {os.cpu_count()} cores ({cpu}), "
        f"jax {jax.__version__}, load average before {os.getloadavg()[0]:.1f}"
    )
    header = (
        "| model | compute | wall s / batch | CPU s / batch | images/s (wall) | "
        "idle-machine estimate s / 256 images | XLA GFLOP / image | analytic GMAC / image | "
        "GMAC inside the image | XLA / (2 x inside) | XLA GFLOP/s (wall) | compile s |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    results = []
    for depth in args.depths:
        for dtype in args.dtypes:
            r = benchmark(depth, jnp.dtype(dtype), args.batch, args.size, args.mode, args.repeats)
            results.append(r)
            flops = r["xla_gflops_per_image"]
            idle_estimate = r["cpu_seconds"] / os.cpu_count() * 256 / args.batch
            print(
                f"| ResNet-{depth} | {r['dtype']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
                f"{r['images_per_s']:.1f} | {idle_estimate:.1f} | {flops:.3f} | "
                f"{r['analytic_gmacs_per_image']:.3f} | {r['inside_gmacs_per_image']:.3f} | "
                f"{flops / (2 * r['inside_gmacs_per_image']):.3f} | "
                f"{flops * r['images_per_s']:.1f} | {r['compile_s']:.1f} |",
                flush=True,
            )
    print(f"# load average after {os.getloadavg()[0]:.1f}")
    by_key = {(r["depth"], r["dtype"]): r for r in results}
    for depth in args.depths:
        if (depth, "float32") in by_key and (depth, "bfloat16") in by_key:
            ratio = by_key[(depth, "bfloat16")]["seconds"] / by_key[(depth, "float32")]["seconds"]
            print(f"# ResNet-{depth}: bfloat16 time / float32 time = {ratio:.2f}")
    if (18, "float32") in by_key and (50, "float32") in by_key:
        ratio = by_key[(50, "float32")]["seconds"] / by_key[(18, "float32")]["seconds"]
        print(f"# float32: ResNet-50 time / ResNet-18 time = {ratio:.2f}")


if __name__ == "__main__":
    main()
