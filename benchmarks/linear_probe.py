r"""EuroSAT linear-probe head training on cached features: one scan per epoch vs a per-step loop.

  python benchmarks/linear_probe.py [--epochs 3] [--full]

Features: random float32 [16200, 512] (SeCo's EuroSAT train split, ResNet-18 width), 10 classes,
batch 32, Adam. "scan" is `heads.train_linear_head` (one compiled `lax.scan` per epoch);
"per-step" dispatches one jitted Adam step per batch from Python, as a straightforward port of the
official loop would. Both run the same number of epochs in this process; compile time excluded by a
warm-up epoch. `--full` also times the paper's 100 epochs with the scan version.
"""

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from caco_jax.evaluators import heads


def per_step_training(features, labels, settings, epochs, seed=0):
    steps = features.shape[0] // settings.batch_size
    optimizer = optax.adam(heads.step_schedule(settings, steps))
    params = heads.init_linear(jax.random.key(seed), features.shape[1], 10)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(
            lambda p: heads.softmax_cross_entropy(heads.linear(p, x), y)
        )(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    features, labels = jnp.asarray(features), jnp.asarray(labels)
    for _ in range(epochs):
        order = rng.permutation(features.shape[0])[: steps * settings.batch_size]
        for batch in order.reshape(steps, settings.batch_size):
            params, opt_state, _ = step(params, opt_state, features[batch], labels[batch])
    jax.block_until_ready(params)
    return params


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    features = rng.normal(size=(16200, 512)).astype(np.float32)
    labels = rng.integers(0, 10, 16200)
    settings = heads.HeadSettings(epochs=args.epochs)
    warmup = heads.HeadSettings(epochs=1)

    def scan(settings):
        return lambda: heads.train_linear_head(
            features, labels, num_outputs=10, loss_fn=heads.softmax_cross_entropy,
            settings=settings, seed=0,
        )  # fmt: skip

    timed(scan(warmup))
    per_step_warm = timed(lambda: per_step_training(features, labels, warmup, 1))
    scan_time = timed(scan(settings))
    per_step_time = timed(lambda: per_step_training(features, labels, settings, args.epochs))
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].device_kind}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"features [16200, 512], batch 32, {args.epochs} epochs ({16200 // 32} steps each)")
    print(f"scan (train_linear_head): {scan_time:.2f} s = {scan_time / args.epochs:.3f} s/epoch")
    per_epoch = per_step_time / args.epochs
    print(f"per-step jitted loop:     {per_step_time:.2f} s = {per_epoch:.3f} s/epoch")
    print(f"  (its first epoch, compile included: {per_step_warm:.2f} s)")
    print(f"ratio per-step / scan: {per_step_time / scan_time:.1f}x")
    if args.full:
        full = timed(scan(heads.HeadSettings()))
        print(f"paper protocol, 100 epochs with scan: {full:.1f} s")


if __name__ == "__main__":
    main()
