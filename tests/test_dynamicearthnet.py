"""DynamicEarthNet: the TFDS builder on a tiny download in the published layout, the metrics and
loss against hand-computed values, tiling, and the evaluator end to end through run.py without
TensorFlow."""

import importlib.util
import json
import os
import shutil

import downloads
import jax.numpy as jnp
import numpy as np
import pytest

from caco_jax import config as config_lib
from caco_jax.data.normalization import EXPORT_KEY, Normalization
from caco_jax.evaluators import common, metrics, tiling
from caco_jax.evaluators import dynamicearthnet as segmentation
from caco_jax.evaluators.datasets import dynamicearthnet as builder
from caco_jax.models import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamicearthnet")
    expected = downloads.write_download(str(root / "extracted"))
    downloads.zip_download(str(root / "extracted"), str(root / "zipped"))
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

    listed = {(c, m) for c, months in downloads.TRAIN_LISTED.items() for m in months}
    restored = {(c, m) for c in builder.RESTORED_TRAIN_CUBES for m in builder.LABELLED_MONTHS}
    validation = {(c, m) for c, months in downloads.VALIDATION.items() for m in months}
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
    missing = manual / downloads.label_file("1330_3107_13", "2019-07")
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match="no label of 1330_3107_13 2019-07"):
        builder.prepare(str(manual), str(tmp_path / "tfds"))
    downloads.write_tif(
        str(missing), np.zeros((6, downloads.PLANET_SIZE, downloads.PLANET_SIZE), np.uint8)
    )
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


def test_frozen_and_finetuned_segmentation_of_every_encoder_row(download, tmp_path, one_device):
    """Both modes in-process (run.py runs the frozen one in test_evaluators.py); the ImageNet row
    has the checkpoint's input, so that every row shares one compilation."""
    root, _ = download
    model = common.random_encoder(18, 3, seed=1)
    recorded = Normalization.rgb().to_json() | {"mean": [0.4, 0.4, 0.4]}
    checkpoint = export.save_encoder(tmp_path / "encoder", model, {EXPORT_KEY: recorded})
    imagenet_model = common.random_encoder(18, 3, seed=2)
    imagenet = export.save_encoder(tmp_path / "imagenet", imagenet_model, {EXPORT_KEY: recorded})
    config = config_lib.for_tasks("eval_dynamicearthnet")
    config.eval.checkpoint = str(checkpoint)
    config.eval.manual_dir = str(root / "zipped")
    config.eval.data_dir = str(tmp_path / "tfds")
    config.dynamicearthnet.tile_size = 32
    config.dynamicearthnet.batch_size = 16
    config.dynamicearthnet.epochs = 1
    settings = config_lib.resolve(config)
    runs = {
        "frozen": {"imagenet_checkpoint": str(imagenet)},
        "finetune": {"random_baseline": False},
    }
    for mode, shared in runs.items():
        run = settings.replace(eval=shared, dynamicearthnet={"finetune": mode == "finetune"})
        segmentation.run_task(run, str(tmp_path / "w"))
        with open(common.metrics_path(str(checkpoint), f"eval_dynamicearthnet_{mode}")) as f:
            record = json.load(f)
        assert record["mode"] == mode
        assert record["train_locations"] == sorted(
            [*downloads.TRAIN_LISTED, *builder.RESTORED_TRAIN_CUBES]
        )
        assert (record["train_images"], record["validation_images"]) == (52, 2)
        expected_rows = ["checkpoint", "random", "imagenet"] if mode == "frozen" else ["checkpoint"]
        assert [row["encoder"] for row in record["rows"]] == expected_rows
        assert record["rows"][0]["input"]["mean"] == [0.4, 0.4, 0.4]
        for row in record["rows"]:
            assert 0.0 <= row["miou"] <= 1.0
            assert np.sum(row["confusion"]) > 0  # every labelled validation pixel is counted


def test_config_selects_the_mode_and_validates():
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
