"""Where to look: the paper's change-aware location sampler.

`most_populous_cities` -> `sample_locations` -> `write_locations` / `plot_locations`; the task
`sample_locations` (caco_jax/sources/sampling/task.py) chains them from a config.
"""
