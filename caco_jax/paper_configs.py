"""The paper's pretraining runs as configs: method x ResNet-18/50 x 100k/1M images (SPEC section 3).

Each `configs/<method>_r<depth>_<data>.py` is one call of `pretrain_config`. Every run uses SGD
lr 0.03 for a batch of 256, momentum 0.9, weight decay 1e-4, K = 16384, m = 0.999, temperature
0.07; the data size sets the schedule: 100k images 1000 epochs (lr x0.1 at 600 and 800), 1M images
200 epochs (x0.1 at 120 and 160).
"""

from caco_jax import config as config_lib

SCHEDULES = {  # data size -> (epochs, milestones)
    "100k": (1000, (600, 800)),
    "1m": (200, (120, 160)),
}
ARCHIVES = {"100k": "clean_100k_geography", "1m": "clean_1m_geography"}


def pretrain_config(method: str, depth: int, data: str):
    """The official run of ``method`` on ResNet-``depth`` with the ``data`` archive (100k or 1m)."""
    if data not in SCHEDULES:
        raise ValueError(f"data must be one of {sorted(SCHEDULES)}, got {data!r}")
    config = config_lib.base_config()
    config.tasks = ("prepare", "pretrain")
    config.method.mode = method
    config.model.depth = depth
    config.train.epochs, config.train.milestones = SCHEDULES[data]
    return config
