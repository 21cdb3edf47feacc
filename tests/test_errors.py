"""Expected errors are one line and exit status 2; the rest keep their traceback
(caco_jax/runtime/errors.py)."""

import errno

import numpy as np
import pytest

from caco_jax.data import archive, geotiff
from caco_jax.models import convert, export, pretrained, registry
from caco_jax.runtime import errors
from caco_jax.settings import SettingsError


def chained(outer, inner):
    """``outer`` raised while handling ``inner``, as library code raises it."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer from inner
    except BaseException as error:
        return error


@pytest.mark.parametrize(
    "error",
    [
        archive.ArchiveError("caco10k.tar.gz: not a gzip file (starts with b'PK')"),
        geotiff.InputError("scene.tif: band B4 holds NaN values"),
        convert.ConversionError("weights.pth: not a ResNet state dict"),
        pretrained.DownloadError("cannot download https://x/y.pth (timed out)"),
        export.ExportError("load_encoder: /w/encoder is damaged"),
        SettingsError("config.train.batch_size: must be >= 2"),
        FileNotFoundError("config.eval.manual_dir='/d' lacks eurosat-train.txt"),
        FileExistsError(errno.EEXIST, "File exists", "/w/embeddings.npz"),
        PermissionError(errno.EACCES, "Permission denied", "/readonly/w"),
    ],
)
def test_expected_errors_are_one_line_with_status_2_and_no_traceback(error, capsys, monkeypatch):
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    assert errors.report(error) == errors.EXIT_STATUS == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("run.py: ") and "Traceback" not in err


def test_an_unknown_encoder_name_reads_as_its_message_not_a_quoted_key(capsys):
    with pytest.raises(registry.UnknownEncoderError) as raised:
        registry.get("r18_100k_cacoo")
    assert errors.report(raised.value, "caco-jax") == 2
    assert capsys.readouterr().err == (
        "caco-jax: 'r18_100k_cacoo' is neither an official encoder "
        f"({', '.join(pretrained.CHECKPOINTS)}) nor the path of an encoder export\n"
    )


def test_a_bug_keeps_its_traceback_and_status_1(capsys):
    error = chained(TypeError("unsupported operand"), KeyError("x"))
    assert errors.report(error) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.rstrip().endswith("TypeError: unsupported operand")


def test_the_environment_variable_adds_the_traceback_to_the_line(capsys, monkeypatch):
    monkeypatch.setenv(errors.TRACEBACK_ENV, "1")
    error = chained(archive.ArchiveError("a.tar.gz: truncated"), EOFError("end of stream"))
    assert errors.report(error) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "EOFError: end of stream" in err
    assert err.splitlines()[-1] == "run.py: a.tar.gz: truncated"


def test_a_full_disk_deep_in_a_library_is_its_root_cause_once(capsys):
    # TensorStore reports ENOSPC inside a ValueError that Orbax wraps again.
    disk = OSError(errno.ENOSPC, "No space left on device", "/w/checkpoints/4/state/d/1a2b")
    inner = chained(ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left"), disk)
    outer = chained(RuntimeError("async save failed:\n" + "detail\n" * 50), inner)
    assert errors.is_expected(outer) and errors.root_cause(outer) is disk
    assert errors.report(outer) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("run.py: out of disk space (") and "No space left" in line


def test_tfds_missing_manual_dir_is_one_line_with_what_to_do(capsys):
    error = AssertionError(
        "Manual directory /data/eurosat does not exist or is empty. Create it and download/extract "
        "dataset artifacts in there using instructions:\nDownload EuroSAT..."
    )
    assert errors.report(error) == 2
    assert capsys.readouterr().err == (
        "run.py: Manual directory /data/eurosat does not exist or is empty: point "
        "config.eval.manual_dir at the folder holding the download (see docs/evaluation.md)\n"
    )
    assert not errors.is_expected(AssertionError("an internal invariant broke"))


def test_ctrl_c_is_one_line_and_status_130(capsys):
    assert errors.report(KeyboardInterrupt()) == 130
    assert capsys.readouterr().err == "run.py: interrupted\n"


def test_an_imagenet_row_of_other_bands_is_refused_before_any_row_is_evaluated(
    tmp_path, monkeypatch
):
    """eval_land_cover reads RGB records: an ImageNet export of 12 bands is named before the
    checkpoint row's probe runs (it used to fail after it, with no results written)."""
    from caco_jax import config as config_lib
    from caco_jax.data import layout
    from caco_jax.data.normalization import EXPORT_KEY, Normalization
    from caco_jax.evaluators import common, land_cover

    rgb = Normalization.rgb()
    twelve = Normalization(
        bands=layout.BANDS, low=(0.0,) * 12, high=(255.0,) * 12, mean=(0.5,) * 12, std=(0.2,) * 12
    )
    export.save_encoder(
        tmp_path / "encoder", common.random_encoder(18, 3, 1, width=8), {EXPORT_KEY: rgb.to_json()}
    )
    export.save_encoder(
        tmp_path / "imagenet",
        common.random_encoder(18, 12, 2, width=8),
        {EXPORT_KEY: twelve.to_json()},
    )
    config = config_lib.for_tasks("eval_land_cover")
    config.eval.imagenet_checkpoint = str(tmp_path / "imagenet")
    images = np.zeros((4, 264, 264, 3), np.uint8)
    monkeypatch.setattr(
        land_cover,
        "load_synthetic_land_cover",
        lambda *args: (images, np.arange(4) % 2, np.arange(4)),
    )
    probed = []
    monkeypatch.setattr(land_cover.inference, "extract_features", lambda *a, **k: probed.append(a))
    with pytest.raises(common.EncoderInputError) as refused:
        land_cover.run_task(config_lib.resolve(config), str(tmp_path))
    assert str(refused.value).startswith(
        f"the imagenet encoder ({tmp_path / 'imagenet'}): it takes bands ['B1', 'B2'"
    )
    assert probed == []


def test_a_download_that_does_not_read_is_one_line(tmp_path, capsys):
    """The evaluation datasets' readers raise ValueError naming the file (a corrupt EuroSAT zip);
    a ValueError raised elsewhere is a bug and keeps its traceback."""
    from caco_jax.evaluators.datasets import eurosat as eurosat_builder

    (tmp_path / "EuroSAT_RGB.zip").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError) as raised:
        eurosat_builder.find_images(str(tmp_path), "rgb")
    assert errors.report(raised.value) == 2
    assert capsys.readouterr().err == (
        f"run.py: EuroSAT: {tmp_path / 'EuroSAT_RGB.zip'} is not a readable zip file (File is not "
        "a zip file)\n"
    )
    assert not errors.is_expected(chained(ValueError("a bug's ValueError"), KeyError("x")))
