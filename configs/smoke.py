r"""A quick check that pretraining runs end to end: a tiny synthetic archive, a few CACo steps.

  python run.py --config configs/smoke.py --workdir /tmp/caco_smoke

ResNet-18 on 32x32 crops, batch 8, a 32-key queue, 2 epochs over 8 locations (labels fitted once).
"""

from caco_jax import config as config_lib


def get_config():
    config = config_lib.for_tasks("synthesize", "prepare", "pretrain")
    config.synthetic.num_locations = 8
    config.augment.crop_size = 32
    config.method.num_negatives = 32
    config.model.embedding_dim = 32
    config.train.batch_size = 8
    config.train.epochs = 2
    config.train.milestones = (1,)
    config.checkpoint.every_steps = 2
    config.logging.every_steps = 1
    return config
