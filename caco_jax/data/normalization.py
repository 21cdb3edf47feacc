"""The input normalisation of an encoder: which bands, how raw values become its input.

One definition, read by pretraining (`caco_jax.pretrain.augment`), the encoder exports
(`caco_jax.models.export` records it) and everything that feeds an exported encoder new images.
Raw values are the archive's uint8 (surface reflectance x 255). An encoder's input is

  stretch:      floor(clip((raw - low) / (high - low), 0, 1) * 255) / 255, per band
  standardize:  (stretched - mean) / std, per band

The stretch is SeCo's reader (a linear map of each band's (low, high) range to uint8, then
``ToTensor``), so its output is quantised to 1/255 exactly as the official pipeline's.
``rgb()`` is the official RGB recipe; ``from_records`` computes the same recipe's numbers for the
12 bands of ``all_bands`` records, for which no official numbers exist.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from caco_jax.data import layout

# The key under which exports record it (see `to_json`).
EXPORT_KEY = "input"


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Bands in channel order, their raw stretch range, and the mean/std of the stretched values."""

    bands: tuple[str, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        sizes = {len(v) for v in (self.bands, self.low, self.high, self.mean, self.std)}
        if len(sizes) != 1:
            raise ValueError(f"Normalization: bands, low, high, mean, std differ in length: {self}")
        if any(hi <= lo for lo, hi in zip(self.low, self.high, strict=True)):
            raise ValueError(f"Normalization: every high must exceed its low: {self}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"Normalization: every std must be > 0: {self}")

    @property
    def num_bands(self) -> int:
        return len(self.bands)

    @property
    def is_rgb(self) -> bool:
        """The encoder reads the paper's RGB bands (B4, B3, B2), in that order."""
        return tuple(self.bands) == layout.RGB_BANDS

    @classmethod
    def rgb(cls) -> Normalization:
        """The official RGB input: SeCo's (B4, B3, B2) stretch and the ImageNet mean/std."""
        stretch = [layout.RGB_STRETCH[b] for b in layout.RGB_BANDS]
        return cls(
            bands=layout.RGB_BANDS,
            low=tuple(lo for lo, _ in stretch),
            high=tuple(hi for _, hi in stretch),
            mean=layout.IMAGENET_MEAN,
            std=layout.IMAGENET_STD,
        )

    def to_json(self) -> dict:
        """The JSON form recorded in exports under ``EXPORT_KEY``."""
        return {
            "bands": list(self.bands),
            "stretch_low": list(self.low),
            "stretch_high": list(self.high),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_json(cls, record: dict) -> Normalization:
        """Inverse of `to_json`; a missing or malformed field is a ValueError naming it."""
        fields = {
            "bands": "bands",
            "low": "stretch_low",
            "high": "stretch_high",
            "mean": "mean",
            "std": "std",
        }
        missing = [key for key in fields.values() if key not in record]
        if missing:
            raise ValueError(f"normalisation record lacks {missing}: {record}")
        values = {name: tuple(record[key]) for name, key in fields.items()}
        values["bands"] = tuple(str(b) for b in values["bands"])
        for name in ("low", "high", "mean", "std"):
            values[name] = tuple(float(v) for v in values[name])
        return cls(**values)

    # The array functions work on numpy and JAX arrays alike (the ops are NumPy-API generic).

    def stretch(self, raw, xp=np, dtype=None):
        """Raw values [..., C] -> [0, 1], quantised to 1/255 as SeCo's reader casts to uint8;
        computed in float32 (or ``dtype``)."""
        dtype = dtype or xp.float32
        low = xp.asarray(self.low, dtype)
        high = xp.asarray(self.high, dtype)
        scaled = (xp.asarray(raw, dtype) - low) / (high - low)
        return xp.floor(xp.clip(scaled * 255.0, 0.0, 255.0)) / 255.0

    def standardize(self, x, xp=np):
        return (x - xp.asarray(self.mean, x.dtype)) / xp.asarray(self.std, x.dtype)

    def __call__(self, raw, xp=np):
        """stretch then standardize: raw values [..., C] -> the encoder's input."""
        return self.standardize(self.stretch(raw, xp), xp)


# The all-bands statistics are computed at prepare time over this many locations (the default of
# config.input.stats_locations) and stored in the records' metadata under STORED_KEY as
# {"locations": n, "normalization": Normalization.to_json()}: pretraining reads no pixels for them.
STATS_LOCATIONS = 64
STORED_KEY = "input_statistics"


def for_records(
    builder_config: str, source: Sequence, *, num_locations: int = STATS_LOCATIONS
) -> Normalization:
    """The pretraining input of ``builder_config`` records: `Normalization.rgb()` for ``rgb``; for
    ``all_bands`` the statistics stored at prepare time when they were computed over
    ``num_locations`` locations (no pixels read), else `from_records`."""
    if builder_config == "rgb":
        return Normalization.rgb()
    stored = getattr(source, "stored_statistics", None) or {}
    if stored.get("locations") == num_locations:
        return Normalization.from_json(stored["normalization"])
    return from_records(source, num_locations=num_locations)


def statistics_record(source: Sequence, num_locations: int = STATS_LOCATIONS) -> dict:
    """What the builder stores under STORED_KEY for ``all_bands`` records."""
    normalization = from_records(source, num_locations=num_locations)
    return {"locations": num_locations, "normalization": normalization.to_json()}


def from_records(source: Sequence, *, num_locations: int) -> Normalization:
    """The official recipe's numbers for the 12 bands of ``all_bands`` records.

    SeCo publishes stretch ranges for RGB only, so for all bands they are computed the same way
    for every band: the stretch range is the 2nd-98th percentile of the band's raw values, mean and
    std those of the stretched [0, 1] values, over ``num_locations`` locations evenly spaced
    through the records (deterministic, a few seconds). ``source[i]`` is location i's arrays
    (`records.Records`).
    """
    count = min(num_locations, len(source))
    picks = np.linspace(0, len(source) - 1, count).round().astype(int)
    stacked = np.concatenate(
        [_bands_in_order(source[int(i)]["pixels"]) for i in picks], axis=0
    )  # [N, 12] raw values
    low = np.percentile(stacked, 2, axis=0)
    high = np.maximum(np.percentile(stacked, 98, axis=0), low + 1.0)
    stretched = np.floor(np.clip((stacked - low) / (high - low), 0.0, 1.0) * 255.0) / 255.0
    return Normalization(
        bands=layout.BANDS,
        low=tuple(low.tolist()),
        high=tuple(high.tolist()),
        mean=tuple(stretched.mean(axis=0).tolist()),
        std=tuple(np.maximum(stretched.std(axis=0), 1e-3).tolist()),
    )


def _bands_in_order(groups: dict) -> np.ndarray:
    """Raw pixel values [N, 12] of one location's resolution groups, in layout.BANDS order."""
    columns = {}
    for group, bands in layout.GROUP_BANDS.items():
        arr = np.asarray(groups[group])
        for channel, band in enumerate(bands):
            columns[band] = arr[..., channel].reshape(-1)
    # Subsample the finer groups so each band contributes pixels from the whole area alike.
    size = min(len(c) for c in columns.values())
    return np.stack(
        [columns[b][:: len(columns[b]) // size][:size] for b in layout.BANDS], axis=1
    ).astype(np.float64)


# The bands of each pixel feature of the records (`rgb`, or the resolution groups of `all_bands`).
FEATURE_BANDS = {"rgb": layout.RGB_BANDS, **layout.GROUP_BANDS}


def merge_band_groups(groups: dict, bands=layout.BANDS, feature_bands=None):
    """The ``bands`` of pixel groups ({feature: [..., h, w, c]}, channels as ``feature_bands``
    (default `FEATURE_BANDS`) lists them) as one float32 JAX array [..., H, W, len(bands)] on the
    finest group's grid.

    Coarser groups (20 m, 60 m) are resized bilinearly (half-pixel centres) to the finest grid and
    rounded back to integer values, as a uint8 resize would. Pretraining merges the `all_bands`
    groups with it on the device, `embed` on the host; a band no group holds is a ValueError.
    """
    import jax
    import jax.numpy as jnp

    finest = max(groups.values(), key=lambda x: x.shape[-2])
    height, width = finest.shape[-3:-1]
    channels = {}
    for feature, names in (feature_bands or FEATURE_BANDS).items():
        if feature not in groups:
            continue
        x = jnp.asarray(groups[feature], jnp.float32)
        shape = (*x.shape[:-3], height, width, x.shape[-1])
        if x.shape != shape:
            x = jnp.round(jax.image.resize(x, shape, method="linear"))
        for channel, band in enumerate(names):
            channels[band] = x[..., channel]
    missing = [b for b in bands if b not in channels]
    if missing:
        raise ValueError(f"bands {missing} are not in the pixels (they hold {sorted(channels)})")
    return jnp.stack([channels[b] for b in bands], axis=-1)
