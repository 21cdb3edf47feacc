"""Raw Sentinel-2 values -> an encoder's input: the one transform that `embed`, the change maps and
the Python API apply, and that the PyTorch export's JSON spells out step by step.

Raw values come on one of three scales (``scale``):

  uint8        the CACo archives' values: reflectance x 255, truncated (what the records hold)
  dn           Sentinel-2 L1C or L2A digital numbers (uint16): reflectance x 10000, plus 1000 from
               processing baseline 04.00 on (pass ``offset=1000`` for those products, or read it
               from the product's metadata with `product_offset`)
  reflectance  floats, 1.0 = full reflectance (L1C top of atmosphere, L2A surface)

``"auto"`` takes uint8 arrays as uint8, other integer arrays as digital numbers and floats as
reflectance. An encoder's input is then, per band in its export's order:

  1. u = the archive's uint8 value: for digital numbers floor(clip(d - offset, 0, 10000) * 255 /
     10000) (`layout.to_archive_uint8`), for reflectance floor(clip(r, 0, 1) * 255)
  2. s = floor(clip((u - low) / (high - low), 0, 1) * 255) / 255, the export's stretch
  3. a bilinear resize to the encoder's ``image_size`` when the image has another size
  4. x = (s - mean) / std, the export's standardisation

Values that cannot be on the stated scale are refused with one line naming the band: NaN, negative
numbers, uint8-scale values above 255, reflectance above `MAX_REFLECTANCE` (digital numbers read as
reflectance), or float digital numbers with a fractional part.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree

import numpy as np

from caco_jax.data import layout
from caco_jax.data.normalization import Normalization
from caco_jax.runtime import errors

SCALES = ("auto", "uint8", "dn", "reflectance")
# The brightest Sentinel-2 reflectances (snow, clouds, specular water) stay well below this; a
# float array above it holds digital numbers, not reflectance.
MAX_REFLECTANCE = 2.0
# A product's metadata file, at the root of its .SAFE folder, and the elements holding the offset
# added to its digital numbers (negative: reflectance = (DN + offset) / 10000).
PRODUCT_METADATA = ("MTD_MSIL1C.xml", "MTD_MSIL2A.xml")
OFFSET_ELEMENTS = ("RADIO_ADD_OFFSET", "BOA_ADD_OFFSET")
# How far above a band's folder the metadata may be (L2A: SAFE/GRANULE/<tile>/IMG_DATA/R10m).
_PRODUCT_DEPTH = 5


class RawValueError(errors.UserError, ValueError):
    """Raw values that cannot be on the stated scale; the message names the band."""


def scale_of(values: np.ndarray, scale: str = "auto") -> str:
    """The scale ``values`` are on: ``scale`` itself, or for "auto" the one their dtype says."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if scale != "auto":
        return scale
    dtype = np.asarray(values).dtype
    if dtype == np.uint8:
        return "uint8"
    if np.issubdtype(dtype, np.integer):
        return "dn"
    return "reflectance"


def to_archive_uint8(
    values, scale: str = "auto", *, offset: float = 0.0, name: str = "values"
) -> np.ndarray:
    """Step 1: host raw values -> the archive's uint8 scale, after checking that they can be on
    ``scale`` (`RawValueError` naming ``name``, e.g. the band's file, otherwise)."""
    values = np.asarray(values)
    scale = scale_of(values, scale)
    if np.issubdtype(values.dtype, np.floating) and np.isnan(values).any():
        raise RawValueError(
            f"{name}: {int(np.isnan(values).sum())} NaN values; mask them as nodata or fill them"
        )
    if values.size and values.min() < 0 and scale != "reflectance":
        raise RawValueError(f"{name}: negative values (down to {values.min()}) on scale {scale}")
    top = values.max() if values.size else 0
    if scale == "uint8":
        if top > 255 or not np.issubdtype(values.dtype, np.integer):
            raise RawValueError(
                f"{name}: {values.dtype} values up to {top} are not the archive's uint8 scale "
                "(Sentinel-2 digital numbers? set scale='dn', with offset=1000 for processing "
                "baseline 04.00 and later)"
            )
        return values.astype(np.uint8)
    if scale == "reflectance":
        if top > MAX_REFLECTANCE:
            raise RawValueError(
                f"{name}: reflectance up to {top:g}, above {MAX_REFLECTANCE} (digital numbers? "
                "set scale='dn')"
            )
        return np.floor(np.clip(values.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    if np.issubdtype(values.dtype, np.floating):
        if not np.array_equal(values, np.round(values)):
            raise RawValueError(
                f"{name}: digital numbers with fractions (reflectance? set scale='reflectance')"
            )
        values = values.astype(np.int64)
    return layout.to_archive_uint8(values, offset=offset)


def product_offset(folder: str) -> float | None:
    """The offset to subtract from the digital numbers of the Sentinel-2 product that ``folder``
    belongs to, from its metadata (``MTD_MSIL1C.xml`` or ``MTD_MSIL2A.xml`` in the folder or up to
    its ``.SAFE`` root): 1000 from processing baseline 04.00 on, 0 before (no offset element).
    None when no metadata is found."""
    folder = os.path.abspath(folder)
    for _ in range(_PRODUCT_DEPTH):
        for name in PRODUCT_METADATA:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return _offset_in_metadata(path)
        parent = os.path.dirname(folder)
        if folder.endswith(".SAFE") or parent == folder:
            break
        folder = parent
    return None


def _offset_in_metadata(path: str) -> float:
    try:
        elements = ElementTree.parse(path).iter()
        offsets = {float(e.text) for e in elements if e.tag.rsplit("}", 1)[-1] in OFFSET_ELEMENTS}
    except (ElementTree.ParseError, ValueError, TypeError) as error:
        raise RawValueError(f"{path}: not a readable product metadata file ({error})") from None
    if len(offsets) > 1:
        raise RawValueError(
            f"{path}: the bands have different offsets {sorted(offsets)}; give each band's "
            "digital numbers less its own offset as reflectance"
        )
    return -offsets.pop() if offsets else 0.0


def encoder_input(archive_uint8, normalization: Normalization, image_size: int, xp=np):
    """Steps 2-4 on uint8 images [N, H, W, C] (NumPy, or JAX with ``xp=jnp``, traced or not):
    the float32 input [N, image_size, image_size, C] of the encoder."""
    x = normalization.stretch(archive_uint8, xp)
    if x.shape[1:3] != (image_size, image_size):
        import jax

        x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[-1]), "bilinear")
    return normalization.standardize(x, xp)


def recipe(normalization: Normalization, image_size: int) -> dict:
    """Every step from raw values to the encoder's input, in words and numbers: what the PyTorch
    export's JSON records, so that another implementation gives the same input."""
    return {
        "1_raw_to_uint8": (
            "u, per band: the CACo archives' values as they are; Sentinel-2 digital numbers d "
            "(uint16, L1C or L2A): u = floor(clip(d - offset, 0, 10000) * 255 / 10000) with offset "
            "1000 for processing baseline 04.00 and later, else 0 (integer arithmetic); "
            "reflectance r: u = floor(clip(r, 0, 1) * 255)"
        ),
        "2_stretch": (
            "s = floor(clip((u - stretch_low[c]) / (stretch_high[c] - stretch_low[c]), 0, 1) * "
            "255) / 255, per band c in `bands` order, in float32"
        ),
        "3_resize": (
            f"only for images that are not {image_size} x {image_size}: a bilinear resize of s to "
            "that size (jax.image.resize 'bilinear': half-pixel centres, antialiased when "
            f"shrinking); give the encoder {image_size} px images to skip this step"
        ),
        "4_standardize": "x = (s - mean[c]) / std[c], per band c; torch takes x as NCHW",
        "image_size": image_size,
        "bands": list(normalization.bands),
    }
