r"""An official pretrained encoder by name -> an encoder export (and optionally a PyTorch file).

  python run.py --config configs/pretrained.py --workdir workdir/r18_100k_caco \
    --config.pretrained.name=r18_100k_caco
  # also a torchvision-layout state dict with its normalisation in encoder.json beside it:
  python run.py --config configs/pretrained.py --workdir workdir/r18_100k_caco \
    --config.pretrained.name=r18_100k_caco --config.pretrained.torch_output=encoder.safetensors
  # any export (e.g. a pretraining run's) to PyTorch:
  python run.py --config configs/pretrained.py --workdir W \
    --config.pretrained.name=W/encoder --config.pretrained.torch_output=W/encoder.pth

Names: r18_100k_{seco,moco,teco,caco}, r18_1m_{seco,caco}, r50_100k_{moco,seco,caco},
r50_1m_{seco,caco} (caco_jax/models/pretrained.py). Offline, the error names the file to download
and the cache path to put it at.
"""

from caco_jax import config as config_lib


def get_config(arg=None):
    config = config_lib.for_tasks("pretrained")
    if arg:
        config.pretrained.name = arg
    return config
