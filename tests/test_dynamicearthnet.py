"""DynamicEarthNet: the TFDS builder on a tiny download in the published layout, the metrics and
loss against hand-computed values, tiling, and the evaluator end to end through run.py without
TensorFlow."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
import rasterio
from helpers import xla_flags

from caco_jax.data.normalization import EXPORT_KEY, Normalization
from caco_jax.evaluators import common, metrics, tiling
from caco_jax.evaluators import dynamicearthnet as segmentation
from caco_jax.evaluators.datasets import dynamicearthnet as builder
from caco_jax.models import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64  # the real images are 1024 x 1024

# (cube, zone, planet grid folder, label tile, label folder separator, label date separator, dtype)
CUBES = {
    "1311_3077_13": ("10N", "26E-183N", "10N-122W-40N-L3H-SR", "_", "_", "int16"),
    # Label folder named with a hyphen and dates with hyphens, as some are in the download.
    "2196_3885_13": ("17N", "9E-42N", "17N-83W-9N-L3H-SR", "-", "-", "uint16"),
    "1330_3107_13": ("10N", "26E-184N", "10N-121W-39N-L3H-SR", "_", "_", "int16"),
    # The two cubes the official README restores to train.txt.
    "1417_3281_13": ("11N", "13E-187N", "11N-117W-33N-L3H-SR", "_", "_", "int16"),
    "2235_3403_13": ("17N", "10E-39N", "17N-81W-30N-L3H-SR", "_", "_", "int16"),
}
TRAIN_LISTED = {"1311_3077_13": ("2018-01", "2018-02"), "2196_3885_13": ("2018-01", "2019-12")}
VALIDATION = {"1330_3107_13": ("2018-03", "2019-07")}


def planet_folder(cube):
    zone, grid = CUBES[cube][:2]
    return f"planet/{zone}/{grid}/{cube}"


def label_file(cube, month):
    zone, _, tile, folder_sep, date_sep, _ = CUBES[cube]
    date = month.replace("-", date_sep) + f"{date_sep}01"
    return f"labels/{cube}{folder_sep}{zone}/Labels/Raster/{tile}/{tile}-{date}.tif"


def write_tif(path, bands):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with rasterio.open(
        path, "w", driver="GTiff", height=bands.shape[1], width=bands.shape[2],
        count=bands.shape[0], dtype=bands.dtype.name, crs="EPSG:32610",
        transform=rasterio.transform.from_origin(500000, 4000000, 3, 3), compress="lzw",
    ) as dst:  # fmt: skip
        dst.write(bands)


def fake_month(rng, dtype):
    """A 4-band BGRN image and a 7-band one-hot label whose classes are visible in the image, with
    unlabelled, snow and doubly labelled pixels."""
    classes = rng.integers(0, 7, (SIZE // 8, SIZE // 8)).repeat(8, 0).repeat(8, 1)
    label = np.zeros((7, SIZE, SIZE), np.uint8)
    for c in range(7):
        label[c][classes == c] = 255
    label[:, :2, :3] = 0  # unlabelled
    label[:, 5, 5] = 0
    label[1, 5, 5] = label[4, 5, 5] = 255  # two bands set: the last one wins
    brightness = np.array([300, 900, 1500, 2100, 2700, 3300, 9000])[classes]
    bgrn = brightness[None] * np.array([0.6, 0.8, 1.0, 1.4])[:, None, None]
    bgrn = (bgrn + rng.normal(0, 100, bgrn.shape)).clip(0, 30000).astype(dtype)
    if dtype == "uint16":
        bgrn[2, 0, 0] = 40000  # red above int16: clipped to 32767
    return bgrn, label


def write_download(root, rng=None):
    """The DynamicEarthNet download in its published layout, extracted; returns {(cube, month):
    (expected rgb int16, expected label)} of every split month."""
    rng = rng or np.random.default_rng(0)
    months = {**{c: m for c, m in TRAIN_LISTED.items()}, **VALIDATION}
    for cube in builder.RESTORED_TRAIN_CUBES:
        months[cube] = builder.LABELLED_MONTHS
    expected = {}
    for cube, cube_months in months.items():
        for month in cube_months:
            bgrn, label = fake_month(rng, CUBES[cube][5])
            write_tif(os.path.join(root, planet_folder(cube), "PF-SR", f"{month}-01.tif"), bgrn)
            write_tif(
                os.path.join(root, planet_folder(cube), "PF-QA", f"{month}-01.tif"),
                np.zeros((1, SIZE, SIZE), np.int16),
            )
            write_tif(os.path.join(root, label_file(cube, month)), label)
            with open(os.path.join(root, label_file(cube, month)) + ".aux.xml", "w") as f:
                f.write("<PAMDataset/>")
            rgb = np.clip(np.moveaxis(bgrn[[2, 1, 0]], 0, -1), 0, 32767).astype(np.int16)
            classes = np.full((SIZE, SIZE), 255, np.uint8)
            for c in range(7):
                classes[label[c] == 255] = c
            expected[cube, month] = (rgb, classes)
    # Days other than the first, and a vector label, are in the download but not read.
    write_tif(
        os.path.join(root, planet_folder("1311_3077_13"), "PF-SR", "2018-01-02.tif"),
        np.full((4, SIZE, SIZE), 7, np.int16),
    )
    vector = os.path.join(
        root, "labels/1311_3077_13_10N/Labels/Vector/Water/x/x-2018_01_01.geojson"
    )
    os.makedirs(os.path.dirname(vector))
    with open(vector, "w") as f:
        f.write("{}")
    splits = os.path.join(root, builder.SPLITS_FOLDER)
    os.makedirs(splits)
    for name, listed in (("train.txt", TRAIN_LISTED), ("val.txt", VALIDATION)):
        lines = [
            # A doubled slash (torchgeo's test split files have one) reads like one.
            f"/reprocess-cropped/UTM-24000/{planet_folder(cube)[7:]}//PF-SR "
            f"/{label_file(cube, month).replace(f'{cube}-', f'{cube}_')} {month}"
            for cube, cube_months in listed.items()
            for month in cube_months
        ]
        with open(os.path.join(splits, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return expected


def zip_download(extracted, zipped):
    """The same download as mediaTUM serves it: one planet.<zone>.zip per zone and labels.zip."""
    os.makedirs(zipped)
    shutil.copytree(
        os.path.join(extracted, builder.SPLITS_FOLDER), os.path.join(zipped, builder.SPLITS_FOLDER)
    )
    for zone in sorted({zone for zone, *_ in CUBES.values()}):
        with zipfile.ZipFile(os.path.join(zipped, f"planet.{zone}.zip"), "w") as archive:
            base = os.path.join(extracted, "planet", zone)
            for folder, _, files in os.walk(base):
                for name in files:
                    path = os.path.join(folder, name)
                    archive.write(path, os.path.relpath(path, extracted))
    with zipfile.ZipFile(os.path.join(zipped, "labels.zip"), "w") as archive:
        for folder, _, files in os.walk(os.path.join(extracted, "labels")):
            for name in files:
                path = os.path.join(folder, name)
                archive.write(path, os.path.relpath(path, extracted))


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamicearthnet")
    expected = write_download(str(root / "extracted"))
    zip_download(str(root / "extracted"), str(root / "zipped"))
    return root, expected


def records(data_dir):
    source = builder.DynamicEarthNet(config="rgb", data_dir=str(data_dir))
    out = {}
    for split in ("train", "validation"):
        data = source.as_data_source(split)
        for i in range(len(data)):
            example = data[i]
            key = (common.read_text(example["location"]), common.read_text(example["month"]))
            out[split, *key] = (example["image"], example["label"])
    return out


def test_builder_reads_the_zipped_and_the_extracted_download(download, tmp_path):
    root, expected = download
    builder.prepare(str(root / "zipped"), str(tmp_path / "from_zip"))
    from_zip = records(str(tmp_path / "from_zip"))

    listed = {(c, m) for c, months in TRAIN_LISTED.items() for m in months}
    restored = {(c, m) for c in builder.RESTORED_TRAIN_CUBES for m in builder.LABELLED_MONTHS}
    validation = {(c, m) for c, months in VALIDATION.items() for m in months}
    assert {k[1:] for k in from_zip if k[0] == "train"} == listed | restored
    assert {k[1:] for k in from_zip if k[0] == "validation"} == validation
    for (_, cube, month), (image, label) in from_zip.items():
        assert image.dtype == np.int16 and label.dtype == np.uint8
        np.testing.assert_array_equal(image, expected[cube, month][0])
        np.testing.assert_array_equal(label, expected[cube, month][1])
    assert from_zip["train", "2196_3885_13", "2018-01"][0][0, 0, 0] == 32767  # clipped uint16
    assert from_zip["train", "1311_3077_13", "2018-01"][1][5, 5] == 4  # the last band set wins

    builder.prepare(str(root / "extracted"), str(tmp_path / "from_folders"))
    from_folders = records(str(tmp_path / "from_folders"))
    assert from_folders.keys() == from_zip.keys()
    for key, (image, label) in from_zip.items():
        np.testing.assert_array_equal(from_folders[key][0], image)
        np.testing.assert_array_equal(from_folders[key][1], label)


def test_builder_names_what_is_missing_or_malformed(download, tmp_path):
    root, _ = download
    manual = tmp_path / "download"
    shutil.copytree(root / "extracted", manual)
    missing = manual / label_file("1330_3107_13", "2019-07")
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match="no label of 1330_3107_13 2019-07"):
        builder.prepare(str(manual), str(tmp_path / "tfds"))
    write_tif(str(missing), np.zeros((6, SIZE, SIZE), np.uint8))
    with pytest.raises(ValueError, match=r"2019_07_01\.tif has 6 bands of uint8, expected 7"):
        builder.prepare(str(manual), str(tmp_path / "tfds"))
    (manual / builder.SPLITS_FOLDER / "val.txt").write_text("not a split line\n")
    with pytest.raises(ValueError, match=r"val\.txt:1 is not"):
        builder.prepare(str(manual), str(tmp_path / "tfds"))


def test_miou_from_the_confusion_matrix_matches_hand_computed_values():
    targets = np.array([0, 0, 1, 1, 2, 255])
    predictions = np.array([0, 1, 1, 1, 0, 2])
    confusion = metrics.confusion_matrix(predictions, targets, 4)
    np.testing.assert_array_equal(
        confusion, [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    )
    result = metrics.intersection_over_union(confusion)
    # class 0: 1 / (1 + 1 + 1); class 1: 2 / (2 + 1); class 2: 0 / 1; class 3: no union, left out.
    assert result["iou"][:3] == pytest.approx([1 / 3, 2 / 3, 0.0]) and result["iou"][3] is None
    assert result["miou"] == pytest.approx(1 / 3)


def test_soft_dice_loss_matches_hand_computed_value_and_ignores_snow_and_unlabelled():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    logits = jnp.asarray(np.log(probabilities)[None, None])  # [1, 1, 3 pixels, 3 classes]
    targets = jnp.asarray(np.array([[[0, 1, segmentation.IGNORE]]], np.uint8))
    # Class 0: 2 * 0.7 / (0.8 + 1); class 1: 2 * 0.6 / (0.8 + 1); class 2 absent: left out.
    expected = 1.0 - (1.4 / 1.8 + 1.2 / 1.8) / 2
    assert float(segmentation.soft_dice_loss(logits, targets, 3)) == pytest.approx(expected)
    perfect = jnp.asarray(np.log(np.eye(3)[[0, 1, 2]] * 0.999999 + 1e-7)[None, None])
    assert float(segmentation.soft_dice_loss(perfect, targets, 3)) == pytest.approx(0.0, abs=1e-5)
    labels = np.array([0, 5, 6, 255], np.uint8)
    np.testing.assert_array_equal(segmentation.targets_from_labels(labels), [0, 5, 255, 255])


def test_tiles_stitch_back_and_crops_cut_images_and_maps_alike():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (70, 100, 3)).astype(np.uint8)
    tiles, grid = tiling.tile(image, 32)
    assert grid == (3, 4) and tiles.shape == (12, 32, 32, 3)
    np.testing.assert_array_equal(tiling.stitch(tiles, grid, (70, 100)), image)
    images = rng.integers(0, 255, (3, 40, 50, 3)).astype(np.uint8)
    maps = images[..., 1].copy()
    crops, crop_maps = tiling.random_crops((images, maps), np.array([2, 0]), 16, rng)
    assert crops.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(crops[..., 1], crop_maps)
    flipped, flipped_maps = tiling.flip_rotate((crops, crop_maps), rng)
    np.testing.assert_array_equal(flipped[..., 1], flipped_maps)
    with pytest.raises(ValueError, match="smaller than 64"):
        tiling.random_crops((images,), np.array([0]), 64, rng)


def test_the_encoder_input_comes_from_the_export_and_must_be_rgb(tmp_path):
    model = common.random_encoder(18, 3, seed=0)

    def rows(path):
        return common.encoders(common.EvalSettings(checkpoint=str(path)), 0, str(tmp_path))

    plain = export.save_encoder(tmp_path / "plain", model, {"method": "test"})
    with pytest.warns(UserWarning, match="assuming the official RGB input"):
        checkpoint, _ = rows(plain)
    assert segmentation.check_rgb(checkpoint) == Normalization.rgb()
    custom = Normalization.rgb().to_json() | {"mean": [0.3, 0.3, 0.3]}
    recorded = export.save_encoder(tmp_path / "recorded", model, {EXPORT_KEY: custom})
    # The random row has no export: it takes the checkpoint's input, as it takes its shape.
    assert [segmentation.check_rgb(row).mean for row in rows(recorded)] == [(0.3, 0.3, 0.3)] * 2
    other = custom | {"bands": ["B8", "B4", "B3"]}
    wrong = export.save_encoder(tmp_path / "wrong", model, {EXPORT_KEY: other})
    with pytest.raises(ValueError, match="takes bands"):
        segmentation.check_rgb(rows(wrong)[0])


def test_run_py_evaluates_frozen_and_finetuned_without_tensorflow(download, tmp_path):
    root, _ = download
    blocker = tmp_path / "blocker" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(
        "raise ImportError('tensorflow is blocked in this test')\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocker"), ROOT]),
        "XLA_FLAGS": xla_flags(1),
        "JAX_PLATFORMS": "cpu",
    }
    blocked = subprocess.run(
        [sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True
    )
    assert "tensorflow is blocked" in blocked.stderr

    model = common.random_encoder(18, 3, seed=1)
    recorded = Normalization.rgb().to_json() | {"mean": [0.4, 0.4, 0.4]}
    checkpoint = export.save_encoder(tmp_path / "encoder", model, {EXPORT_KEY: recorded})
    # The same input for every row, so that they share one compilation.
    imagenet_model = common.random_encoder(18, 3, seed=2)
    imagenet = export.save_encoder(tmp_path / "imagenet", imagenet_model, {EXPORT_KEY: recorded})
    settings = [
        f"--config.eval.checkpoint={checkpoint}",
        f"--config.eval.manual_dir={root / 'zipped'}",
        f"--config.eval.data_dir={tmp_path / 'tfds'}",
        "--config.dynamicearthnet.tile_size=32",
        "--config.dynamicearthnet.batch_size=16",
        "--config.dynamicearthnet.epochs=1",
    ]
    runs = {
        "frozen": [f"--config.eval.imagenet_checkpoint={imagenet}"],
        "finetune": ["--config.eval.random_baseline=False"],
    }
    for mode, extra in runs.items():
        result = subprocess.run(
            [sys.executable, "run.py", "--config", f"configs/eval_dynamicearthnet.py:{mode}",
             "--workdir", str(tmp_path / "w"), *settings, *extra],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        with open(common.metrics_path(str(checkpoint), f"eval_dynamicearthnet_{mode}")) as f:
            record = json.load(f)
        assert record["mode"] == mode
        assert record["train_locations"] == sorted([*TRAIN_LISTED, *builder.RESTORED_TRAIN_CUBES])
        assert (record["train_images"], record["validation_images"]) == (52, 2)
        expected_rows = ["checkpoint", "random", "imagenet"] if mode == "frozen" else ["checkpoint"]
        assert [row["encoder"] for row in record["rows"]] == expected_rows
        assert record["rows"][0]["input"]["mean"] == [0.4, 0.4, 0.4]
        for row in record["rows"]:
            assert 0.0 <= row["miou"] <= 1.0
            assert np.sum(row["confusion"]) > 0  # every labelled validation pixel is counted
        assert f"eval_dynamicearthnet_{mode} (percent)" in result.stdout


def test_config_selects_the_mode_and_validates():
    from caco_jax import config as config_lib

    spec = importlib.util.spec_from_file_location(
        "eval_dynamicearthnet", os.path.join(ROOT, "configs", "eval_dynamicearthnet.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for arg, finetune in ((None, False), ("frozen", False), ("finetune", True)):
        config = module.get_config(arg)
        config_lib.validate(config)
        assert config.tasks == ("eval_dynamicearthnet",)
        assert config.dynamicearthnet.finetune == finetune
    with pytest.raises(ValueError, match="'linear'"):
        module.get_config("linear")
