r"""OSCD change detection (SeCo's main_oscd.py): the encoder (not trained; its BatchNorm in training
mode while the decoder trains, as in SeCo's code) gives |f(x1) - f(x2)| at each stage to a U-Net
decoder; 96x96 tiles with flips and rot90, BCE, Adam 1e-3 (weight decay 1e-4), lr x0.95 per epoch,
100 epochs, batch 32; validated after every epoch on the 10 test cities' 96 px tiles. The reported
precision / recall / F1 (at 0.5) are the official ones: per batch of 32 shuffled tiles, averaged;
the pooled ones over every test pixel beside them, the last and the best epoch both.
docs/evaluation.md says what to download.

  python run.py --config configs/eval_oscd.py --workdir workdir/caco_r18_100k \
    --config.eval.manual_dir=data/oscd
"""

from caco_jax import config as config_lib


def get_config():
    return config_lib.for_tasks("eval_oscd")  # config.oscd: the protocol above
