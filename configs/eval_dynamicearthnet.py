r"""DynamicEarthNet semantic segmentation (the paper's segmentation table; docs/dynamicearthnet.md):
the encoder's stage maps of one Planet image ([0, 1] reflectance, the encoder's BatchNorm in
training mode while the decoder trains: SeCo's segmentation protocol) into SeCo's U-Net decoder, 6
classes (snow and ice ignored), random 256 px crops with flips and rot90, soft Dice, Adam 1e-3
(weight decay 1e-4), lr x0.95 per epoch, 100 epochs, batch 32; the val images (or
`--config.dynamicearthnet.split=test`) predicted as 256 px tiles, mIoU.

  python run.py --config configs/eval_dynamicearthnet.py:frozen --workdir workdir/caco_r18_100k \
    --config.eval.manual_dir=data/dynamicearthnet
  python run.py --config configs/eval_dynamicearthnet.py:finetune --workdir workdir/caco_r18_100k \
    --config.eval.manual_dir=data/dynamicearthnet

`frozen` (the default) trains the decoder on the frozen encoder; `finetune` also trains the encoder
at `dynamicearthnet.finetune_learning_rate` (1e-5). The first run builds TFDS `dynamic_earthnet/rgb`
in `eval.data_dir` from the downloads in `eval.manual_dir` (planet.*.zip, labels.zip, the
validation/test labels of mediaTUM 1738088, the split files); later runs read it.
`--config.dynamicearthnet.input=export --config.dynamicearthnet.encoder_bn=eval` is the protocol
caco_jax used before (the export's normalisation, BatchNorm statistics kept).
"""

from caco_jax import config as config_lib

MODES = ("frozen", "finetune")


def get_config(arg=None):
    mode = arg or "frozen"
    if mode not in MODES:
        raise ValueError(f"configs/eval_dynamicearthnet.py: mode {mode!r}, expected one of {MODES}")
    config = config_lib.for_tasks("eval_dynamicearthnet")
    config.dynamicearthnet.finetune = mode == "finetune"  # at finetune_learning_rate, 1e-5
    return config
