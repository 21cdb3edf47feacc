r"""The embedded default: a small synthetic archive in the published layout, end to end on a CPU.

  python run.py --config configs/demo.py

Writes the archive, prepares its TFDS records, pretrains and evaluates, all under workdir/demo.
"""

from caco_jax import config as config_lib


def get_config():
    config = config_lib.base_config()
    config.tasks = ("synthesize", "prepare")
    config.synthetic.num_locations = 64
    return config
