r"""CACo pretraining of ResNet-18 on the 100k-image archive: 1000 epochs, lr x0.1 at 600 and 800.

Reproduces the official `utkarshmall13/CACo` run `--data_mode caco --base_encoder resnet18`
(batch 256, lr 0.03, K 16384; SPEC section 3). Prepares the records, then pretrains:

  python run.py --config configs/caco_r18_100k.py \
    --config.data.archive=/data/caco --workdir runs/caco_r18_100k
"""

from caco_jax.paper_configs import pretrain_config


def get_config():
    return pretrain_config("caco", 18, "100k")
