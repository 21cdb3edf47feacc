r"""EuroSAT probes side by side: the official probe (encoder in training mode at every step)
against the cached probe (features extracted once in eval mode, the head trained on the cache).

  python benchmarks/eurosat_probes.py [--epochs 3] [--depth 18] [--train 16200 --val 5400]

Random uint8 images of 64x64x3, by default at EuroSAT's size (SeCo's split: 16,200 train, 5,400
val), a randomly initialised ResNet, batch 32, Adam, the paper's input in [0, 1]. Both probes run
`--epochs` epochs in this process after a one-epoch warm-up that pays the compiles, each timed in
its parts. The paper's 100 epochs at EuroSAT's size are extrapolated from the measured rates (the
official epoch scales with its steps, the feature passes and the head epoch with their images):

  official(100) = 100 x official epoch + train and val feature passes (the final evaluation)
  cached(100)   = train and val feature passes + 100 x head epoch on the cache

On a slow machine, `--train` / `--val` measure the same rates on fewer images.
"""

import argparse
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from caco_jax.evaluators import common, heads
from caco_jax.runtime import inference

TRAIN, VAL = 16200, 5400


def timed(fn):
    start = time.perf_counter()
    result = fn()
    jax.block_until_ready(result)
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--train", type=int, default=TRAIN)
    parser.add_argument("--val", type=int, default=VAL)
    args = parser.parse_args()
    train_size, val_size = args.train, args.val
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (train_size + val_size, 64, 64, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, train_size + val_size)
    train, val = np.arange(train_size), np.arange(train_size, train_size + val_size)
    model = common.random_encoder(args.depth, 3, seed=0)
    settings = heads.HeadSettings(epochs=args.epochs, milestones=())
    warmup = heads.HeadSettings(epochs=1, milestones=())

    def features(subset):
        return inference.extract_features(
            model, lambda i: images[subset[i]], subset.size,
            preprocess=common.as_unit_float, batch_size=256,
        )  # fmt: skip

    def official(settings):
        return lambda: heads.train_head_with_encoder_in_train_mode(
            model, images[train], labels[train], preprocess=common.as_unit_float,
            num_classes=10, settings=settings, seed=0,
        )  # fmt: skip

    def head(settings, cached):
        return lambda: heads.train_linear_head(
            cached, labels[train], num_outputs=10, loss_fn=heads.softmax_cross_entropy,
            settings=settings, seed=0,
        )  # fmt: skip

    # Warm-up: every compile (train-mode epoch scan, feature pass, head epoch scan).
    timed(official(warmup))
    _, cached_train = timed(lambda: features(train))
    timed(head(warmup, cached_train))

    official_time, _ = timed(official(settings))
    train_pass, cached_train = timed(lambda: features(train))
    val_pass, _ = timed(lambda: features(val))
    head_time, _ = timed(head(settings, cached_train))

    official_epoch = official_time / args.epochs
    head_epoch = head_time / args.epochs
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].device_kind}, "
        f"{len(jax.devices())} device(s), load average {os.getloadavg()[0]:.1f}; "
        f"ResNet-{args.depth}, {train_size} train / {val_size} val images, {args.epochs} timed "
        "epochs"
    )
    print(f"official probe: {official_epoch:.2f} s per epoch (encoder in training mode)")
    print(f"cached probe:   train features {train_pass:.2f} s, val features {val_pass:.2f} s, "
          f"head {head_epoch * 1000:.1f} ms per epoch")  # fmt: skip
    # Extrapolated to EuroSAT's size: steps of 32 (last partial batch dropped) and images.
    steps = TRAIN // 32 / (train_size // 32)
    official_epoch *= steps
    head_epoch *= steps
    passes = train_pass * TRAIN / train_size + val_pass * VAL / val_size
    official_100 = 100 * official_epoch + passes
    cached_100 = passes + 100 * head_epoch
    print(
        f"100 epochs at {TRAIN} / {VAL}: official {official_100:.0f} s = 100 x "
        f"{official_epoch:.2f} + {passes:.1f}; cached {cached_100:.1f} s = {passes:.1f} + 100 x "
        f"{head_epoch:.3f}; ratio {official_100 / cached_100:.0f}x"
    )


if __name__ == "__main__":
    main()
