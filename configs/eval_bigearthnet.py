r"""BigEarthNet-19 multi-label classification (SPEC section 4): frozen encoder, Dropout(0.2) +
Linear,
multi-label soft-margin loss, Adam 1e-3, 100 epochs, x0.1 at 60 and 80, 128x128 input; micro AP.

  python run.py --config configs/eval_bigearthnet.py --workdir workdir/caco_r18_100k \
    --config.eval.split_dir=data/splits --config.eval.train_fraction=0.1
  # full fine-tuning: --config.eval.finetune=True (lr config.eval.finetune_learning_rate)
"""

from caco_jax import config as config_lib


def get_config():
    config = config_lib.base_config()
    config.tasks = ("eval_bigearthnet",)
    config.eval.epochs = 100
    config.eval.batch_size = 256
    config.eval.learning_rate = 1e-3  # SeCo's README command for the frozen probe
    config.eval.milestones = (60, 80)
    config.eval.dropout = 0.2
    config.eval.image_size = 128
    config.eval.train_fraction = 1.0
    return config
