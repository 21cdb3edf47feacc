r"""The paper's pretraining runs: method x ResNet-18/50 x the 100k or 1M archive.

  python run.py --config configs/pretrain.py:caco,r18,100k --config.data.archive=/data/caco100k \
    --workdir runs/caco_r18_100k
  python run.py --config configs/pretrain.py:caco,r50,1m --config.data.archive=/data/caco1m \
    --workdir runs/caco_r50_1m
  python run.py --config configs/pretrain.py:seco,r18,100k ...   # baselines: teco, seco, moco
  # records only (e.g. once, before a pod job):
  python run.py --config configs/pretrain.py:caco,r18,100k --config.tasks="('prepare',)" ...

Every run is the official code's (`utkarshmall13/CACo`, `src/main_pretrain.py` with
``--data_mode caco|teco|seco|moco --base_encoder resnet18|resnet50``): SGD lr 0.03 for a batch
of 256, momentum 0.9, weight decay 1e-4, K = 16384, m = 0.999, temperature 0.07. For caco, teco
and seco, whose epoch visits every location, the archive size sets the schedule: 100k images 1000
epochs (lr x0.1 at 600 and 800), 1M images 200 epochs (x0.1 at 120 and 160). MoCo's epoch visits
every acquisition (`methods.Method.epoch_over`), and the official MoCo runs
(``resnet{18,50}_moco_geo_100k_200``) train 200 of them, lr x0.1 at 120 and 160.

``moco,*,1m`` has no official run (the official list has MoCo on the 100k archive only): it is an
extrapolation that keeps the official MoCo schedule, 200 epochs over every acquisition of the 1M
archive, about 781k steps at batch 256 (~1M acquisitions x 200 / 256), five times CACo-1M's about
156k (~100k locations x 2 windows x 200 / 256). The config warns when it is chosen.
"""

import warnings

from caco_jax import config as config_lib
from caco_jax import methods

SCHEDULES = {"100k": (1000, (600, 800)), "1m": (200, (120, 160))}  # epochs, lr milestones
ACQUISITION_EPOCHS = (200, (120, 160))  # the official MoCo runs, whatever the archive
ARCHITECTURES = {"r18": 18, "r50": 50}


def get_config(arg: str = "caco,r18,100k"):
    method, arch, data = (part.strip() for part in arg.split(","))
    for value, known, what in (
        (method, methods.NAMES, "method"),
        (arch, tuple(ARCHITECTURES), "architecture"),
        (data, tuple(SCHEDULES), "archive"),
    ):
        if value not in known:
            raise ValueError(f"configs/pretrain.py:{arg}: {what} {value!r} not in {known}")
    config = config_lib.for_tasks("prepare", "pretrain")
    config.method.name = method
    config.model.depth = ARCHITECTURES[arch]
    over_acquisitions = methods.get(method).epoch_over == "acquisitions"
    if over_acquisitions and data != "100k":
        warnings.warn(
            f"configs/pretrain.py:{arg}: no official run; an extrapolation of the official MoCo "
            "schedule (200 epochs over every acquisition: about 781k steps at batch 256 on the 1M "
            "archive, five times CACo-1M's); pass --config.train.epochs to change it",
            stacklevel=2,
        )
    schedule = ACQUISITION_EPOCHS if over_acquisitions else SCHEDULES[data]
    config.train.epochs, config.train.milestones = schedule
    return config
