"""What several test modules share: tiny pretraining configs and data, tree comparisons, and a
TensorFlow blocker for subprocesses."""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np

from caco_jax import config as config_lib

NUM_LOCATIONS = 16
BATCH = 16

# Compiled programs are shared between the tests of one worker through a persistent cache.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="caco_jax_test_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def tiny_config(*tasks, **train_overrides):
    """A pretraining config for 32x32 crops, 16-item batches, a 64-key queue and a ResNet-18 of
    width 8 (1/64 of the real one's FLOPs: the tests are about the step, not the network)."""
    config = config_lib.for_tasks(*(tasks or ("pretrain",)))
    config.augment.crop_size = 32
    config.method.num_negatives = 64
    config.model.embedding_dim = 16
    config.model.width = 8
    config.train.batch_size = BATCH
    config.train.bn_mode = "sync"
    config.train.epochs = 2
    config.train.milestones = (1,)
    config.logging.every_steps = 1
    config.logging.progress_bar = False
    config.input.num_threads = 1
    for key, value in train_overrides.items():
        setattr(config.train, key, value)
    config_lib.validate(config)
    return config


def fake_source(num_locations=NUM_LOCATIONS, size=32, seed=0):
    """Locations of ten 32x32 acquisitions (five per window) around a per-location base image."""
    rng = np.random.default_rng(seed)
    source = []
    for index in range(num_locations):
        base = rng.integers(0, 256, (1, size, size, 3))
        noise = rng.integers(-20, 21, (10, size, size, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        source.append(
            {"pixels": pixels, "window": np.repeat([0, 1], 5), "location_id": f"{index:06d}"}
        )
    return source


def fake_batch(seed=0, batch=BATCH, size=32):
    rng = np.random.default_rng(seed)
    return {
        "images": rng.integers(0, 256, (batch, 3, size, size, 3), dtype=np.uint8),
        "item_id": np.arange(batch, dtype=np.int32),
        "window": (np.arange(batch) % 2).astype(np.int32),
        "location_index": (np.arange(batch) // 2).astype(np.int32),
    }


def assert_trees_close(actual, desired, tolerance):
    """Leaf by leaf, max |actual - desired| <= tolerance x the leaf's largest magnitude."""

    def close(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(float(np.max(np.abs(b))), 1e-6) if np.size(b) else 1.0
        error = float(np.max(np.abs(a - b), initial=0.0))
        assert error <= tolerance * scale, f"{error} > {tolerance} x {scale}"

    jax.tree.map(close, actual, desired)


BLOCK_TENSORFLOW = """
import importlib.abc, sys
class _NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError(f"this test forbids importing {name}")
        return None
sys.meta_path.insert(0, _NoTensorFlow())
"""


def environment_without_tensorflow(tmp_path) -> dict:
    """An environment for a subprocess in which ``import tensorflow`` fails (a sitecustomize on
    PYTHONPATH installs the blocker), so a test fails if anything reaches for TensorFlow."""
    folder = tmp_path / "no_tensorflow"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCK_TENSORFLOW)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(folder), os.getcwd(), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env
