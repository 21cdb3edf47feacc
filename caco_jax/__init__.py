"""caco_jax: Change-Aware Sampling and Contrastive Learning (CACo, CVPR 2023) in JAX/Flax.

Data flow, one subpackage or module per stage:
  data/ (archive -> TFDS records -> batches) -> train.py (step, checkpoints) -> evaluators/
"""
