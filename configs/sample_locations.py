r"""The paper's change-aware sample of locations, or SeCo's as the baseline.

  python run.py --config configs/sample_locations.py --workdir workdir/my_dataset
  python run.py --config configs/sample_locations.py:seco --workdir workdir/seco_sample
  python run.py --config configs/sample_locations.py --workdir workdir/alps \
      --config.sampling.num_locations=500 --config.sampling.num_cities=200 \
      --config.sampling.region="(5.0, 44.0, 16.0, 48.5)" --config.sampling.min_spacing_km=3.74

Writes <workdir>/locations/locations.{csv,geojson,png}.
"""

from caco_jax import config as config_lib


def get_config(sampler: str = "caco"):
    config = config_lib.for_tasks("sample_locations")
    if sampler == "seco":  # 50 km around the same cities, sea points kept
        config.sampling.sigma_km = 50.0
        config.sampling.reject_sea = False
    elif sampler != "caco":
        raise ValueError(f"configs/sample_locations.py:{sampler}: choose 'caco' or 'seco'")
    return config
