"""A world map of a sample: land in grey, locations as dots (matplotlib, no display needed)."""

from __future__ import annotations

import os


def plot_locations(locations, path: str, title: str = "") -> str:
    """Writes a PNG scatter of the locations over the land mask; returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from caco_jax.sources.sampling.landmask import land_grid

    figure, axes = plt.subplots(figsize=(12, 6), dpi=120)
    axes.imshow(
        land_grid(0.5), extent=(-180, 180, -90, 90), cmap="Greys", vmin=0, vmax=3, origin="upper"
    )
    axes.scatter(locations.lon, locations.lat, s=2, c="tab:red", linewidths=0)
    axes.set_xlim(-180, 180)
    axes.set_ylim(-90, 90)
    axes.set_xlabel("longitude")
    axes.set_ylabel("latitude")
    axes.set_title(title or f"{len(locations)} locations")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
    return path
