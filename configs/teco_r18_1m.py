r"""TeCo pretraining of ResNet-18 on the 1M-image archive: 200 epochs, lr x0.1 at 120 and 160.

Reproduces the official `utkarshmall13/CACo` run `--data_mode teco --base_encoder resnet18`
(batch 256, lr 0.03, K 16384; SPEC section 3). Prepares the records, then pretrains:

  python run.py --config configs/teco_r18_1m.py \
    --config.data.archive=/data/caco --workdir runs/teco_r18_1m
"""

from caco_jax.paper_configs import pretrain_config


def get_config():
    return pretrain_config("teco", 18, "1m")
