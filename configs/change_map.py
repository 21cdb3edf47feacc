r"""Change map of a CACo archive or prepared records from an encoder alone.

  python run.py --config configs/change_map.py --workdir workdir/change \
    --config.change_map.source=/data/caco100k --config.change_map.encoder=r18_100k_caco
  python run.py --config configs/change_map.py --workdir workdir/demo \
    --config.change_map.kind=records --config.change_map.source=workdir/demo/tfds

Writes <workdir>/change_map/: change_map.csv, change_map.geojson, change_map.png, histograms.png
(d_lt, d_st, ratio and the fitted label per location; see caco_jax/products/change_map.py).
"""

from caco_jax import config as config_lib


def get_config(arg=None):
    config = config_lib.for_tasks("change_map")
    if arg:
        config.change_map.encoder = arg
    return config
