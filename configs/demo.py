r"""The embedded default: a small synthetic archive in the published layout, end to end on a CPU.

  python run.py --config configs/demo.py

Writes the archive, prepares its records, pretrains CACo, scores the change labels against the
archive's ground truth, draws the change map (workdir/demo/change_map/) and probes land cover,
all under workdir/demo.
"""

from caco_jax import config as config_lib


def get_config():
    config = config_lib.for_tasks(
        "synthesize", "prepare", "pretrain", "score_change", "change_map", "eval_land_cover"
    )
    config.synthetic.num_locations = 64
    # CACo, ResNet-18 on 64x64 crops, 16 locations (32 items) per batch = 4 steps per epoch, 8
    # epochs so the change labels are fitted 8 times (used from epoch 1 on). The queue (64 keys per
    # window) holds only real keys from the end of the first epoch on: the raw loss rises while
    # real keys replace the random initial ones, so the summary compares epochs from 2 on. The
    # learning rate is the official 0.03 itself (base 0.24 x 32/256) rather than scaled down to
    # the tiny batch, and the key encoder follows the query encoder faster (m = 0.99; official
    # 0.999) so that ~30 steps show learning.
    config.augment.crop_size = 64
    config.method.num_negatives = 128
    config.method.key_momentum = 0.99
    config.train.batch_size = 32
    config.train.epochs = 8
    config.train.milestones = (6,)
    config.train.base_learning_rate = 0.24
    config.checkpoint.every_steps = 20
    config.logging.every_steps = 4
    config.change_map.kind = "pretraining"  # the map of the run's own change estimate
    config.land_cover.image_size = config.augment.crop_size  # probe at the size it trained on
    return config
