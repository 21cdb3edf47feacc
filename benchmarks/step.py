r"""Time of one CACo pretraining step against one plain supervised ResNet step, same batch and
device.

  python benchmarks/step.py --depth 18 --batch 32 --crop 96

The CACo step (`caco_jax.pretrain.step`, jitted under `shard_map` on a one-device mesh) runs the
augmentation of four views, four key-encoder forwards (k0, k1, k2 and the query views for the change
estimate), and one query forward and backward. The plain step is one forward and backward of the
same ResNet with a linear classifier on already-normalised images, with the same SGD. A backward
costs about two forwards, so the model work is (4 + 3) / 3 = 7/3 of the plain step: the ratio should
stay near 2.3, plus the augmentation. Both are compiled first, then timed over --steps steps each
(median), in the same process.
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
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from caco_jax import config as config_lib
from caco_jax.models.resnet import ResNet
from caco_jax.pretrain import train
from caco_jax.runtime.mesh import data_mesh, global_batch, replicate


def time_calls(fn, steps):
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def caco_step_time(args) -> float:
    settings = config_lib.resolve(config_lib.for_tasks("pretrain")).replace(
        model={"depth": args.depth},
        augment={"crop_size": args.crop},
        train={"batch_size": args.batch},
        method={"num_negatives": args.queue},
    )
    mesh = data_mesh(jax.devices()[:1])
    run = train.setup(settings, args.batch, mesh=mesh)
    rng = np.random.default_rng(0)
    batch = global_batch(
        {
            "images": rng.integers(
                0, 256, (args.batch, 3, args.crop, args.crop, 3), dtype=np.uint8
            ),
            "item_id": np.arange(args.batch, dtype=np.int32),
            "window": (np.arange(args.batch) % 2).astype(np.int32),
            "location_index": (np.arange(args.batch) // 2).astype(np.int32),
        },
        mesh,
    )
    state = replicate(run.initial_state, mesh)
    state, _ = run.train_step(state, batch)  # compile
    holder = [state]

    def one():
        holder[0], metrics = run.train_step(holder[0], batch)
        return metrics

    jax.block_until_ready(one())
    return time_calls(one, args.steps)


def supervised_step_time(args) -> float:
    encoder = ResNet(args.depth, rngs=nnx.Rngs(0))
    classifier = nnx.Linear(encoder.feature_dim, 10, rngs=nnx.Rngs(1))
    graphdef, params, stats = nnx.split((encoder, classifier), nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    optimizer = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.03, momentum=0.9))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, stats, opt_state, images, labels):
        def loss_fn(params):
            encoder, classifier = nnx.merge(graphdef, params, stats)
            logits = classifier(encoder(images))
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, nnx.to_pure_dict(nnx.state((encoder, classifier), nnx.BatchStat))

        grads, new_stats = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state

    images = jax.random.normal(jax.random.PRNGKey(0), (args.batch, args.crop, args.crop, 3))
    labels = jnp.arange(args.batch) % 10
    carry = [params, stats, opt_state]

    def one():
        carry[:] = step(*carry, images, labels)
        return carry[0]

    jax.block_until_ready(one())  # compile
    jax.block_until_ready(one())
    return time_calls(one, args.steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--queue", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"JAX {jax.__version__} on {device.platform} ({device.device_kind})"
    )
    print(
        f"ResNet-{args.depth}, batch {args.batch}, {args.crop}x{args.crop}, queue {args.queue}, "
        f"median of {args.steps} steps after compilation"
    )
    plain = supervised_step_time(args)
    caco = caco_step_time(args)
    print(
        f"plain supervised step (1 forward + backward): {plain * 1e3:9.1f} ms  "
        f"{args.batch / plain:8.1f} samples/s"
    )
    print(
        "CACo step (augment 4 views, 4 key forwards, query forward + backward): "
        f"{caco * 1e3:9.1f} ms  "
        f"{args.batch / caco:8.1f} samples/s"
    )
    print(f"ratio CACo / plain: {caco / plain:.2f} (model work alone: 7/3 = 2.33)")


if __name__ == "__main__":
    main()
