"""Evaluation datasets: TFDS builders of the downloads, and the published split lists."""
