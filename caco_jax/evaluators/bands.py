"""Which bands an evaluated encoder reads, and how a dataset's raw values reach it.

An encoder export records its input under `normalization.EXPORT_KEY` (bands in channel order,
stretch, mean/std); an export without that key is an RGB encoder (B4, B3, B2). Each evaluation
takes the encoder's bands by name from its dataset and, where the task has no official input recipe,
brings them to the pretraining archive's scale before the export's own normalisation:

  archive uint8 = floor(clip(DN / 10000 * 255, 0, 255))

The CACo archives store surface reflectance x 255 as uint8, and Sentinel-2 products store
reflectance x 10000 as uint16 (L2A: surface reflectance, L1C: top of atmosphere), so dividing by
10000 and multiplying by 255 puts a product's DN on the archive's scale. For L2A (BigEarthNet) this
is the same quantity; for L1C (EuroSAT MS, OSCD) it is top-of-atmosphere reflectance, which is
brighter than surface reflectance (haze, mostly in B1-B4): no atmospheric correction is attempted,
so an all-bands encoder sees slightly brighter inputs there than in pretraining (see
docs/evaluation.md).
"""

from __future__ import annotations

from caco_jax.data import layout
from caco_jax.data.normalization import EXPORT_KEY, Normalization

# Sentinel-2 products store reflectance x this as uint16.
REFLECTANCE_SCALE = 10000.0


def canonical(band: str) -> str:
    """Band names as `layout.BANDS` spells them: 'B01' -> 'B1', 'B8A' stays."""
    band = band.upper()
    if band.startswith("B0"):
        return "B" + band[2:]
    return band


def encoder_input(metadata: dict) -> Normalization:
    """The encoder's input recorded in its export metadata; RGB (`Normalization.rgb`) without it."""
    if EXPORT_KEY not in metadata:
        return Normalization.rgb()
    return Normalization.from_json(metadata[EXPORT_KEY])


def is_rgb(norm: Normalization) -> bool:
    return tuple(norm.bands) == layout.RGB_BANDS


def channel_indices(dataset: str, available, needed) -> list[int]:
    """Index in `available` (the dataset's bands, any spelling) of each band in `needed`; a band the
    dataset lacks is a ValueError naming both sides."""
    names = [canonical(b) for b in available]
    missing = [b for b in needed if canonical(b) not in names]
    if missing:
        raise ValueError(
            f"{dataset} has bands {', '.join(names)}; the encoder needs {', '.join(needed)} "
            f"(missing {', '.join(missing)})"
        )
    return [names.index(canonical(b)) for b in needed]


def to_archive_scale(dn, xp):
    """Sentinel-2 DN (reflectance x 10000) -> the archive's uint8 values (as float32)."""
    scaled = xp.asarray(dn, xp.float32) * (255.0 / REFLECTANCE_SCALE)
    return xp.floor(xp.clip(scaled, 0.0, 255.0))
