r"""Change maps from an encoder alone: two scenes of one place, or a CACo archive or records.

  # two dates of one place: GeoTIFF files or folders, or two Sentinel-2 products
  caco-jax --config change_map:r18_100k_caco --workdir workdir/change \
    --config.change_map.before=<first date>.SAFE --config.change_map.after=<second date>.SAFE
  # a CACo archive, prepared records, or a pretraining run's own estimate
  caco-jax --config change_map --workdir workdir/change \
    --config.change_map.source=/data/caco100k --config.change_map.encoder=r18_100k_caco
  caco-jax --config change_map --workdir workdir/demo \
    --config.change_map.kind=records --config.change_map.source=workdir/demo/tfds
  caco-jax --config change_map --workdir workdir/demo --config.change_map.kind=pretraining

The `:arg` is the encoder (config.change_map.encoder). Writes <workdir>/change_map/: for two
scenes change_ratio.tif and changed.tif (a pixel per tile, 255 = left out), change_map.geojson
(tile polygons in the scene's CRS), change_map.csv, change_map.png, histograms.png and the
GeoParquet embeddings_before/ and embeddings_after/; for locations change_map.csv,
change_map.geojson (points), change_map.png, histograms.png, and for an archive or records the
GeoParquet embeddings/. Changed = ratio above one threshold (caco_jax/products/change_map.py).
Runs on every process of a multi-host run. See docs/encoders.md.
"""

from caco_jax import config as config_lib


def get_config(arg=None):
    config = config_lib.for_tasks("change_map")
    if arg:
        config.change_map.encoder = arg
    return config
