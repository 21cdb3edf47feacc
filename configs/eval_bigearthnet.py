r"""BigEarthNet-19 multi-label classification: frozen encoder, Dropout(0.2) +
Linear,
multi-label soft-margin loss, Adam 1e-3, 100 epochs, x0.1 at 60 and 80, 128x128 input; micro AP.

  python run.py --config configs/eval_bigearthnet.py --workdir workdir/caco_r18_100k \
    --config.eval.split_dir=data/splits --config.eval.train_fraction=0.1
  # full fine-tuning: --config.eval.finetune=True (lr config.eval.finetune_learning_rate)
"""

from caco_jax import config as config_lib


def get_config():
    config = config_lib.for_tasks("eval_bigearthnet")
    config.eval.batch_size = 256
    config.eval.dropout = 0.2
    config.eval.image_size = 128
    return config
