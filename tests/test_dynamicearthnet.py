"""DynamicEarthNet: the TFDS builder on tiny downloads in their published layouts (the dataset's
planet zips and training labels, the separate validation/test labels, the split files in either
folder, the layout quirks), the metrics and loss against hand-computed values, tiling, the encoder
input, and both modes of the evaluator in-process (run.py runs it in test_evaluators.py)."""

import importlib.util
import json
import os
import shutil
import zipfile

import downloads
import jax.numpy as jnp
import numpy as np
import pytest

from caco_jax import config as config_lib
from caco_jax.data.normalization import EXPORT_KEY, Normalization
from caco_jax.evaluators import common, fit, metrics, protocol, tiling
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


SPLITS = ("train", "validation", "test")


def records(data_dir):
    source = builder.DynamicEarthNet(config="rgb", data_dir=str(data_dir))
    out = {}
    for split in SPLITS:
        data = source.as_data_source(split)
        for i in range(len(data)):
            example = data[i]
            key = (common.read_text(example["location"]), common.read_text(example["month"]))
            out[split, *key] = (example["image"], example["label"])
    return out


def test_builder_reads_the_zipped_and_the_extracted_downloads(download, tmp_path):
    """Zipped: planet.<zone>.zip, labels.zip with the training labels only, the validation/test
    labels' own zip, split files in split_info/. Extracted: the same folders, split files in
    dynnet_training_splits/. Label folders with hyphens, dates with hyphens, 1417_3281_13 without
    Labels/, and the split files' own path prefixes, all in both."""
    root, expected = download
    with zipfile.ZipFile(root / "zipped" / "labels.zip") as labels:
        labelled = {name.split("/")[1][:12] for name in labels.namelist()}
    assert labelled == {*downloads.TRAIN_LISTED, *builder.RESTORED_TRAIN_CUBES}
    builder.prepare(str(root / "zipped"), str(tmp_path / "from_zip"))
    from_zip = records(str(tmp_path / "from_zip"))

    def months(table):
        return {(cube, month) for cube, cube_months in table.items() for month in cube_months}

    restored = {c: builder.LABELLED_MONTHS for c in builder.RESTORED_TRAIN_CUBES}
    for split, table in (
        ("train", {**downloads.TRAIN_LISTED, **restored}),
        ("validation", downloads.VALIDATION),
        ("test", downloads.TEST),
    ):
        assert {k[1:] for k in from_zip if k[0] == split} == months(table)
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


def test_builder_names_what_is_missing_and_the_download_that_holds_it(download, tmp_path):
    root, _ = download
    manual = tmp_path / "download"
    shutil.copytree(root / "extracted", manual)

    def prepare(**kwargs):
        builder.prepare(str(manual), str(tmp_path / "tfds"), **kwargs)

    evaluation_label = manual / downloads.label_file(
        "1330_3107_13", "2019-07", downloads.EVALUATION_LABELS
    )
    os.rename(evaluation_label, tmp_path / "kept.tif")
    with pytest.raises(FileNotFoundError, match=r"validation cube 1330_3107_13 2019-07 .*1738088"):
        prepare()
    os.rename(tmp_path / "kept.tif", evaluation_label)
    training_label = manual / downloads.label_file("1417_3281_13", "2019-12")
    os.remove(training_label)
    with pytest.raises(FileNotFoundError, match=r"train cube 1417_3281_13 2019-12 .*labels\.zip"):
        prepare()
    downloads.write_tif(
        str(training_label), np.zeros((6, downloads.PLANET_SIZE, downloads.PLANET_SIZE), np.uint8)
    )
    with pytest.raises(ValueError, match=r"2019_12_01\.tif has 6 bands of uint8, expected 7"):
        prepare()
    os.remove(manual / downloads.planet_folder("1487_3335_13") / "PF-SR" / "2019-02-01.tif")
    with pytest.raises(FileNotFoundError, match=r"no image of 1487_3335_13 2019-02 .*planet"):
        prepare()

    splits = manual / builder.SPLITS_FOLDER
    os.rename(splits, tmp_path / "splits")
    with pytest.raises(FileNotFoundError, match=r"dynnet_training_splits/ or split_info/"):
        prepare()
    shutil.copytree(tmp_path / "splits", manual / "split_info")
    shutil.copytree(tmp_path / "splits", splits)
    (splits / "test.txt").write_text(downloads.split_line("1330_3107_13", "2018-03") + "\n")
    with pytest.raises(ValueError, match=r"dynnet_training_splits/test\.txt and .*split_info/test"):
        prepare()
    with pytest.raises(ValueError, match=r"cubes in both validation and test: \['1330_3107_13'\]"):
        prepare(split_dir=str(splits))
    (splits / "val.txt").write_text("not a split line\n")
    with pytest.raises(ValueError, match=r"val\.txt:1 is not"):
        prepare(split_dir=str(splits))
    with pytest.raises(FileNotFoundError, match=r"config\.dynamicearthnet\.split_dir: no folder"):
        prepare(split_dir=str(tmp_path / "nowhere"))


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


def test_the_encoder_input_is_unit_reflectance_or_the_exports_and_must_be_rgb(tmp_path):
    model = common.random_encoder(10, 3, seed=0, width=8)

    def rows(path, **shared):
        settings = common.EvalSettings(checkpoint=str(path), **shared)
        return common.encoders(settings, 0, str(tmp_path))

    plain = export.save_encoder(tmp_path / "plain", model, {"method": "test"})
    with pytest.warns(UserWarning, match="assuming the official RGB input"):
        checkpoint, _ = rows(plain)
    assert segmentation.check_rgb(checkpoint) == Normalization.rgb()
    custom = Normalization.rgb().to_json() | {"mean": [0.3, 0.3, 0.3]}
    recorded = export.save_encoder(tmp_path / "recorded", model, {EXPORT_KEY: custom})
    # The random row has no export: it takes the checkpoint's input, as it takes its shape.
    norms = [segmentation.check_rgb(row) for row in rows(recorded)]
    assert [norm.mean for norm in norms] == [(0.3, 0.3, 0.3)] * 2
    images = jnp.asarray(np.array([[[[0, 51, 255]]]], np.uint8))
    # The default, SeCo's segmentation input: reflectance in [0, 1], no mean/std.
    unit = segmentation.encoder_input(norms[0], "unit")(images)
    np.testing.assert_allclose(unit, [[[[0.0, 0.2, 1.0]]]])
    np.testing.assert_allclose(
        segmentation.encoder_input(norms[0], "export")(images), norms[0](images, jnp), rtol=1e-6
    )

    # A row whose bands Planet lacks stops the run before any data is read (manual_dir is unset:
    # loading would fail with another message).
    other = custom | {"bands": ["B8", "B4", "B3"]}
    wrong = export.save_encoder(tmp_path / "wrong", model, {EXPORT_KEY: other})
    config = config_lib.for_tasks("eval_dynamicearthnet")
    config.eval.checkpoint = str(recorded)
    config.eval.imagenet_checkpoint = str(wrong)
    evaluation = segmentation.DynamicEarthNetEvaluation(config_lib.resolve(config))
    with pytest.raises(ValueError, match=r"takes bands .*Planet imagery has red, green, blue only"):
        protocol.run(evaluation, str(tmp_path))


def test_frozen_and_finetuned_segmentation_of_every_encoder_row(download, tmp_path, one_device):
    """Frozen (the default protocol: [0, 1] input, training-mode BatchNorm) on the val split for
    three rows sharing one compilation; fine-tuned with the earlier protocol's options (the
    export's input, eval-mode BatchNorm) on the test split."""
    root, _ = download
    recorded = Normalization.rgb().to_json() | {"mean": [0.4, 0.4, 0.4]}
    checkpoint = export.save_encoder(
        tmp_path / "encoder", common.random_encoder(10, 3, seed=1, width=8), {EXPORT_KEY: recorded}
    )
    imagenet = export.save_encoder(
        tmp_path / "imagenet",
        common.random_encoder(10, 3, seed=2, width=8),
        {EXPORT_KEY: recorded},
    )
    config = config_lib.for_tasks("eval_dynamicearthnet")
    config.eval.checkpoint = str(checkpoint)
    config.eval.manual_dir = str(root / "zipped")
    config.eval.data_dir = str(tmp_path / "tfds")
    config.dynamicearthnet.tile_size = 32
    config.dynamicearthnet.batch_size = 16
    config.dynamicearthnet.epochs = 2
    settings = config_lib.resolve(config)
    runs = {
        "eval_dynamicearthnet_frozen": (
            {"imagenet_checkpoint": str(imagenet)},
            {},
        ),
        "eval_dynamicearthnet_finetune_test": (
            {"random_baseline": False},
            {"finetune": True, "split": "test", "input": "export", "encoder_bn": "eval"},
        ),
    }
    for task, (shared, protocol_settings) in runs.items():
        run = settings.replace(eval=shared, dynamicearthnet=protocol_settings)
        compiled = fit.train_step._cache_size()
        segmentation.run_task(run, str(tmp_path / "w"))
        with open(common.metrics_path(str(checkpoint), task)) as f:
            record = json.load(f)
        finetune = "finetune" in task
        assert fit.train_step._cache_size() - compiled == 1  # every row, one compilation
        assert record["mode"] == ("finetune" if finetune else "frozen") and record["complete"]
        assert record["train_locations"] == sorted(
            [*downloads.TRAIN_LISTED, *builder.RESTORED_TRAIN_CUBES]
        )
        evaluated = "test" if finetune else "validation"
        assert (record["train_images"], record[f"{evaluated}_images"]) == (52, 2)
        assert record[f"{evaluated}_locations"] == sorted(
            downloads.TEST if finetune else downloads.VALIDATION
        )
        assert [row["encoder"] for row in record["rows"]] == (
            ["checkpoint"] if finetune else ["checkpoint", "random", "imagenet"]
        )
        for row in record["rows"]:
            assert row["input"]["mean"] == [0.4, 0.4, 0.4]
            assert row["encoder_input"] == ("export" if finetune else "unit")
            assert [entry["epoch"] for entry in row["history"]] == [2]  # the last epoch only
            assert 0.0 <= row["miou"] <= 1.0 and row["best_miou"] == row["miou"]
            # Every labelled pixel of the split is counted once: 2 images of 64 x 64 px, less
            # the unlabelled and snow pixels.
            labelled = sum(
                np.sum(segmentation.targets_from_labels(expected[1]) != segmentation.IGNORE)
                for (cube, _), expected in download[1].items()
                if cube in (downloads.TEST if finetune else downloads.VALIDATION)
            )
            assert np.sum(row["confusion"]) == labelled


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
