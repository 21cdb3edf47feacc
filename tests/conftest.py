"""Test-wide settings: 8 simulated CPU devices, so multi-device code is tested without a GPU, and
compilation made cheap, since compiling (not running) the tiny test networks is most of the suite.

- XLA's CPU backend compiles without LLVM's optimisation passes (`COMPILE_FLAGS`): the training
  step and the model initialiser compile in about half the CPU time, and a tiny network runs a few
  times slower, which the tests do not notice. Results differ from the default build only by
  floating-point contraction (about 1e-7 relative); every comparison in the suite is between runs
  made with the same flags, or against references with tolerances.
- One persistent compilation cache serves the whole session: the pytest-xdist workers and the
  processes they start (run.py, the multi-host workers, the notebook kernel) inherit it through
  the environment, so a program compiled once is loaded from disk by every later test and process
  that builds the same one. A size limit turns on JAX's file lock around each read and write,
  which makes the cache safe for concurrent processes.
"""

import atexit
import os
import shutil
import tempfile

COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {COMPILE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Set by the process that starts the session (pytest, or pytest-xdist's controller) before its
# workers start; they inherit it. A cache directory set by the user is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="caco_jax_test_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))  # enables the file lock
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
