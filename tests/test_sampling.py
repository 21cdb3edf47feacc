"""Change-aware location sampling: distances, sea rejection, reproducibility, geography, files."""

import csv
import json

import numpy as np
import pytest
from scipy import stats

from caco_jax import config as config_lib
from caco_jax.settings import SettingsError
from caco_jax.sources.sampling import geodesy
from caco_jax.sources.sampling.cities import Cities, most_populous_cities
from caco_jax.sources.sampling.files import read_sites
from caco_jax.sources.sampling.landmask import is_land
from caco_jax.sources.sampling.sampler import sample_locations
from caco_jax.sources.sampling.task import run_task

SIGMA_M = 5_000.0


def _cities(*lat_lon):
    lat, lon = np.array(lat_lon, dtype=np.float64).T
    n = len(lat)
    return Cities(
        name=np.array([f"c{i}" for i in range(n)]),
        country=np.array(["XX"] * n),
        lat=lat,
        lon=lon,
        population=np.arange(n, 0, -1),
    )


@pytest.fixture(scope="module")
def world_cities():
    return most_populous_cities()


def test_city_list_is_the_10000_most_populous(world_cities):
    assert len(world_cities) == 10_000
    assert np.all(np.diff(world_cities.population) <= 0)
    assert world_cities.population[-1] >= 15_000
    again = most_populous_cities()
    np.testing.assert_array_equal(again.name, world_cities.name)
    europe = most_populous_cities(50, region=(-10.0, 35.0, 30.0, 60.0))
    assert np.all(
        (europe.lon >= -10) & (europe.lon <= 30) & (europe.lat >= 35) & (europe.lat <= 60)
    )
    with pytest.raises(ValueError, match="inside region"):
        most_populous_cities(10, region=(0.0, 0.0, 0.01, 0.01))


@pytest.mark.parametrize("lat", [0.0, 45.0, 70.0, 89.99, -89.99])
@pytest.mark.parametrize("lon", [0.0, 179.99, -179.99])
def test_destination_moves_by_the_offset_length_in_its_direction(lat, lon):
    rng = np.random.default_rng(0)
    east, north = rng.normal(0.0, SIGMA_M, size=(2, 200))
    lat2, lon2 = geodesy.destination(np.full(200, lat), np.full(200, lon), east, north)
    assert np.all((lon2 >= -180) & (lon2 < 180)) and np.all(np.abs(lat2) <= 90)
    np.testing.assert_allclose(
        geodesy.distance_m(lat, lon, lat2, lon2), np.hypot(east, north), atol=0.01
    )
    if abs(lat) < 80:  # away from the poles, north is north and east is east
        up, _ = geodesy.destination(lat, lon, 0.0, 1000.0)
        _, right = geodesy.destination(lat, lon, 1000.0, 0.0)
        assert up > lat and geodesy.wrap_longitude(right - lon) > 0


@pytest.mark.parametrize("sigma_m", [5_000.0, 50_000.0])
def test_distance_from_the_city_follows_a_rayleigh_law(sigma_m):
    # Inland cities at several latitudes (Madrid, Moscow, Denver, Ulaanbaatar, Brasilia).
    cities = _cities(
        (40.42, -3.70), (55.75, 37.62), (39.74, -104.99), (47.92, 106.92), (-15.79, -47.88)
    )
    locations = sample_locations(3000, cities, sigma_m=sigma_m, seed=1, reject_sea=False)
    distance = locations.distance_m
    assert stats.kstest(distance, stats.rayleigh(scale=sigma_m).cdf).pvalue > 0.01
    # The test has power: a 10 % wrong scale is rejected.
    assert stats.kstest(distance, stats.rayleigh(scale=1.1 * sigma_m).cdf).pvalue < 1e-3


def test_no_sea_points_and_sea_draws_are_redrawn(world_cities):
    locations = sample_locations(3000, world_cities, seed=2)
    assert np.all(is_land(locations.lat, locations.lon))
    assert locations.counts["sea"] > 0  # coastal cities do produce sea draws, which were redrawn
    assert locations.counts["draws"] == 3000 + locations.counts["sea"]
    # Redrawing around the same city keeps the distance law of inland cities: the median of a
    # Rayleigh(5 km) is 5.89 km; coastal rejections shift it only slightly.
    assert 5_000 < np.median(locations.distance_m) < 7_000


def test_sampling_is_reproducible(world_cities):
    a = sample_locations(500, world_cities, seed=7)
    b = sample_locations(500, world_cities, seed=7)
    c = sample_locations(500, world_cities, seed=8)
    np.testing.assert_array_equal(a.lat, b.lat)
    np.testing.assert_array_equal(a.lon, b.lon)
    np.testing.assert_array_equal(a.city, b.city)
    assert not np.array_equal(a.lat, c.lat)


def test_antimeridian_city():
    cities = _cities((65.0, 179.9))
    locations = sample_locations(2000, cities, seed=3, reject_sea=False)
    assert np.all((locations.lon >= -180) & (locations.lon < 180))
    # As many points are across the antimeridian as a Gaussian puts beyond 0.1 degree east...
    across_m = np.radians(0.1) * geodesy.EARTH_RADIUS_M * np.cos(np.radians(65.0))
    assert abs(np.mean(locations.lon < 0) - stats.norm.sf(across_m / SIGMA_M)) < 0.03
    # ... and the east offsets are centred on the city with the right spread, not split in two.
    east_m = (
        geodesy.wrap_longitude(locations.lon - 179.9)
        * np.pi / 180 * geodesy.EARTH_RADIUS_M * np.cos(np.radians(65.0))
    )  # fmt: skip
    assert abs(np.mean(east_m)) < 400
    assert 0.9 * SIGMA_M < np.std(east_m) < 1.1 * SIGMA_M
    assert stats.kstest(locations.distance_m, stats.rayleigh(scale=SIGMA_M).cdf).pvalue > 0.01


def test_polar_city_on_the_land_mask():
    # 5.5 km from the South Pole: draws cross the pole; Antarctica is land on the mask.
    cities = _cities((-89.95, 30.0))
    locations = sample_locations(1000, cities, seed=4)
    assert locations.counts["sea"] == 0
    assert np.all(locations.lat < -89.7)
    assert stats.kstest(locations.distance_m, stats.rayleigh(scale=SIGMA_M).cdf).pvalue > 0.01


def test_region_and_minimum_spacing(world_cities):
    region = (-10.0, 35.0, 30.0, 60.0)
    cities = most_populous_cities(100, region=region)
    locations = sample_locations(400, cities, seed=5, region=region, min_spacing_m=3_740.0)
    assert np.all((locations.lon >= -10) & (locations.lon <= 30))
    assert np.all((locations.lat >= 35) & (locations.lat <= 60))
    i, j = np.triu_indices(len(locations), k=1)
    pairwise = geodesy.distance_m(
        locations.lat[i], locations.lon[i], locations.lat[j], locations.lon[j]
    )
    assert pairwise.min() >= 3_740.0
    assert locations.counts["too_close"] > 0


def test_region_across_the_antimeridian():
    cities = _cities((-17.7, 178.0), (-18.1, -178.5))  # Fiji, both sides of 180
    region = (177.0, -19.0, -178.0, -16.0)
    locations = sample_locations(300, cities, seed=6, region=region, reject_sea=False)
    assert np.all((locations.lon >= 177.0) | (locations.lon <= -178.0))
    assert set(np.unique(locations.city)) == {0, 1}


def test_impossible_constraints_fail_clearly():
    cities = _cities((40.42, -3.70))
    with pytest.raises(RuntimeError, match="placed only"):
        sample_locations(
            20, cities, seed=0, reject_sea=False, min_spacing_m=50_000.0, max_draws_per_city=5
        )


def test_task_writes_csv_geojson_and_map(tmp_path):
    config = config_lib.for_tasks("sample_locations")
    config.sampling.num_locations = 40
    config_lib.validate(config)
    result = run_task(config_lib.resolve(config), str(tmp_path))
    assert result["num_locations"] == 40
    sites = read_sites(result["csv"])
    assert [s.location_id for s in sites] == [f"{i:06d}" for i in range(40)]
    with open(result["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["distance_km"]) < 40 and r["city"] for r in rows)
    with open(result["geojson"]) as f:
        features = json.load(f)["features"]
    assert [f["geometry"]["coordinates"] for f in features] == [[s.lon, s.lat] for s in sites]
    with open(result["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_sampling_config_names_the_key():
    config = config_lib.for_tasks("sample_locations")
    config.sampling.region = (10.0, 50.0, 20.0, 40.0)
    with pytest.raises(SettingsError, match=r"config\.sampling\.region"):
        config_lib.validate(config)
    config = config_lib.for_tasks("sample_locations")
    config.sampling.sigma_km = 0.0
    with pytest.raises(SettingsError, match=r"config\.sampling\.sigma_km"):
        config_lib.validate(config)
