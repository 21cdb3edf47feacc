r"""The embedded default: a small synthetic archive in the published layout, end to end on a CPU.

  python run.py --config configs/demo.py

Writes the archive, prepares its TFDS records, pretrains and evaluates, all under workdir/demo.
"""

from caco_jax import config as config_lib


def get_config():
    config = config_lib.base_config()
    config.tasks = ("synthesize", "prepare")
    config.synthetic.num_locations = 64
    # Last: a land-cover linear probe of the pretrained encoder against a random one (evaluators).
    config.tasks = (*config.tasks, "linear_probe")
    config.eval.image_size = config.augment.crop_size  # probe at the size the encoder trained on
    return config
