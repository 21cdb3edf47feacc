"""Cost of the contrastive objectives per step, next to one encoder forward pass, in the same run.

What it measures (defaults = the official setting: batch N = 256 items, embedding D = 128,
K = 16384 queued keys per subspace, ResNet-18 at 224 x 224):

- each objective's forward + backward with respect to the queries (``jax.value_and_grad`` of the
  loss in ``z_q``, jitted; keys and queue are constants, as in training);
- one forward pass of ``caco_jax.models.resnet.ResNet`` (train-mode BatchNorm, as every training
  forward) at the same batch;
- FLOPs of both from XLA's ``compile().cost_analysis()``;
- a floor for CACo: the own-window queue matmuls and their log-sum-exp alone (forward + backward),
  i.e. what any implementation must do, to show what the rest (in-batch negatives, mask, concat)
  costs.

Each case is compiled and run once to warm up, then timed ``--encoder-repeats`` / ``--repeats``
times with ``block_until_ready``: the fastest and the median wall time, and the median process CPU
time (all threads, the figure least sensitive to other jobs on a shared machine). Prints the
machine, then a table and the ratios. Run:

    .venv/bin/python benchmarks/objectives.py [--batch 256 --image-size 224]
"""

from __future__ import annotations

import argparse
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
from caco_jax.pretrain import objectives


def unit(key, shape):
    x = jax.random.normal(key, shape, jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def flops_of(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older JAX: one dict per computation
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def measure(fn, args, repeats):
    """(compiled FLOPs, fastest wall s, all wall s, median process CPU s) of a jitted fn on args.

    On a shared machine the fastest run is the wall time least disturbed by other processes, and
    the process CPU time (all XLA threads) barely depends on them; medians are printed too.
    """
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))  # warm-up
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return flops_of(compiled), min(times), times, statistics.median(cpu_times)


def objective_cases(batch, dim, queue_size, temperature=0.07):
    keys = jax.random.split(jax.random.key(0), 6)
    z_q = unit(keys[0], (3, batch, dim))
    z_k = unit(keys[1], (3, 3, batch, dim))
    window_queue = unit(keys[2], (3, 2, queue_size // 2, dim))
    plain_queue = unit(keys[3], (3, queue_size, dim))
    changed = jax.random.bernoulli(keys[4], 0.3, (batch,))

    def grad_of(loss_fn):
        return jax.value_and_grad(lambda q, *rest: loss_fn(q, *rest)[0])

    def queue_floor(q, w):
        """The unavoidable part of caco_loss: own-window queue logits and their log-sum-exp."""
        by_pair = q.reshape(3, batch // 2, 2, dim)
        logits = jnp.einsum("slhd,shkd->slhk", by_pair, w) / temperature
        return jnp.sum(jnp.mean(jax.nn.logsumexp(logits, axis=-1), axis=(1, 2))), {}

    return {
        "queue floor": (grad_of(queue_floor), (z_q, window_queue)),
        "caco_loss": (
            grad_of(lambda q, k, w, c: objectives.caco_loss(q, k, w, c, temperature)),
            (z_q, z_k, window_queue, changed),
        ),
        "teco_loss": (
            grad_of(lambda q, k, w: objectives.teco_loss(q, k, w, temperature)),
            (z_q, z_k, window_queue),
        ),
        "seco_loss": (
            grad_of(lambda q, k, p: objectives.seco_loss(q, k, p, temperature)),
            (z_q, z_k, plain_queue),
        ),
        "moco_loss": (
            grad_of(lambda q, k, p: objectives.moco_loss(q, k, p, temperature)),
            (z_q[:1], z_k[:1, :1], plain_queue[:1]),
        ),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queue-size", type=int, default=16384)
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of each objective")
    parser.add_argument("--encoder-repeats", type=int, default=3, help="timed encoder forwards")
    args = parser.parse_args()

    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}; jax {jax.__version__} on {jax.devices()[0]}"
    )
    print(
        f"setting: N={args.batch}, D={args.dim}, K={args.queue_size}, "
        f"ResNet-{args.depth} at {args.image_size}x{args.image_size}; "
        f"{args.encoder_repeats} encoder / {args.repeats} objective runs after a warm-up"
    )

    model = ResNet(args.depth, rngs=nnx.Rngs(0))
    model.train()
    graphdef, state = nnx.split(model)

    def encoder_forward(state, images):
        return nnx.merge(graphdef, state)(images)

    images = jax.random.normal(
        jax.random.key(1), (args.batch, args.image_size, args.image_size, 3), jnp.float32
    )
    encoder = measure(encoder_forward, (state, images), args.encoder_repeats)
    enc_flops, enc_time, enc_times, enc_cpu = encoder
    del images

    rows = [("encoder forward", *encoder)]
    for name, (fn, fn_args) in objective_cases(args.batch, args.dim, args.queue_size).items():
        rows.append((f"{name} fwd+bwd", *measure(fn, fn_args, args.repeats)))
    floor = rows.pop(1)  # measured first, shown last
    rows.append(floor)

    enc_median = statistics.median(enc_times)
    print(
        f"\n{'what':<20}{'GFLOP':>8}{'fastest ms':>11}{'median ms':>10}{'CPU ms':>9}"
        f"{'/enc fastest':>13}{'/enc median':>12}{'/enc CPU':>9}{'/enc FLOPs':>11}"
    )
    for name, flops, fastest, times, cpu in rows:
        median = statistics.median(times)
        print(
            f"{name:<20}{flops / 1e9:>8.2f}{fastest * 1e3:>11.1f}{median * 1e3:>10.1f}"
            f"{cpu * 1e3:>9.1f}{fastest / enc_time:>13.4f}{median / enc_median:>12.4f}"
            f"{cpu / enc_cpu:>9.4f}{flops / enc_flops:>11.4f}"
        )
    print("\nall wall times (ms):")
    for name, _, _, times, _ in rows:
        print(f"  {name:<22}" + " ".join(f"{1e3 * t:.1f}" for t in times))
    caco = next(r for r in rows if r[0].startswith("caco"))
    print(
        f"\ncaco_loss fwd+bwd / encoder forward: time {100 * caco[2] / enc_time:.2f} % (fastest), "
        f"{100 * statistics.median(caco[3]) / enc_median:.2f} % (median), "
        f"{100 * caco[4] / enc_cpu:.2f} % (CPU); FLOPs {100 * caco[1] / enc_flops:.2f} %"
    )
    print("(a training step runs 1 query forward+backward and 3-4 key forwards)")
    print(
        f"caco_loss / its queue floor: time {caco[2] / floor[2]:.2f}x (fastest), "
        f"{caco[4] / floor[4]:.2f}x (CPU); FLOPs {caco[1] / floor[1]:.2f}x"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
