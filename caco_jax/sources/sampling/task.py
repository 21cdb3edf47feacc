"""Task `sample_locations`: the paper's change-aware sample (or SeCo's): CSV, GeoJSON and a map."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from caco_jax.runtime.workdir import Workdir
from caco_jax.settings import Section
from caco_jax.sources.sampling.cities import most_populous_cities
from caco_jax.sources.sampling.files import write_locations
from caco_jax.sources.sampling.plot import plot_locations
from caco_jax.sources.sampling.sampler import sample_locations

PLOT_FILE = "locations.png"


@dataclasses.dataclass(frozen=True)
class SamplingSettings(Section):
    """`config.sampling`: the change-aware location sampling of the paper (SeCo's: sigma 50 km,
    sea points kept)."""

    SECTION = "sampling"
    num_locations: int = 1000
    num_cities: int = 10000  # the paper picks among the 10,000 most populous cities
    sigma_km: float = 5.0  # per-axis std of the Gaussian around a city; SeCo's baseline: 50
    reject_sea: bool = True  # redraw points in the sea (GLOBE land mask); SeCo: False
    region: tuple[float, ...] = ()  # (west, south, east, north) degrees; () = the whole world
    min_spacing_km: float = 0.0  # > 0 keeps locations apart; 3.74 = no two patches overlap
    max_draws_per_city: int = 100  # then the slot draws another city (islands, crowding)
    output: str = ""  # folder of locations.csv/.geojson/.png; "" = <workdir>/locations

    def validate(self) -> None:
        self.require(self.num_locations >= 1, "num_locations", "must be >= 1")
        self.require(self.num_cities >= 1, "num_cities", "must be >= 1")
        self.require(self.sigma_km > 0, "sigma_km", "must be > 0")
        self.require(self.min_spacing_km >= 0, "min_spacing_km", "must be >= 0")
        self.require(self.max_draws_per_city >= 1, "max_draws_per_city", "must be >= 1")
        region = self.region
        self.require(
            not region
            or (
                len(region) == 4
                and -180 <= region[0] <= 180
                and -180 <= region[2] <= 180
                and -90 <= region[1] < region[3] <= 90
            ),
            "region",
            "must be () or (west, south, east, north) in degrees with south < north "
            "(west > east crosses the antimeridian)",
        )

    def output_dir(self, workdir) -> str:
        return self.output or Workdir.of(workdir).locations


def run_task(settings, workdir) -> dict:
    """Task `sample_locations`: the sample as CSV, GeoJSON and a map in the output folder."""
    s, seed = settings.sampling, settings.seed
    region = tuple(s.region)
    cities = most_populous_cities(s.num_cities, region=region)
    locations = sample_locations(
        s.num_locations,
        cities,
        sigma_m=s.sigma_km * 1000.0,
        seed=seed,
        reject_sea=s.reject_sea,
        region=region,
        min_spacing_m=s.min_spacing_km * 1000.0,
        max_draws_per_city=s.max_draws_per_city,
    )
    folder = s.output_dir(workdir)
    paths = write_locations(locations, folder)
    paths["plot"] = plot_locations(
        locations,
        os.path.join(folder, PLOT_FILE),
        title=f"{len(locations)} locations, sigma {s.sigma_km:g} km around "
        f"{len(cities)} cities (seed {seed})",
    )
    distance_km = locations.distance_m / 1000.0
    return dict(
        num_locations=len(locations),
        num_cities=len(cities),
        median_distance_km=float(np.median(distance_km)),
        counts=locations.counts,
        **paths,
    )
