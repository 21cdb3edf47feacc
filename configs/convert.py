r"""Official PyTorch weights (CACo/SeCo/MoCo .pth, Lightning .ckpt, torchvision ResNet) -> encoder
export.

  python run.py --config configs/convert.py --workdir workdir/caco_r18_100k \
    --config.convert.source=resnet18_caco_geo_100k.pth
  # then any configs/eval_*.py with the same --workdir evaluates <workdir>/encoder
"""

from caco_jax import config as config_lib


def get_config():
    return config_lib.for_tasks("convert_weights")
