"""The archive, its TFDS records, and the input pipeline."""
