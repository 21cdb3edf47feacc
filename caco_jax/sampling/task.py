"""Task `sample_locations`: the paper's change-aware sample (or SeCo's): CSV, GeoJSON and a map."""

from __future__ import annotations

import os

import numpy as np

from caco_jax.sampling.cities import most_populous_cities
from caco_jax.sampling.files import write_locations
from caco_jax.sampling.plot import plot_locations
from caco_jax.sampling.sampler import sample_locations

PLOT_FILE = "locations.png"


def output_dir(config, workdir: str) -> str:
    return config.sampling.output or os.path.join(workdir, "locations")


def run_task(config, workdir: str) -> dict:
    s = config.sampling
    region = tuple(s.region)
    cities = most_populous_cities(s.num_cities, region=region)
    locations = sample_locations(
        s.num_locations,
        cities,
        sigma_m=s.sigma_km * 1000.0,
        seed=config.seed,
        reject_sea=s.reject_sea,
        region=region,
        min_spacing_m=s.min_spacing_km * 1000.0,
        max_draws_per_city=s.max_draws_per_city,
    )
    folder = output_dir(config, workdir)
    paths = write_locations(locations, folder)
    paths["plot"] = plot_locations(
        locations,
        os.path.join(folder, PLOT_FILE),
        title=f"{len(locations)} locations, sigma {s.sigma_km:g} km around "
        f"{len(cities)} cities (seed {config.seed})",
    )
    distance_km = locations.distance_m / 1000.0
    return dict(
        num_locations=len(locations),
        num_cities=len(cities),
        median_distance_km=float(np.median(distance_km)),
        counts=locations.counts,
        **paths,
    )
