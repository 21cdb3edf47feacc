r"""Embeddings of Sentinel-2 images with an encoder export or an official encoder by name.

  # GeoTIFF / JPEG 2000: a Sentinel-2 product (.SAFE, L1C or L2A), a folder of band files, a
  # multi-band file, or a tree of them; the DN offset is read from the product's metadata
  caco-jax --config embed:r18_100k_caco --workdir workdir/embed \
    --config.embed.source=<product>.SAFE
  # every acquisition of a CACo archive, or of prepared records
  caco-jax --config embed --config.embed.kind=archive --config.embed.source=data/ \
    --config.embed.encoder=r18_100k_caco
  caco-jax --config embed --config.embed.kind=records \
    --config.embed.source=workdir/demo/tfds --config.embed.encoder=workdir/demo/encoder

The `:arg` is the encoder (config.embed.encoder). Writes the GeoParquet dataset
<workdir>/embeddings/ (a part per process, _manifest.json last; columns id, lat, lon, window,
nodata, embedding, geometry); runs on every process of a multi-host run. See docs/encoders.md.
"""

from caco_jax import config as config_lib


def get_config(arg=None):
    config = config_lib.for_tasks("embed")
    if arg:
        config.embed.encoder = arg
    return config
