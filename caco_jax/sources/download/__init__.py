"""Builds new CACo archives: Sentinel-2 time series for a locations file, in the published layout.

`client.Client` is the boundary with the imagery service (`earth_engine.EarthEngineClient` is the
real one); `downloader` decides what to fetch and checks it; `writer` publishes each location
atomically; `task` is the `download` task of run.py.
"""
