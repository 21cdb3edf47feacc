"""caco_jax: Change-Aware Sampling and Contrastive Learning (CACo, CVPR 2023) in JAX/Flax.

Data flow, one subpackage or module per stage:
  data/ (archive -> TFDS records -> batches) -> train.py (step, checkpoints) -> evaluators/

Importing the package registers the `caco_geography` TFDS builder (TFDS only: no JAX, no GDAL).
"""

from caco_jax.data import builder as _builder  # noqa: F401  (registers caco_geography)
