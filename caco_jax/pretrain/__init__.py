"""Pretraining: the views (`augment`), the objectives, the queue, the change estimate, the model
and its state, the data-parallel step and the loop (`train`)."""
