r"""Embeddings of Sentinel-2 images with an encoder export or an official encoder by name.

  # GeoTIFFs: a multi-band file, a folder of band files (L1C / L2A .jp2 or .tif), or a tree of them
  python run.py --config configs/embed.py --workdir workdir/embed \
    --config.embed.source=<product>.SAFE/GRANULE/<granule>/IMG_DATA/R10m \
    --config.embed.encoder=r18_100k_caco --config.embed.dn_offset=1000
  # every acquisition of a CACo archive, or of prepared records
  python run.py --config configs/embed.py --config.embed.kind=archive --config.embed.source=data/
  python run.py --config configs/embed.py --config.embed.kind=records \
    --config.embed.source=workdir/demo/tfds --config.embed.encoder=workdir/demo/encoder

Writes <workdir>/embeddings.npz and .parquet (id, lat, lon, window, embedding); see
docs/encoders.md.
"""

from caco_jax import config as config_lib


def get_config(arg=None):
    config = config_lib.for_tasks("embed")
    if arg:
        config.embed.encoder = arg
    return config
