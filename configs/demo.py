r"""The embedded default: a small synthetic archive in the published layout, end to end on a CPU.

  python run.py --config configs/demo.py

Writes the archive, prepares its records, pretrains CACo, scores the change labels against the
archive's ground truth, draws the change map (workdir/demo/change_map/) and probes land cover,
all under workdir/demo. During pretraining a land-cover kNN runs at every epoch end and the change
AUC of the encoder's features every 4th epoch (`config.evals`, docs/pretraining.md): the printed
summary shows them beside the loss, and workdir/demo/evals.png draws the curves.
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
    # The downstream curve (docs/pretraining.md#evaluations-during-pretraining): a weighted kNN
    # (k 20, T 0.07) of land cover on seeded subsets of the early-window acquisitions (64 of the
    # 160 in each half of the locations) every epoch, and the change AUC of 24 locations' features
    # every 4th. An epoch here is 4 steps, so even these small subsets cost a fifth of the
    # training time; on a real archive the same subsets cost a fraction of a percent.
    config.evals.land_cover_knn = dict(
        type="knn", dataset="land_cover", every_epochs=1, train_examples=64, test_examples=64
    )
    config.evals.change_auc = dict(type="change_auc", every_epochs=4, test_examples=24)
    return config
