r"""OSCD change detection (SeCo's main_oscd.py): the encoder (not trained; its BatchNorm in training
mode while the decoder trains, as in SeCo's code) gives |f(x1) - f(x2)| at each stage to a U-Net
decoder; 96x96 tiles with flips and rot90, BCE, Adam 1e-3 (weight decay 1e-4), lr x0.95 per epoch,
100 epochs, batch 32; precision / recall / F1 at 0.5 on the 10 test cities. docs/evaluation.md says
what to download.

  python run.py --config configs/eval_oscd.py --workdir workdir/caco_r18_100k \
    --config.eval.manual_dir=data/oscd
"""

from caco_jax import config as config_lib


def get_config():
    return config_lib.for_tasks("eval_oscd")  # config.oscd: the protocol above
