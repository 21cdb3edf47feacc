"""Encoder exports carry their input: normalisation, image size, method; old exports load as RGB."""

import pytest

from caco_jax.data.normalization import EXPORT_KEY, Normalization
from caco_jax.evaluators import common
from caco_jax.models import export

FOUR_BANDS = Normalization(
    bands=("B2", "B3", "B4", "B8"),
    low=(1.0, 2.0, 3.0, 4.0),
    high=(90.0, 100.0, 110.0, 120.0),
    mean=(0.3, 0.35, 0.4, 0.45),
    std=(0.2, 0.21, 0.22, 0.23),
)


@pytest.fixture(scope="module")
def four_band_model():
    return common.random_encoder(18, 4, seed=0)


def test_export_records_and_returns_its_input(tmp_path, four_band_model):
    metadata = {EXPORT_KEY: FOUR_BANDS.to_json(), "image_size": 64, "method": "caco"}
    export.save_encoder(tmp_path / "enc", four_band_model, metadata)
    model, loaded = export.load_encoder(tmp_path / "enc")
    assert export.input_normalization(loaded) == FOUR_BANDS
    assert (loaded["image_size"], loaded["method"], loaded["depth"]) == (64, "caco", 18)
    assert model.in_channels == 4


def test_export_without_input_loads_as_official_rgb_with_a_warning(tmp_path):
    export.save_encoder(
        tmp_path / "old", common.random_encoder(18, 3, seed=1), {"source": "old run"}
    )
    _, metadata = export.load_encoder(tmp_path / "old")
    assert EXPORT_KEY not in metadata  # the metadata is what the export holds
    with pytest.warns(UserWarning, match="records no input normalisation"):
        assert export.input_normalization(metadata) == Normalization.rgb()
    with pytest.raises(ValueError, match="takes 4 channels, for which there is no default"):
        export.input_normalization({**metadata, "in_channels": 4})


def test_input_that_contradicts_the_encoder_is_refused(tmp_path, four_band_model):
    with pytest.raises(ValueError, match=r"has 3 bands \['B4', 'B3', 'B2'\].*4 channels"):
        export.save_encoder(
            tmp_path / "bad", four_band_model, {EXPORT_KEY: Normalization.rgb().to_json()}
        )
    broken = FOUR_BANDS.to_json()
    del broken["std"]
    with pytest.raises(ValueError, match=r"'input'\] is not a normalisation.*'std'"):
        export.save_encoder(tmp_path / "bad", four_band_model, {EXPORT_KEY: broken})
    with pytest.raises(ValueError, match=r"'image_size'\] = 8"):
        export.save_encoder(
            tmp_path / "bad", four_band_model, {EXPORT_KEY: FOUR_BANDS.to_json(), "image_size": 8}
        )
    assert not (tmp_path / "bad").exists()
