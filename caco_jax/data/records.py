"""Random access to the prepared `caco_geography` records, without TensorFlow.

`open_records` gives a `tfds.data_source` (len, getitem, usable by grain): record i is location i of
the split, and the training item of its window h is 2 * i + h. `location_arrays` turns one record
into the numpy arrays the input pipeline needs.
"""

from __future__ import annotations

import numpy as np

from caco_jax.data import builder as builder_lib


def open_records(data_dir: str, builder_config: str = "rgb", split: str = "train"):
    """The prepared records of `caco_geography/<builder_config>` under `data_dir`; never prepares.

    Raises FileNotFoundError naming the folder when they are not there.
    """
    builder = builder_lib.CacoGeography(config=builder_config, data_dir=data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{builder.data_dir}: no prepared caco_geography/{builder_config} records; run the "
            "'prepare' task (python run.py --config ... with 'prepare' in config.tasks) first"
        )
    return builder.as_data_source(split=split)


def location_arrays(example) -> dict:
    """One decoded record as numpy arrays.

    Returns {"location_id": str, "lat", "lon": float, "window": int64 [T], "date": [T] str,
    "cloud": float32 [T], "pixels": uint8 [T, 264, 264, 3] for `rgb`, or for `all_bands` a dict
    {"bands_10m": [T, 264, 264, 4], "bands_20m": [T, 132, 132, 6], "bands_60m": [T, 44, 44, 2]}}.
    """
    acquisitions = example["acquisitions"]
    groups = [
        name for name in ("rgb", "bands_10m", "bands_20m", "bands_60m") if name in acquisitions
    ]
    pixels = {name: np.asarray(acquisitions[name], np.uint8) for name in groups}
    return {
        "location_id": _text(example["location_id"]),
        "lat": float(example["lat"]),
        "lon": float(example["lon"]),
        "window": np.asarray(acquisitions["window"], np.int64),
        "date": [_text(d) for d in acquisitions["date"]],
        "cloud": np.asarray(acquisitions["cloud"], np.float32),
        "pixels": pixels["rgb"] if groups == ["rgb"] else pixels,
    }


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def location_table(source) -> list[tuple[str, float, float]]:
    """(location_id, lat, lon) of every record, in record order."""
    table = []
    for i in range(len(source)):
        example = source[i]
        table.append((_text(example["location_id"]), float(example["lat"]), float(example["lon"])))
    return table
