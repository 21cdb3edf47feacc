"""The evaluators on tiny fixtures written in each download's exact layout and formats
(tests/downloads.py), in-process and once end to end through run.py with TensorFlow made
unimportable (no network)."""

import functools
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from downloads import (
    bigearthnet_patches,
    geotiff_bytes,
    write_bigearthnet,
    write_bigearthnet_lists,
    write_download,
    write_eurosat_lists,
    write_eurosat_ms_folder,
    write_eurosat_rgb_zip,
    write_fake_oscd,
    zip_download,
)
from flax import nnx
from helpers import xla_flags
from PIL import Image

from caco_jax import config as config_lib
from caco_jax import tasks
from caco_jax.data import dataset, layout
from caco_jax.data.normalization import EXPORT_KEY, Normalization
from caco_jax.evaluators import (
    bigearthnet,
    common,
    eurosat,
    fit,
    heads,
    land_cover,
    oscd,
    protocol,
    tiling,
)
from caco_jax.evaluators.datasets import bigearthnet as bigearthnet_builder
from caco_jax.evaluators.datasets import eurosat as eurosat_builder
from caco_jax.evaluators.datasets import oscd as oscd_builder
from caco_jax.evaluators.datasets import split_lists
from caco_jax.models import export, unet
from caco_jax.models.heads import LinearClassifier
from caco_jax.models.resnet import BatchNorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "encoder"
    export.save_encoder(path, common.random_encoder(10, 3, seed=5, width=8), {"method": "test"})
    return str(path)


ALL_BANDS_INPUT = Normalization(
    bands=layout.BANDS, low=(0.0,) * 12, high=(80.0,) * 12, mean=(0.4,) * 12, std=(0.25,) * 12
)


def eval_config(encoder_dir, tmp_path, *tasks, **values):
    """A config of ``tasks`` (default: the land-cover probe) with tiny protocols; ``values`` are
    ``section__key=value``."""
    config = config_lib.for_tasks(*(tasks or ("eval_land_cover",)))
    config.eval.checkpoint = encoder_dir
    config.eval.data_dir = str(tmp_path / "tfds")
    config.eval.extract_batch_size = 16
    config.eval.random_baseline = False
    config.eval.prepare_workers = 1
    for section in ("eurosat", "bigearthnet", "land_cover"):
        if section in config:
            config[section].epochs = 3
            config[section].milestones = (1, 2)
    for key, value in values.items():
        section, name = key.split("__")
        config[section][name] = value
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
    settings = heads.HeadSettings(epochs=10, batch_size=32, learning_rate=0.05, milestones=(6, 8))
    result = heads.probe_top1(
        (features[:192], labels[:192]),
        (features[192:], labels[192:]),
        num_classes=4,
        settings=settings,
        seed=0,
        description="test",
    )
    assert result["top1"] > 0.95


def test_learning_rate_is_multiplied_by_a_tenth_at_each_milestone_epoch():
    settings = heads.HeadSettings(milestones=(2, 3))
    schedule = heads.step_schedule(settings, 10)  # per step (fine-tuning)
    assert [float(schedule(s)) for s in (0, 19, 20, 29, 30)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4, 1e-5]
    )
    per_epoch = [heads.epoch_learning_rate(settings, e) for e in (0, 1, 2, 3)]
    assert per_epoch == pytest.approx([1e-3, 1e-3, 1e-4, 1e-5])


def test_refresh_batch_stats_moves_running_statistics_to_the_data():
    model = common.random_encoder(10, 3, seed=0, width=8)
    images = np.full((16, 32, 32, 3), 200, np.uint8)
    before = np.asarray(model.bn1.mean[...])
    common.refresh_batch_stats(
        model, lambda i: images[i], 16, preprocess=common.as_unit_float, batch_size=8, seed=0
    )
    assert not np.allclose(np.asarray(model.bn1.mean[...]), before)
    assert model.bn1.use_running_average  # back in eval mode


# --------------------------------------------------------------------------------------------------
# BigEarthNet.


def test_nineteen_class_mapping_covers_the_43_labels():
    labels = bigearthnet_builder.LABELS
    assert len(labels) == 43 and list(labels) == sorted(labels)
    mapping = bigearthnet.nineteen_class_index(labels)
    assert sorted(set(mapping.tolist()) - {-1}) == list(range(19))
    assert (mapping == -1).sum() == 11
    target = bigearthnet.multi_hot([labels.index("Rice fields"), labels.index("Airports")], mapping)
    assert np.flatnonzero(target).tolist() == [bigearthnet.CLASSES_19.index("Arable land")]


def test_label_subset_is_seeded_and_without_duplicates():
    subset = bigearthnet.label_subset(1000, 0.1, seed=3)
    assert subset.size == 100 and np.unique(subset).size == 100
    np.testing.assert_array_equal(subset, bigearthnet.label_subset(1000, 0.1, seed=3))


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
    encoder = common.random_encoder(10, 3, seed=0, width=8)
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


def test_oscd_builder_reads_imgs_1_and_imgs_2_as_seco_and_the_rect_folders_for_all_bands(tmp_path):
    """The download holds both image folders, whose RGB values differ here. `rgb` must hold what
    SeCo's reader takes, imgs_<d>/<product>_<band>.tif; `all_bands` the 10 m grid of
    imgs_<d>_rect/ (the native 20 m and 60 m bands have other sizes)."""
    written = write_fake_oscd(tmp_path / "oscd", band_names=oscd_builder.ALL_BANDS)
    for config_name, folder in (("rgb", "native"), ("all_bands", "rect")):
        path = oscd_builder.prepare(str(tmp_path / "oscd"), str(tmp_path / "tfds"), config_name)
        builder = oscd_builder.Oscd(config=config_name, data_dir=str(tmp_path / "tfds"))
        assert builder.is_prepared() and os.path.samefile(path, builder.data_dir)
        bands = builder.builder_config.bands
        for split, cities in (("train", {"alpha", "beta"}), ("test", {"gamma"})):
            source = builder.as_data_source(split)
            assert {common.read_text(source[i]["city"]) for i in range(len(source))} == cities
            for i in range(len(source)):
                example = source[i]
                city = common.read_text(example["city"])
                for date in (1, 2):
                    expected = np.stack([written[city, date, folder][b] for b in bands], axis=-1)
                    np.testing.assert_array_equal(example[f"image{date}"], expected)
                np.testing.assert_array_equal(example["mask"], written[city, "mask"])


def test_oscd_rgb_needs_the_native_folders_and_says_so(tmp_path):
    write_fake_oscd(tmp_path / "oscd")
    native = tmp_path / "oscd" / oscd_builder.IMAGES_FOLDER / "alpha" / "imgs_2"
    for path in native.glob("*_B03.tif"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match=r"'alpha': no imgs_2/<product>_B03\.tif .*Images"):
        oscd_builder.prepare(str(tmp_path / "oscd"), str(tmp_path / "tfds"))


def test_oscd_builder_names_a_missing_mask(tmp_path):
    write_fake_oscd(tmp_path / "oscd")
    os.remove(tmp_path / "oscd" / oscd_builder.LABEL_FOLDERS["train"] / "beta" / "cm" / "cm.png")
    with pytest.raises(FileNotFoundError, match="'beta'"):
        oscd_builder.prepare(str(tmp_path / "oscd"), str(tmp_path / "tfds"))


def test_official_oscd_f1_is_the_mean_over_shuffled_batches_of_whole_tiles_not_the_pooled_f1():
    """Five 4x4 test tiles, batches of 2 in a given order, the fifth tile dropped. A: 4 changed
    pixels found; B: nothing; C: 2 changed pixels missed; D: no change, one false alarm in the
    padding beyond its city's border; E: 8 changed pixels found."""
    targets = np.zeros((5, 4, 4), np.uint8)
    probabilities = np.zeros((5, 4, 4), np.float32)
    inside = np.ones((5, 4, 4), bool)
    targets[0, :2, :2] = probabilities[0, :2, :2] = 1  # A
    targets[2, 0, :2] = 1  # C
    inside[3, :, 3] = False
    probabilities[3, 0, 3] = 0.7  # D
    targets[4, :2] = probabilities[4, :2] = 1  # E
    tiles = tiling.TiledScenes(images=(), targets=targets, inside=inside, scene=np.zeros(5, int))
    order = np.array([0, 3, 2, 1, 4])

    result = oscd.test_scores(probabilities, tiles, batch_size=2, order=order)

    def f1(predicted, actual):  # written out: 2 tp / (2 tp + fp + fn), 0 where undefined
        tp, fp = np.sum(predicted & actual), np.sum(predicted & ~actual)
        fn = np.sum(~predicted & actual)
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0

    predicted, actual = probabilities >= 0.5, targets.astype(bool)
    per_batch = [f1(predicted[order[b : b + 2]], actual[order[b : b + 2]]) for b in (0, 2)]
    assert per_batch == [8 / 9, 0.0]
    assert result["f1"] == pytest.approx(np.mean(per_batch))  # 4/9
    # Pooled over every pixel inside the cities: tp 12, no false alarm inside, fn 2.
    assert result["pooled_f1"] == pytest.approx(f1(predicted[inside], actual[inside])) == 24 / 26
    assert abs(result["f1"] - result["pooled_f1"]) > 0.4


def test_official_bigearthnet_ap_is_the_mean_of_per_batch_micro_aps_not_the_pooled_ap():
    """Five validation patches of three classes, batches of 2 in the list's order, the fifth
    dropped; the per-batch micro APs are computed here by their definition."""
    from test_metrics import reference_average_precision

    targets = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 1]], np.float32)
    probabilities = np.array(
        [[0.9, 0.2, 0.1], [0.3, 0.8, 0.7], [0.2, 0.6, 0.7], [0.9, 0.1, 0.4], [0.1, 0.5, 0.3]],
        np.float32,
    )
    result = bigearthnet.scores(targets, probabilities, batch_size=2)
    per_batch = [
        reference_average_precision(targets[b : b + 2], probabilities[b : b + 2]) for b in (0, 2)
    ]
    assert per_batch[0] == 1.0 and per_batch[1] < 0.7
    assert result["micro_ap"] == pytest.approx(np.mean(per_batch))
    pooled = reference_average_precision(targets, probabilities)
    assert result["pooled_micro_ap"] == pytest.approx(pooled)
    assert abs(result["micro_ap"] - result["pooled_micro_ap"]) > 0.05


def test_tiled_scenes_mark_the_padding_and_keep_the_scene_of_each_tile():
    scenes = [(np.ones((5, 3, 2), np.uint8),), (np.full((2, 4, 2), 2, np.uint8),)]
    targets = [np.ones((5, 3), np.uint8), np.zeros((2, 4), np.uint8)]
    tiles = tiling.tile_scenes(scenes, targets, size=4, pad=255)
    assert len(tiles) == 3 and tiles.scene.tolist() == [0, 0, 1]
    assert tiles.images[0].shape == (3, 4, 4, 2)
    assert tiles.inside.sum() == 5 * 3 + 2 * 4
    assert (tiles.targets[~tiles.inside] == 255).all()
    np.testing.assert_array_equal(tiles.load([2])[0][0, :2], scenes[1][0])


# --------------------------------------------------------------------------------------------------
# The fitting loop and the runner every evaluation shares.


def test_fit_trains_what_the_protocol_says_and_compiles_once_per_protocol():
    """Frozen with BatchNorm in training mode (OSCD's default): only the head moves, the encoder's
    running statistics drift. Fine-tuned with BatchNorm in eval mode (BigEarthNet's): encoder and
    head move, the statistics stay. A second encoder of the same architecture reuses the
    compilation. `train` and `predict` split their batches over the test session's 8 devices."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 32, 32, 3)).astype(np.uint8)
    targets = rng.integers(0, 2, (8, 5)).astype(np.float32)
    before = fit.train_step._cache_size()
    for seed, (encoder_bn, parts) in enumerate(
        [("train", ("head",)), ("eval", ("encoder", "head")), ("train", ("head",))]
    ):
        encoder = common.random_encoder(10, 3, seed=seed, width=8)
        head = LinearClassifier(encoder.feature_dim, 5, dropout=0.2, rngs=nnx.Rngs(0))
        classify_fit, state = fit.start(
            encoder, head, encoder_bn=encoder_bn, preprocess=common.as_unit_float,
            forward=bigearthnet.classify_forward, loss=heads.multilabel_soft_margin,
            output=jax.nn.sigmoid,
            optimizer=fit.Optimizer(tuple((p, 1e-2) for p in parts), steps_per_epoch=1),
        )  # fmt: skip
        after, _ = fit.train_step(
            classify_fit, state, (jnp.asarray(images),), jnp.asarray(targets), jax.random.key(0)
        )
        moved = {
            kind: {
                part: not all(
                    np.array_equal(a, b)
                    for a, b in zip(
                        jax.tree.leaves(state[kind][part]),
                        jax.tree.leaves(after[kind][part]),
                        strict=True,
                    )
                )
                for part in ("encoder", "head")
            }
            for kind in ("params", "stats")
        }
        assert moved["params"] == {"encoder": "encoder" in parts, "head": True}
        assert moved["stats"]["encoder"] == (encoder_bn == "train")
        probabilities = fit.predict(classify_fit, after, lambda i: (images[i],), 8, batch_size=4)
        assert probabilities.shape == (8, 5) and ((0 < probabilities) & (probabilities < 1)).all()
    assert fit.train_step._cache_size() - before == 2  # the third reused the first's compile
    # The loop: host batches split over the 8 devices, a callback after each epoch.
    epochs = []
    _, loss = fit.train(
        classify_fit, state, lambda epoch, rng: [((images,), targets)], epochs=2, seed=0,
        after_epoch=lambda epoch, state: epochs.append(epoch),
    )  # fmt: skip
    assert epochs == [1, 2] and np.isfinite(loss)


class RecordingEvaluation(protocol.Evaluation):
    """An evaluation that records what the runner asks of it."""

    task = "eval_recording"
    columns = ("score",)

    def __init__(self, settings, *, refuse="", fail=""):
        super().__init__(settings)
        self.refuse, self.fail, self.calls = refuse, fail, []

    def dataset_key(self, encoder):
        if encoder.name == self.refuse:
            raise ValueError(f"the dataset lacks the bands of the {encoder.name} row")
        return "data"

    def load(self, key):
        self.calls.append(("load", key))
        return key

    def evaluate(self, encoder, data):
        self.calls.append(("evaluate", encoder.name))
        if encoder.name == self.fail:
            raise RuntimeError(f"{encoder.name} stopped")
        return {"score": 0.25}

    def describe(self, data):
        return {"data": data}


def test_the_runner_checks_every_row_first_and_writes_each_row_when_it_finishes(
    encoder_dir, tmp_path
):
    imagenet = export.save_encoder(
        tmp_path / "imagenet", common.random_encoder(10, 3, seed=2, width=8), {"method": "test"}
    )
    settings = config_lib.resolve(
        eval_config(
            encoder_dir,
            tmp_path,
            eval__random_baseline=True,
            eval__imagenet_checkpoint=str(imagenet),
        )
    )
    refusing = RecordingEvaluation(settings, refuse="imagenet")
    with pytest.raises(ValueError, match="bands of the imagenet row"):
        protocol.run(refusing, str(tmp_path))
    assert refusing.calls == []  # nothing loaded or trained before the last row was checked

    stopping = RecordingEvaluation(settings, fail="random")
    with pytest.raises(RuntimeError, match="random stopped"):
        protocol.run(stopping, str(tmp_path))
    record = read_metrics(encoder_dir, "eval_recording")
    assert record["complete"] is False and record["data"] == "data"
    assert [row["encoder"] for row in record["rows"]] == ["checkpoint"]

    result = protocol.run(RecordingEvaluation(settings), str(tmp_path))
    record = read_metrics(encoder_dir, "eval_recording")
    assert record["complete"] is True and result["rows"] == record["rows"]
    assert [row["encoder"] for row in record["rows"]] == ["checkpoint", "random", "imagenet"]


def test_best_and_last_epochs_and_when_the_official_loops_validated():
    history = [{"epoch": 10, "f1": 0.4}, {"epoch": 20, "f1": 0.6}, {"epoch": 30, "f1": 0.5}]
    row = protocol.best_and_last(history, "f1")
    assert (row["epoch"], row["f1"], row["best_epoch"], row["best_f1"]) == (30, 0.5, 20, 0.6)
    assert row["history"] == history
    epochs = range(1, 26)
    assert [e for e in epochs if protocol.is_validation_epoch(e, 10, 25)] == [10, 20, 25]
    assert [e for e in epochs if protocol.is_validation_epoch(e, 0, 25)] == [25]
    assert len([e for e in epochs if protocol.is_validation_epoch(e, 1, 25)]) == 25


# --------------------------------------------------------------------------------------------------
# The demo's land-cover probe on the synthetic archive.


def test_land_cover_probe_on_the_synthetic_archive(encoder_dir, tmp_path, one_device):
    from caco_jax.sources import synthetic

    config = eval_config(encoder_dir, tmp_path, land_cover__image_size=32, land_cover__batch_size=4)
    config.synthetic = config_lib.for_tasks("synthesize").synthetic
    config.synthetic.num_locations = 10
    config.data.num_workers = 1
    settings = config_lib.resolve(config)
    synthetic.run_task(settings, str(tmp_path))
    dataset.run_task(settings, str(tmp_path))

    result = land_cover.run_task(settings, str(tmp_path))

    record = read_metrics(encoder_dir, "eval_land_cover")
    assert result["rows"] == record["rows"]
    assert record["classes"] == len(synthetic.LAND_COVER_CLASSES)
    # Early-window acquisitions only, locations split in halves: 5 locations x 5 images each.
    assert (record["train_images"], record["test_images"]) == (25, 25)
    assert 0.0 <= record["rows"][0]["top1"] <= 1.0


# --------------------------------------------------------------------------------------------------
# The official EuroSAT probe: the encoder in training mode while the head trains.


class PooledBatchNorm(nnx.Module):
    """The smallest encoder with BatchNorm: torch's BatchNorm2d over one channel, then pooling."""

    def __init__(self):
        self.bn = BatchNorm(1)
        self.feature_dim = 1

    def __call__(self, x):
        return self.bn(x).mean(axis=(1, 2))


def identity(images):
    return images


def test_official_probe_step_by_hand():
    """Pixels 3 and 5 with labels 0 and 1, head kernel (1, -1): with the batch's own statistics
    (mean 4, biased variance 1) the features are -1 and +1, so each loss is log(1 + e^2); with the
    initial running statistics (0, 1) they would be 3 and 5 (mean loss ~5.0)."""
    model = PooledBatchNorm()
    model.train()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    images = jnp.array([3.0, 5.0]).reshape(2, 1, 1, 1)
    head = {"kernel": jnp.array([[1.0, -1.0]]), "bias": jnp.zeros(2)}
    stats, new_head, _, loss = heads.official_head_epoch(
        graphdef, params, stats, head, heads.ADAM.init(head), images, jnp.array([0, 1]),
        jnp.asarray(np.array([0, 7], np.uint32)), jnp.float32(1e-3),
        preprocess=identity, batch_size=2, steps_per_epoch=1,
    )  # fmt: skip
    assert float(loss) == pytest.approx(np.log1p(np.exp(2.0)), rel=1e-4)
    # torch's momentum 0.1; the running variance takes the unbiased batch variance (2).
    assert float(stats["bn"]["mean"][...][0]) == pytest.approx(0.4)
    assert float(stats["bn"]["var"][...][0]) == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    # Adam's first step moves each weight by the learning rate against its gradient's sign.
    np.testing.assert_allclose(new_head["kernel"] - head["kernel"], [[-1e-3, 1e-3]], rtol=1e-3)


def test_official_probe_drifts_running_statistics_and_evaluates_with_them():
    model = PooledBatchNorm()
    model.eval()
    images = np.array([3.0, 5.0], np.float32).reshape(2, 1, 1, 1)
    settings = heads.HeadSettings(epochs=3, batch_size=2, milestones=())
    heads.train_head_with_encoder_in_train_mode(
        model, images, np.array([0, 1]), preprocess=identity, num_classes=2,
        settings=settings, seed=0,
    )  # fmt: skip
    # Three updates with batch mean 4 and unbiased variance 2, from (0, 1).
    mean = 4.0 * (1 - 0.9**3)
    var = 0.9**3 * 1.0 + (1 - 0.9**3) * 2.0
    assert float(model.bn.mean[...][0]) == pytest.approx(mean, rel=1e-5)
    assert float(model.bn.var[...][0]) == pytest.approx(var, rel=1e-5)
    assert model.bn.use_running_average  # evaluation uses the drifted running statistics
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(images)))[:, 0],
        (np.array([3.0, 5.0]) - mean) / np.sqrt(var + 1e-5),
        rtol=1e-5,
    )


# --------------------------------------------------------------------------------------------------
# Split lists, bands.


def test_missing_lists_name_the_files_and_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        split_lists.locate(str(tmp_path), split_lists.BIGEARTHNET_EXCLUDED, download=False)
    message = str(error.value)
    for file in split_lists.BIGEARTHNET_EXCLUDED:
        assert file in message and split_lists.URLS[file] in message
    assert "download_lists" in message and "seeded_split" in message


def test_download_lists_fetches_the_missing_lists(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    (served / "eurosat-train.txt").write_text("Forest_1.jpg\nRiver_2.jpg\n")
    (served / "eurosat-val.txt").write_text("SeaLake_3.jpg\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for file in split_lists.EUROSAT_SPLITS:
            monkeypatch.setitem(
                split_lists.URLS, file, f"http://127.0.0.1:{server.server_port}/{file}"
            )
        manual_dir = tmp_path / "manual"
        manual_dir.mkdir()
        paths = split_lists.locate(str(manual_dir), split_lists.EUROSAT_SPLITS, download=True)
    finally:
        server.shutdown()
        thread.join()
    assert split_lists.read_names(paths["eurosat-train.txt"]) == ["Forest_1", "River_2"]
    index = {"Forest_1": 0, "River_2": 1}
    with pytest.raises(ValueError, match=r"eurosat-val\.txt: 1 of its 1 names .*SeaLake_3"):
        split_lists.indices(paths["eurosat-val.txt"], index, "EuroSAT")


def test_bands_are_taken_by_name_and_a_missing_one_names_both_sides():
    assert layout.channel_indices("OSCD", oscd_builder.ALL_BANDS, ("B4", "B8A", "B1")) == [3, 8, 0]
    with pytest.raises(ValueError, match=r"BigEarthNet has bands B1, .*needs .*missing B10"):
        needs_b10 = dict(ALL_BANDS_INPUT.__dict__, bands=(*layout.BANDS[:-1], "B10"))
        bigearthnet.bigearthnet_input(Normalization(**needs_b10), "all_bands", 32)
    with pytest.raises(ValueError, match="EuroSAT RGB has bands B4, B3, B2; the encoder needs B1"):
        eurosat.eurosat_input(ALL_BANDS_INPUT, "rgb")
    # Reflectance x 10000 -> reflectance x 255, truncated and clipped like a uint8 cast.
    dn = np.array([0, 5000, 10000, 20000], np.uint16)
    np.testing.assert_array_equal(layout.to_archive_uint8(dn, jnp), [0, 127, 255, 255])


def test_seco_bigearthnet_stretch_is_mean_plus_minus_two_std():
    stretch = bigearthnet.seco_stretch(["B04"])
    mean, std = bigearthnet.BAND_MEAN["B04"], bigearthnet.BAND_STD["B04"]
    raw = np.array([[mean - 2 * std], [mean], [mean + 2 * std], [mean + 3 * std]])
    np.testing.assert_allclose(stretch(raw)[:, 0], [0.0, 127 / 255, 1.0, 1.0], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The builders read the downloads exactly.


def test_eurosat_records_hold_the_downloaded_pixels(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    jpegs = write_eurosat_rgb_zip(manual)
    tiffs = write_eurosat_ms_folder(manual)
    write_eurosat_lists(manual)
    config = eval_config("", tmp_path, "eval_eurosat", eval__manual_dir=str(manual))
    shared = config_lib.resolve(config).eval
    for config_name, written in (("rgb", jpegs), ("all_bands", tiffs)):
        data = eurosat.load_eurosat(shared, 0, config_name)
        assert data.images.shape == (40, 64, 64, 3 if config_name == "rgb" else 13)
        assert (data.train.size, data.val.size) == (30, 10) and not data.seeded_split
        assert sorted(data.names) == sorted(written)
        for i, name in enumerate(data.names):
            expected = written[name]
            if config_name == "rgb":
                expected = np.asarray(Image.open(io.BytesIO(expected)).convert("RGB"))
            np.testing.assert_array_equal(data.images[i], expected)
            assert data.labels[i] == eurosat_builder.CLASSES.index(name.split("_")[0])


def test_bigearthnet_records_hold_the_downloaded_bands_and_labels(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    patches = bigearthnet_patches()
    write_bigearthnet(manual, patches, as_tar=True)
    write_bigearthnet_lists(manual)
    settings = config_lib.resolve(
        eval_config(
            "",
            tmp_path,
            "eval_bigearthnet",
            eval__manual_dir=str(manual),
            bigearthnet__train_fraction=0.5,
        )
    )
    data = bigearthnet.load_bigearthnet(settings.eval, settings.bigearthnet, 0, "all_bands")
    assert data.removed_cloud_snow == 3
    assert (data.train.size, data.val.size) == (7, 7)  # half of 16 - 2; 8 - 1
    for i in range(len(data.source)):
        example = data.source[i]
        name = common.read_text(example["name"])
        _, labels, pixels = patches[name]
        assert [bigearthnet_builder.LABELS[j] for j in example["labels"]] == labels
        for channel, band in enumerate(bigearthnet_builder.ALL_BANDS):
            repeat = 120 // bigearthnet_builder.BAND_PIXELS[band]
            np.testing.assert_array_equal(
                example["image"][::repeat, ::repeat, channel], pixels[band]
            )


def test_older_eurosat_zips_and_bad_images(tmp_path):
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(jpeg, "JPEG")
    with zipfile.ZipFile(tmp_path / "EuroSAT.zip", "w") as archive:
        archive.writestr("2750/Forest/Forest_2.jpg", jpeg.getvalue())
        archive.writestr("2750/Forest/Forest_10.jpg", jpeg.getvalue())
    found = eurosat_builder.find_images(str(tmp_path), "rgb")
    assert [name for name, _, _ in found] == ["Forest_2", "Forest_10"]
    tif = geotiff_bytes(np.zeros((13, 64, 64), np.uint16))
    prefix = "ds/images/remote_sensing/otherDatasets/sentinel_2/tif"
    with zipfile.ZipFile(tmp_path / "EuroSATallBands.zip", "w") as archive:
        archive.writestr(f"{prefix}/River/River_7.tif", tif)
    ((name, path, read),) = eurosat_builder.find_images(str(tmp_path), "all_bands")
    assert name == "River_7" and eurosat_builder._decode_geotiff(read(), path).shape == (64, 64, 13)
    with pytest.raises(ValueError, match=r"River_7\.tif is uint16\(12, 64, 64\), not uint16\(13"):
        eurosat_builder._decode_geotiff(geotiff_bytes(np.zeros((12, 64, 64), np.uint16)), path)


def test_bigearthnet_tar_with_a_split_patch_or_a_wrong_band_size_is_an_error(tmp_path):
    patches = bigearthnet_patches()
    first, second = list(patches)[:2]
    with tarfile.open(tmp_path / "BigEarthNet-S2-v1.0.tar.gz", "w:gz") as archive:
        for name in (first, second, first):
            info = tarfile.TarInfo(f"BigEarthNet-v1.0/{name}/{name}_B04.tif")
            data = patches[name][0][f"{name}_B04.tif"]
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=f"patch {first} are not contiguous"):
        list(bigearthnet_builder.read_patches(str(tmp_path), ("B04",)))
    files = dict(
        patches[first][0], **{f"{first}_B05.tif": geotiff_bytes(np.zeros((1, 120, 120), np.uint16))}
    )
    with pytest.raises(ValueError, match=r"_B05\.tif is \(120, 120\), not \(60, 60\)"):
        bigearthnet_builder.decode_patch(first, files, ("B05",))


def test_unprepared_dataset_without_manual_dir_names_the_key(tmp_path):
    shared = config_lib.resolve(eval_config("", tmp_path)).eval
    with pytest.raises(FileNotFoundError, match=r"config\.eval\.manual_dir: .*EuroSAT_RGB\.zip"):
        eurosat.load_eurosat(shared, 0, "rgb")
    with pytest.raises(FileNotFoundError, match=r"config\.eval\.checkpoint"):
        common.encoders(common.EvalSettings(), 0, str(tmp_path))


# --------------------------------------------------------------------------------------------------
# Every evaluation through run.py, from the downloads, with TensorFlow unimportable.


EVERY_EVALUATION = ("eval_eurosat", "eval_bigearthnet", "eval_oscd", "eval_dynamicearthnet")
# The config run.py reads in the test below: every evaluation, each protocol tiny.
EVERY_EVALUATION_CONFIG = """
from caco_jax import config as config_lib


def get_config():
    config = config_lib.for_tasks(*{tasks!r})
    config.eval.checkpoint = {checkpoint!r}
    config.eval.manual_dir = {manual_dir!r}
    config.eval.data_dir = {data_dir!r}
    config.eval.random_baseline = False
    config.eval.extract_batch_size = 16
    config.eval.prepare_workers = 1
    config.eurosat.epochs, config.eurosat.milestones, config.eurosat.batch_size = 2, (1,), 8
    config.bigearthnet.epochs, config.bigearthnet.milestones = 2, (1,)
    config.bigearthnet.batch_size, config.bigearthnet.image_size = 4, 32
    config.oscd.epochs, config.oscd.batch_size, config.oscd.tile_size = 2, 8, 32
    config.dynamicearthnet.epochs, config.dynamicearthnet.batch_size = 1, 16
    config.dynamicearthnet.tile_size = 32
    return config
"""


def tiny_protocols(config):
    """The protocols of EVERY_EVALUATION_CONFIG, in-process."""
    config.eurosat.epochs, config.eurosat.milestones, config.eurosat.batch_size = 2, (1,), 8
    config.bigearthnet.epochs, config.bigearthnet.milestones = 2, (1,)
    config.bigearthnet.batch_size, config.bigearthnet.image_size = 4, 32
    config.oscd.epochs, config.oscd.batch_size, config.oscd.tile_size = 2, 8, 32
    return config


def test_every_evaluation_runs_through_run_py_without_tensorflow(tmp_path):
    """As a user runs them: one run.py process evaluates an RGB encoder with all four protocols
    from the downloads as published (in one folder: OSCD with both image folders, DynamicEarthNet
    as its zips, the separate validation/test labels and split_info/), while a `tensorflow`
    package first on the path records any import attempt and raises ImportError. Each metrics file
    holds the official metric, the pooled one beside it, and the last and best epochs."""
    manual = tmp_path / "downloads"
    manual.mkdir()
    write_eurosat_rgb_zip(manual)
    write_eurosat_lists(manual)
    write_bigearthnet(manual, bigearthnet_patches(), as_tar=True)
    write_bigearthnet_lists(manual)
    write_fake_oscd(manual)
    write_download(str(tmp_path / "extracted"))
    zip_download(str(tmp_path / "extracted"), str(manual / "dynamicearthnet"))
    # The DynamicEarthNet zips and split folder sit beside the other downloads.
    for name in os.listdir(manual / "dynamicearthnet"):
        os.rename(manual / "dynamicearthnet" / name, manual / name)
    recorded = Normalization.rgb().to_json() | {"mean": [0.4, 0.4, 0.4]}
    checkpoint = export.save_encoder(
        tmp_path / "encoder", common.random_encoder(10, 3, seed=5, width=8), {EXPORT_KEY: recorded}
    )
    config_file = tmp_path / "every_evaluation.py"
    config_file.write_text(
        EVERY_EVALUATION_CONFIG.format(
            tasks=EVERY_EVALUATION,
            checkpoint=str(checkpoint),
            manual_dir=str(manual),
            data_dir=str(tmp_path / "tfds"),
        )
    )
    fake = tmp_path / "no_tensorflow" / "tensorflow"
    fake.mkdir(parents=True)
    marker = tmp_path / "tensorflow_was_imported"
    (fake / "__init__.py").write_text(
        "import traceback\n"
        f"with open({str(marker)!r}, 'a') as f:\n"
        "    traceback.print_stack(file=f)\n"
        "raise ImportError('TensorFlow is not available in this test')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake.parent), ROOT]))
    env["XLA_FLAGS"] = xla_flags(1)  # one CPU device: the multi-device paths have their own tests
    command = [
        sys.executable, "run.py", "--config", str(config_file), "--workdir", str(tmp_path / "w")
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists(), marker.read_text()
    records = {
        task: read_metrics(str(checkpoint), task)
        for task in ("eval_eurosat", "eval_bigearthnet", "eval_oscd", "eval_dynamicearthnet_frozen")
    }
    for task, record in records.items():
        assert f"{task} (percent)" in result.stdout
        assert record["complete"] and record["task"] == task

    eurosat = records["eval_eurosat"]
    assert eurosat["probe"] == "official" and not eurosat["seeded_split"]
    assert (eurosat["train_examples"], eurosat["val_examples"]) == (30, 10)
    row = eurosat["rows"][0]
    assert row["dataset"] == "eurosat_download/rgb" and row["bands"] == list(layout.RGB_BANDS)
    # Validated after both epochs (as Lightning did); top1 over the one full batch of 8 of the
    # list's 10 images, pooled_top1 over all 10.
    assert [entry["epoch"] for entry in row["history"]] == [1, 2] and row["epoch"] == 2
    assert row["best_top1"] == max(entry["top1"] for entry in row["history"])
    assert row["top1"] * 8 == round(row["top1"] * 8) and row["pooled_top1"] * 10 == round(
        row["pooled_top1"] * 10
    )
    bigearthnet = records["eval_bigearthnet"]
    assert bigearthnet["cloud_snow_removed"] == 3 and not bigearthnet["seeded_split"]
    assert (bigearthnet["train_patches"], bigearthnet["val_patches"]) == (14, 7)
    row = bigearthnet["rows"][0]
    # Validated every 10th epoch and after the last: after epoch 2 only.
    assert [entry["epoch"] for entry in row["history"]] == [2] and row["best_epoch"] == 2
    assert 0.0 < row["micro_ap"] <= 1.0 and 0.0 < row["pooled_micro_ap"] <= 1.0
    assert row["micro_ap"] != row["pooled_micro_ap"]  # one batch of 4 of the 7 val patches
    oscd_record = records["eval_oscd"]
    assert oscd_record["settings"]["encoder_bn"] == "train"
    assert oscd_record["test_cities"] == ["gamma"] and oscd_record["test_tiles"] == 12
    row = oscd_record["rows"][0]
    assert [entry["epoch"] for entry in row["history"]] == [1, 2]
    for key in ("f1", "precision", "recall", "pooled_f1", "best_f1"):
        assert 0.0 <= row[key] <= 1.0
    assert set(row["pooled_per_city_f1"]) == {"gamma"}
    dynamicearthnet = records["eval_dynamicearthnet_frozen"]
    assert dynamicearthnet["mode"] == "frozen" and dynamicearthnet["split"] == "val"
    assert (dynamicearthnet["train_images"], dynamicearthnet["validation_images"]) == (52, 2)
    assert dynamicearthnet["settings"]["input"] == "unit"
    assert dynamicearthnet["settings"]["encoder_bn"] == "train"
    row = dynamicearthnet["rows"][0]
    assert row["input"]["mean"] == [0.4, 0.4, 0.4] and row["encoder_input"] == "unit"
    assert 0.0 <= row["miou"] <= 1.0 and [entry["epoch"] for entry in row["history"]] == [1]


def test_all_bands_evaluations_with_a_seeded_split_and_fine_tuning(tmp_path, one_device):
    encoder = tmp_path / "encoder"
    export.save_encoder(
        encoder,
        common.random_encoder(10, 12, seed=5, width=8),
        {EXPORT_KEY: ALL_BANDS_INPUT.to_json()},
    )
    manual = tmp_path / "downloads"
    manual.mkdir()
    write_eurosat_ms_folder(manual)
    write_bigearthnet(manual, bigearthnet_patches(), as_tar=False)
    write_fake_oscd(manual, band_names=oscd_builder.ALL_BANDS)
    config = tiny_protocols(
        eval_config(
            str(encoder),
            tmp_path,
            "eval_eurosat",
            "eval_bigearthnet",
            "eval_oscd",
            eval__manual_dir=str(manual),
            eval__seeded_split=True,
            eurosat__probe="cached",
            bigearthnet__finetune=True,
            oscd__encoder_bn="eval",
        )
    )
    settings = config_lib.resolve(config)
    for task in settings.tasks:
        tasks.run(task, settings, str(tmp_path / "w"))
    records = {task: read_metrics(str(encoder), task) for task in settings.tasks}

    for task, name in (
        ("eval_eurosat", "eurosat_download"),
        ("eval_bigearthnet", "bigearthnet_download"),
        ("eval_oscd", "oscd"),
    ):
        row = records[task]["rows"][0]
        assert row["dataset"] == f"{name}/all_bands" and row["bands"] == list(layout.BANDS)
    eurosat, bigearthnet = records["eval_eurosat"], records["eval_bigearthnet"]
    assert eurosat["seeded_split"] and bigearthnet["seeded_split"]
    assert (eurosat["train_examples"], eurosat["val_examples"]) == (24, 8)  # 60 % / 20 % of 40
    assert (bigearthnet["train_patches"], bigearthnet["val_patches"]) == (14, 5)
    assert bigearthnet["cloud_snow_removed"] == 0  # no lists in manual_dir
    assert bigearthnet["mode"] == "finetune" and 0.0 < bigearthnet["rows"][0]["micro_ap"] <= 1.0
    assert records["eval_oscd"]["settings"]["encoder_bn"] == "eval"


def test_the_imagenet_row_reads_its_own_export_and_input(tmp_path):
    checkpoint = export.save_encoder(
        tmp_path / "encoder",
        common.random_encoder(10, 12, seed=1, width=8),
        {EXPORT_KEY: ALL_BANDS_INPUT.to_json()},
    )
    imagenet = export.save_encoder(
        tmp_path / "imagenet",
        common.random_encoder(10, 3, seed=2, width=8),
        {EXPORT_KEY: Normalization.rgb().to_json()},
    )
    shared = common.EvalSettings(checkpoint=str(checkpoint), imagenet_checkpoint=str(imagenet))
    rows = common.encoders(shared, 0, str(tmp_path))
    assert [(r.name, r.model.in_channels, r.input.bands) for r in rows] == [
        ("checkpoint", 12, layout.BANDS),
        ("random", 12, layout.BANDS),
        ("imagenet", 3, layout.RGB_BANDS),
    ]


def test_the_random_row_copies_the_checkpoint_architecture(tmp_path):
    narrow = common.random_encoder(18, 3, seed=1, width=8)
    export.save_encoder(tmp_path / "encoder", narrow, {"method": "test"})
    rows = common.encoders(
        common.EvalSettings(checkpoint=str(tmp_path / "encoder")), 0, str(tmp_path)
    )
    assert [(r.name, r.model.width, r.model.depth) for r in rows] == [
        ("checkpoint", 8, 18),
        ("random", 8, 18),
    ]
