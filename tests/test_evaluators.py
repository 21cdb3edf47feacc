"""The evaluators end to end on tiny fake datasets written in the exact TFDS / OSCD formats (no
network)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import rasterio
import tensorflow_datasets as tfds
from flax import nnx
from PIL import Image

from caco_jax import config as config_lib
from caco_jax.evaluators import (
    change_detection,
    common,
    linear_probe,
    multilabel,
    oscd_builder,
    tiling,
    unet,
)
from caco_jax.models import export

EUROSAT_CLASSES = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
)  # fmt: skip
BIGEARTHNET_LABELS = sorted(
    [*multilabel.MERGED_LABELS, *multilabel.UNMAPPED_LABELS]
    + [c for c in multilabel.CLASSES_19 if c not in multilabel.MERGED_LABELS.values()]
)


class FakeEurosat(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS `eurosat/rgb`'s feature names and splits; pixels as a Tensor (Image features need
    TF)."""

    name = "eurosat"
    VERSION = tfds.core.Version("2.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="rgb")]  # noqa: RUF012

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(64, 64, 3), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=EUROSAT_CLASSES),
                    "filename": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for label, name in enumerate(EUROSAT_CLASSES):
            for n in range(4):
                colour = np.array([25 * label, 255 - 25 * label, 120], np.float32)
                image = np.clip(colour + rng.normal(0, 10, (64, 64, 3)), 0, 255).astype(np.uint8)
                filename = f"{name}_{n + 1}.jpg"
                yield filename, {"image": image, "label": label, "filename": filename}


class FakeBigEarthNet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS `bigearthnet/rgb`'s feature names (43 label names, `filename` = patch name); 40x40
    pixels."""

    name = "bigearthnet"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="rgb")]  # noqa: RUF012

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(40, 40, 3), dtype=np.uint8),
                    "labels": tfds.features.Sequence(
                        tfds.features.ClassLabel(names=BIGEARTHNET_LABELS)
                    ),
                    "filename": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(1)
        for n in range(24):
            labels = sorted(rng.choice(len(BIGEARTHNET_LABELS), size=2, replace=False).tolist())
            image = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            name = f"S2A_MSIL2A_20170613T101031_{n}_48"
            yield name, {"image": image, "labels": labels, "filename": name}


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "encoder"
    export.save_encoder(path, common.random_encoder(18, 3, seed=5), {"method": "test"})
    return str(path)


def eval_config(encoder_dir, tmp_path, **eval_values):
    config = config_lib.base_config()
    config.eval.checkpoint = encoder_dir
    config.eval.data_dir = str(tmp_path / "tfds")
    config.eval.epochs = 3
    config.eval.milestones = (1, 2)
    config.eval.extract_batch_size = 16
    config.eval.random_baseline = False
    for key, value in eval_values.items():
        config.eval[key] = value
    config_lib.validate(config)
    return config


def read_metrics(encoder_dir, task):
    with open(common.metrics_path(encoder_dir, task)) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------------
# Linear probe.


def test_linear_head_learns_separable_features():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 256)
    features = rng.normal(size=(256, 8)).astype(np.float32)
    features[np.arange(256), labels] += 4.0
    settings = linear_probe.HeadSettings(
        epochs=10, batch_size=32, learning_rate=0.05, milestones=(6, 8)
    )
    result = linear_probe.probe_top1(
        (features[:192], labels[:192]),
        (features[192:], labels[192:]),
        num_classes=4,
        settings=settings,
        seed=0,
        description="test",
    )
    assert result["top1"] > 0.95


def test_learning_rate_is_multiplied_by_a_tenth_at_each_milestone_epoch():
    settings = linear_probe.HeadSettings(milestones=(2, 3))
    schedule = linear_probe.step_schedule(settings, 10)  # per step (fine-tuning)
    assert [float(schedule(s)) for s in (0, 19, 20, 29, 30)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4, 1e-5]
    )
    per_epoch = [linear_probe.epoch_learning_rate(settings, e) for e in (0, 1, 2, 3)]
    assert per_epoch == pytest.approx([1e-3, 1e-3, 1e-4, 1e-5])


def test_eurosat_probe_with_seco_split_files_writes_metrics(encoder_dir, tmp_path):
    FakeEurosat(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    names = [f"{c}_{n}.jpg" for c in EUROSAT_CLASSES for n in range(1, 5)]
    (split_dir / "eurosat-train.txt").write_text("\n".join(n for n in names if n[-5] in "123"))
    (split_dir / "eurosat-val.txt").write_text("\n".join(n for n in names if n[-5] == "4"))
    config = eval_config(
        encoder_dir,
        tmp_path,
        split_dir=str(split_dir),
        batch_size=8,
        learning_rate=0.01,
        epochs=20,
        milestones=(15,),
        random_baseline=True,
    )

    result = linear_probe.eurosat_task(config, str(tmp_path))

    record = read_metrics(encoder_dir, "eval_eurosat")
    assert result["metrics_file"] == common.metrics_path(encoder_dir, "eval_eurosat")
    assert [row["encoder"] for row in record["rows"]] == ["checkpoint", "random"]
    assert (record["train_examples"], record["val_examples"]) == (30, 10)
    assert record["split"].startswith("SeCo split files")
    for row in record["rows"]:
        assert 0.0 <= row["top1"] <= 1.0
    # The colours separate the classes: even a random frozen encoder fits the training set.
    assert record["rows"][0]["train_top1"] > 0.5

    (split_dir / "eurosat-val.txt").write_text("Forest_99.jpg\n")
    with pytest.raises(ValueError, match="Forest_99"):
        linear_probe.load_eurosat(config)
    config.eval.split_dir = ""
    with pytest.warns(UserWarning, match="seeded random split"):
        _, _, train, val, description = linear_probe.load_eurosat(config)
    assert (train.size, val.size) == (24, 8) and not set(train) & set(val)
    assert description.startswith("seeded split")


def test_refresh_batch_stats_moves_running_statistics_to_the_data():
    model = common.random_encoder(18, 3, seed=0)
    images = np.full((16, 32, 32, 3), 200, np.uint8)
    before = np.asarray(model.bn1.mean[...])
    common.refresh_batch_stats(
        model, lambda i: images[i], 16, preprocess=common.as_unit_float, batch_size=8, seed=0
    )
    assert not np.allclose(np.asarray(model.bn1.mean[...]), before)
    assert model.bn1.use_running_average  # back in eval mode


def test_missing_dataset_and_checkpoint_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build eurosat/rgb"):
        common.open_tfds(str(tmp_path), "eurosat", "rgb")
    config = config_lib.base_config()
    with pytest.raises(FileNotFoundError, match=r"config\.eval\.checkpoint"):
        common.encoders(config, str(tmp_path))


# --------------------------------------------------------------------------------------------------
# BigEarthNet.


def test_nineteen_class_mapping_covers_the_43_labels():
    assert len(BIGEARTHNET_LABELS) == 43
    mapping = multilabel.nineteen_class_index(BIGEARTHNET_LABELS)
    assert sorted(set(mapping.tolist()) - {-1}) == list(range(19))
    assert (mapping == -1).sum() == 11
    target = multilabel.multi_hot(
        [BIGEARTHNET_LABELS.index("Rice fields"), BIGEARTHNET_LABELS.index("Airports")], mapping
    )
    assert np.flatnonzero(target).tolist() == [multilabel.CLASSES_19.index("Arable land")]


def test_label_subset_is_seeded_and_without_duplicates():
    subset = multilabel.label_subset(1000, 0.1, seed=3)
    assert subset.size == 100 and np.unique(subset).size == 100
    np.testing.assert_array_equal(subset, multilabel.label_subset(1000, 0.1, seed=3))


def test_bigearthnet_frozen_and_finetuned(encoder_dir, tmp_path):
    FakeBigEarthNet(
        data_dir=str(tmp_path / "tfds"), file_format="array_record"
    ).download_and_prepare()
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    names = [f"S2A_MSIL2A_20170613T101031_{n}_48" for n in range(24)]
    (split_dir / "bigearthnet-train.txt").write_text("\n".join(names[:16]))
    (split_dir / "bigearthnet-val.txt").write_text("\n".join(names[16:]))
    (split_dir / "patches_with_cloud_and_shadow.csv").write_text(f"{names[0]},x\n{names[17]},x\n")
    (split_dir / "patches_with_seasonal_snow.csv").write_text(f"{names[1]},x\n")
    config = eval_config(
        encoder_dir,
        tmp_path,
        split_dir=str(split_dir),
        batch_size=4,
        dropout=0.2,
        image_size=32,
        train_fraction=0.5,
    )

    multilabel.bigearthnet_task(config, str(tmp_path))
    record = read_metrics(encoder_dir, "eval_bigearthnet")
    assert record["cloud_snow_removed"] == 3
    assert (record["train_patches"], record["val_patches"]) == (7, 7)  # half of 16 - 2; 8 - 1
    assert 0.0 < record["rows"][0]["micro_ap"] <= 1.0
    assert record["mode"] == "frozen"

    config = eval_config(
        encoder_dir,
        tmp_path,
        split_dir=str(split_dir),
        batch_size=8,
        image_size=32,
        epochs=1,
        milestones=(),
        finetune=True,
    )
    multilabel.bigearthnet_task(config, str(tmp_path))
    record = read_metrics(encoder_dir, "eval_bigearthnet")
    assert record["mode"] == "finetune" and 0.0 < record["rows"][0]["micro_ap"] <= 1.0


# --------------------------------------------------------------------------------------------------
# OSCD.


def test_tiling_and_stitching_round_trip():
    image = np.random.default_rng(0).integers(0, 9999, (70, 100, 3)).astype(np.uint16)
    tiles, grid = tiling.tile(image, 32)
    assert grid == (3, 4) and tiles.shape == (12, 32, 32, 3)
    np.testing.assert_array_equal(tiles[5], image[32:64, 32:64])  # row-major order
    assert not tiles[11][6:, 4:].any()  # zero padding beyond the border
    np.testing.assert_array_equal(tiling.stitch(tiles, grid, (70, 100)), image)


def test_augmentation_moves_images_and_mask_together():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (16, 8, 8, 3)).astype(np.uint8)
    masks = images[..., 0].copy()
    out_1, out_2, out_masks = tiling.flip_rotate((images, images.copy(), masks), rng)
    np.testing.assert_array_equal(out_1, out_2)
    np.testing.assert_array_equal(out_1[..., 0], out_masks)
    assert not np.array_equal(out_1, images)


def test_decoder_gives_one_logit_per_pixel_and_zero_differences_for_equal_images():
    encoder = common.random_encoder(18, 3, seed=0)
    decoder = unet.ChangeDecoder(unet.skip_channels(encoder), rngs=nnx.Rngs(0))
    decoder.eval()
    images = jnp.asarray(np.random.default_rng(0).random((2, 64, 64, 3)), jnp.float32)

    @nnx.jit
    def run(encoder, decoder, x1, x2):
        skips = unet.feature_differences(encoder, x1, x2)
        return skips, decoder(skips)

    skips, _ = run(encoder, decoder, images, images)
    assert [s.shape[1] for s in skips] == [32, 16, 8, 4, 2]
    assert all(float(jnp.abs(s).max()) == 0.0 for s in skips)
    _, logits = run(encoder, decoder, images, 1.0 - images)
    assert logits.shape == (2, 64, 64)


def write_fake_oscd(root, size=(70, 100)):
    """The Onera archive's layout: city lists, rectified bands, one city with native-layout bands,
    labels as cm.png for train cities and <city>-cm.tif for the test city."""
    rng = np.random.default_rng(0)
    images_dir = root / oscd_builder.IMAGES_FOLDER
    images_dir.mkdir(parents=True)
    (images_dir / "train.txt").write_text("alpha,beta")
    (images_dir / "test.txt").write_text("gamma\n")
    written = {}
    for city, split in (("alpha", "train"), ("beta", "train"), ("gamma", "test")):
        for date in (1, 2):
            native = city == "beta"
            folder = images_dir / city / (f"imgs_{date}" if native else f"imgs_{date}_rect")
            folder.mkdir(parents=True)
            bands = rng.integers(0, 4000, (3, *size)).astype(np.uint16)
            written[city, date] = np.moveaxis(bands, 0, -1)
            for band, values in zip(oscd_builder.RGB_BANDS, bands, strict=True):
                name = f"S2A_OPER_MSI_{city}_{band}.tif" if native else f"{band}.tif"
                with rasterio.open(
                    folder / name, "w", driver="GTiff", height=size[0], width=size[1], count=1,
                    dtype="uint16",
                ) as dst:  # fmt: skip
                    dst.write(values, 1)
        mask = np.zeros(size, np.uint8)
        mask[10:40, 20:60] = 1
        written[city, "mask"] = mask
        cm_dir = root / oscd_builder.LABEL_FOLDERS[split] / city / "cm"
        cm_dir.mkdir(parents=True)
        if split == "train":
            Image.fromarray(mask * 255).save(cm_dir / "cm.png")
        else:
            with rasterio.open(
                cm_dir / f"{city}-cm.tif", "w", driver="GTiff", height=size[0], width=size[1],
                count=1, dtype="uint8",
            ) as dst:  # fmt: skip
                dst.write(mask + 1, 1)
    return written


def test_oscd_builder_reads_the_onera_layout(tmp_path):
    written = write_fake_oscd(tmp_path / "oscd")
    path = oscd_builder.prepare(str(tmp_path / "oscd"), str(tmp_path / "tfds"))
    builder = common.open_tfds(str(tmp_path / "tfds"), "oscd", "rgb")
    assert os.path.samefile(path, builder.data_dir)
    for split, cities in (("train", {"alpha", "beta"}), ("test", {"gamma"})):
        source = builder.as_data_source(split)
        assert {common.read_text(source[i]["city"]) for i in range(len(source))} == cities
        for i in range(len(source)):
            example = source[i]
            city = common.read_text(example["city"])
            np.testing.assert_array_equal(example["image1"], written[city, 1])
            np.testing.assert_array_equal(example["image2"], written[city, 2])
            np.testing.assert_array_equal(example["mask"], written[city, "mask"])


def test_oscd_builder_names_a_missing_mask(tmp_path):
    write_fake_oscd(tmp_path / "oscd")
    os.remove(tmp_path / "oscd" / oscd_builder.LABEL_FOLDERS["train"] / "beta" / "cm" / "cm.png")
    with pytest.raises(FileNotFoundError, match="'beta'"):
        oscd_builder.prepare(str(tmp_path / "oscd"), str(tmp_path / "tfds"))


def test_oscd_change_detection_trains_and_reports(encoder_dir, tmp_path):
    write_fake_oscd(tmp_path / "oscd")
    config = eval_config(
        encoder_dir,
        tmp_path,
        oscd_dir=str(tmp_path / "oscd"),
        tile_size=32,
        batch_size=8,
        epochs=2,
        milestones=(1,),
    )
    result = change_detection.oscd_task(config, str(tmp_path))
    record = read_metrics(encoder_dir, "eval_oscd")
    assert result["rows"] == record["rows"]
    row = record["rows"][0]
    assert record["test_cities"] == ["gamma"] and set(row["per_city_f1"]) == {"gamma"}
    for key in ("precision", "recall", "f1"):
        assert 0.0 <= row[key] <= 1.0


# --------------------------------------------------------------------------------------------------
# The demo's land-cover probe on the synthetic archive (its ground truth and records).


def test_land_cover_probe_on_the_synthetic_archive(encoder_dir, tmp_path):
    from caco_jax.data import builder, synthetic

    config = eval_config(encoder_dir, tmp_path, image_size=32, batch_size=4, epochs=3)
    config.synthetic.num_locations = 10
    config.data.num_workers = 1
    synthetic.run_task(config, str(tmp_path))
    builder.run_task(config, str(tmp_path))

    result = linear_probe.land_cover_task(config, str(tmp_path))

    record = read_metrics(encoder_dir, "linear_probe")
    assert result["rows"] == record["rows"]
    assert record["classes"] == len(synthetic.LAND_COVER_CLASSES)
    # Early-window acquisitions only, locations split in halves: 5 locations x 5 images each.
    assert (record["train_images"], record["test_images"]) == (25, 25)
    assert 0.0 <= record["rows"][0]["top1"] <= 1.0
