"""Raw Sentinel-2 values -> the archive's uint8 scale (`data.sentinel2`): each scale's mapping
written out in numpy, values that cannot be on the stated scale refused with one line naming the
band, and the digital-number offset read from a product's metadata."""

import numpy as np
import pytest

from caco_jax.data import sentinel2


def test_each_scale_maps_onto_the_archive_scale():
    dn = np.array([0, 999, 1000, 1040, 6000, 11000, 65535], np.uint16)
    expected = np.floor(np.clip((dn.astype(float) - 1000) / 10000, 0, 1) * 255)
    np.testing.assert_array_equal(sentinel2.to_archive_uint8(dn, offset=1000), expected)
    np.testing.assert_array_equal(  # whole-number floats are digital numbers too
        sentinel2.to_archive_uint8(dn.astype(np.float32), "dn", offset=1000), expected
    )
    reflectance = np.array([-0.01, 0.0, 0.2, 0.999, 1.0, 1.7], np.float32)
    np.testing.assert_array_equal(
        sentinel2.to_archive_uint8(reflectance),
        np.floor(np.clip(reflectance.astype(float), 0, 1) * 255),
    )
    uint8 = np.array([0, 17, 255], np.uint8)
    np.testing.assert_array_equal(sentinel2.to_archive_uint8(uint8), uint8)
    assert [sentinel2.scale_of(a) for a in (uint8, dn, reflectance)] == [
        "uint8",
        "dn",
        "reflectance",
    ]


@pytest.mark.parametrize(
    "values, scale, message",
    [
        (np.array([1.0, np.nan], np.float32), "auto", r"B04: 1 NaN values; mask them"),
        (np.array([-3, 5], np.int16), "dn", r"B04: negative values \(down to -3\) on scale dn"),
        (
            np.array([3, 300], np.uint16),
            "uint8",
            r"B04: uint16 values up to 300 are not .* scale='dn'",
        ),
        (np.array([0.2, 2500.0], np.float32), "reflectance", r"B04: reflectance up to 2500.*'dn'"),
        (np.array([1000.0, 1000.5]), "dn", r"B04: digital numbers with fractions"),
        (np.array([1, 2], np.uint8), "kelvin", r"scale must be one of"),
    ],
)
def test_values_off_the_stated_scale_are_refused_naming_the_band(values, scale, message):
    with pytest.raises(ValueError, match=message):
        sentinel2.to_archive_uint8(values, scale, name="B04")


def test_product_offset_is_read_from_the_metadata(tmp_path):
    l1c = tmp_path / "S2B_MSIL1C_20190612.SAFE"
    image_data = l1c / "GRANULE" / "L1C_T33TVF" / "IMG_DATA"
    image_data.mkdir(parents=True)
    assert sentinel2.product_offset(str(image_data)) is None  # no metadata
    (l1c / "MTD_MSIL1C.xml").write_text(
        "<Level-1C_User_Product><General_Info/></Level-1C_User_Product>"
    )
    assert sentinel2.product_offset(str(image_data)) == 0.0  # before baseline 04.00: no offset
    (l1c / "MTD_MSIL1C.xml").write_text(
        "<p><RADIO_ADD_OFFSET band_id='0'>-1000</RADIO_ADD_OFFSET>"
        "<RADIO_ADD_OFFSET band_id='1'>-1000</RADIO_ADD_OFFSET></p>"
    )
    assert sentinel2.product_offset(str(image_data)) == 1000.0
    (l1c / "MTD_MSIL1C.xml").write_text(
        "<p><RADIO_ADD_OFFSET>-1000</RADIO_ADD_OFFSET><RADIO_ADD_OFFSET>-900</RADIO_ADD_OFFSET></p>"
    )
    with pytest.raises(sentinel2.RawValueError, match=r"MTD_MSIL1C\.xml: the bands have different"):
        sentinel2.product_offset(str(image_data))
    (l1c / "MTD_MSIL1C.xml").write_text("<p>")
    with pytest.raises(sentinel2.RawValueError, match=r"MTD_MSIL1C\.xml: not a readable product"):
        sentinel2.product_offset(str(image_data))
