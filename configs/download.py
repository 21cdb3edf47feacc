r"""Downloads a new CACo archive from Earth Engine for a locations file, in the published layout.

  pip install -r requirements-earthengine.txt && earthengine authenticate
  python run.py --config configs/sample_locations.py --workdir workdir/my_dataset
  python run.py --config configs/download.py --workdir workdir/my_dataset \
      --config.download.project=my-cloud-project
  python run.py --config configs/pretrain.py:caco,r18,100k --workdir workdir/my_dataset \
      --config.data.archive=workdir/my_dataset/archive

Rerunning the same command resumes: finished locations are skipped, interrupted ones redone.
"""

from caco_jax import config as config_lib


def get_config():
    return config_lib.for_tasks("download")
