r"""EuroSAT linear probe (CACo's src/main_eurosat.py): Linear(d, 10) on the encoder, Adam 1e-3,
100 epochs, x0.1 at 60 and 80, batch 32, 64x64 input in [0, 1]; top-1 on SeCo's validation split
after every epoch (the official per-batch mean, the pooled top-1 beside it, last and best epoch).
The encoder stays in training mode while the head trains, as the official run did
(`--config.eurosat.probe=cached` for the fast probe on eval-mode features). docs/evaluation.md says
what to download.

  python run.py --config configs/eval_eurosat.py --workdir workdir/caco_r18_100k \
    --config.eval.manual_dir=data/eurosat --config.eval.data_dir=data/tfds
"""

from caco_jax import config as config_lib


def get_config():
    return config_lib.for_tasks("eval_eurosat")  # config.eurosat: the protocol above
