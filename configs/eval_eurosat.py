r"""EuroSAT linear probe: frozen encoder, Linear(d, 10), Adam 1e-3, 100 epochs,
x0.1 at
60 and 80, batch 32, 64x64 input in [0, 1]; top-1 on SeCo's validation split.

  python run.py --config configs/eval_eurosat.py --workdir workdir/caco_r18_100k \
    --config.eval.data_dir=~/tensorflow_datasets --config.eval.split_dir=data/splits
"""

from caco_jax import config as config_lib


def get_config():
    return config_lib.for_tasks("eval_eurosat")  # the eval section's defaults are this protocol
