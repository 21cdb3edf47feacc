r"""BigEarthNet-19 multi-label classification (SeCo's main_bigearthnet.py and its README command):
frozen encoder, Dropout(0.2) + Linear, multi-label soft-margin loss, Adam 1e-3 at batch 1024, 100
epochs, x0.1 at 60 and 80, 128x128 input; validated every 10th epoch on SeCo's validation split.
The reported micro AP is the official one (per validation batch of 1024, averaged), the pooled
micro and macro AP beside it, the last and the best validation both. docs/evaluation.md says what
to download.

  python run.py --config configs/eval_bigearthnet.py --workdir workdir/caco_r18_100k \
    --config.eval.manual_dir=data/bigearthnet --config.bigearthnet.train_fraction=0.1
  # full fine-tuning: --config.bigearthnet.finetune=True (lr bigearthnet.finetune_learning_rate)
"""

from caco_jax import config as config_lib


def get_config():
    return config_lib.for_tasks("eval_bigearthnet")  # config.bigearthnet: the protocol above
