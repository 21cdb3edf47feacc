"""Workdir outputs on a bucket (caco_jax/runtime/storage.py), against the local GCS emulator of
`gcs_emulator` on 127.0.0.1. Pretraining into a bucket (checkpoints, the encoder export, resuming)
is tests/test_cloud_workdir.py.
"""

import csv
import io
import json
import os
import struct
import subprocess
import sys

import gcs_emulator
import numpy as np
import pytest

from caco_jax import config as config_lib
from caco_jax.runtime import metrics_writer, storage
from caco_jax.settings import SettingsError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def emulator():
    with gcs_emulator.running() as running:
        yield running


def test_local_paths_become_absolute_and_urls_stay_as_they_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(storage.path("w/encoder")) == str(tmp_path / "w" / "encoder")
    assert os.fspath(storage.path("gs://caco/runs/a/encoder")) == "gs://caco/runs/a/encoder"
    assert storage.is_url("gs://caco/x") and not storage.is_url("/data/x")


def test_metrics_append_to_a_bucket_across_runs_with_tensorboard_beside(emulator):
    workdir = "gs://caco/metrics_run"
    writer = metrics_writer.MetricsWriter(workdir, enabled=True)
    writer.write(1, {"loss": 1.0})
    writer.write(2, {"loss": 0.5})
    assert not storage.path(f"{workdir}/metrics.jsonl").exists()  # held back until a flush
    writer.close()
    resumed = metrics_writer.MetricsWriter(workdir, enabled=True)  # a resumed run appends
    resumed.write(3, {"loss": 0.25})
    resumed.close()
    lines = storage.path(f"{workdir}/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 0.5},
        {"step": 3, "loss": 0.25},
    ]
    events = list(storage.path(f"{workdir}/tensorboard").iterdir())
    assert events and all(e.name.startswith("events.out.tfevents") for e in events)
    points = [point for event_file in sorted(events) for point in scalar_points(event_file)]
    assert points == [(1, "loss", 1.0), (2, "loss", 0.5), (3, "loss", 0.25)]


def scalar_points(event_file) -> list[tuple]:
    """(step, tag, value) of every scalar in a TensorBoard event file (TFRecord framing: length,
    its CRC, the serialised `Event`, its CRC)."""
    from tensorboardX.proto import event_pb2

    data, offset, points = event_file.read_bytes(), 0, []
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
        points += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
        offset += 12 + length + 4
    assert offset == len(data), f"{event_file} ends inside a record"
    return points


def test_metrics_flushed_at_every_line_send_each_line_once(emulator):
    """The worst case (a flush per line) of a long run's metrics.jsonl: rewriting the object at
    each flush would send about lines/2 times its final size; appending by compose sends each line
    once, plus each request's headers."""
    workdir = "gs://caco/flushed_run"
    writer = metrics_writer.MetricsWriter(workdir, enabled=True, flush_seconds=0.0)
    scalars = {f"accuracy/class_{i:03d}": i / 100 for i in range(40)}  # a line of ~1.3 kB
    for step in range(1, 41):
        writer.write(step, scalars)
        assert storage.path(f"{workdir}/metrics.jsonl").read_text().count("\n") == step
    writer.close()
    content = storage.path(f"{workdir}/metrics.jsonl").read_bytes()
    assert [json.loads(line)["step"] for line in content.splitlines()] == list(range(1, 41))
    sent = emulator.uploaded_bytes("flushed_run/metrics.jsonl")  # with the parts composed
    assert len(content) < sent < 1.2 * len(content)  # rewriting: ~20x
    assert sorted(p.name for p in storage.path(workdir).iterdir()) == [
        "metrics.jsonl",
        "tensorboard",
    ]  # the composed parts were deleted


def test_change_histograms_and_evaluator_results_are_written_to_a_bucket(emulator):
    from caco_jax.evaluators import common
    from caco_jax.pretrain import change_report

    png = "gs://caco/run/change/histogram_epoch=001.png"
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, size=(3, 20))
    fraction = change_report.save_change_histograms(png, *values, labels=values[2] > 0.5, epoch=1)
    assert fraction == np.mean(values[2] > 0.5)
    assert storage.path(png).read_bytes().startswith(b"\x89PNG")
    writer = metrics_writer.MetricsWriter("gs://caco/run", enabled=True)
    writer.write_image(1, "change/histogram", png)  # reads the PNG back from the bucket
    writer.close()

    checkpoint = "gs://caco/run/encoder"
    path = common.metrics_path(checkpoint, "eurosat")
    assert path == "gs://caco/run/encoder_eurosat.json"
    common.write_metrics(path, {"top1": np.float32(0.5)})
    assert json.loads(storage.path(path).read_text())["top1"] == 0.5
    assert sorted(p.name for p in storage.path("gs://caco/run").iterdir()) == [
        "change",
        "encoder_eurosat.json",
        "tensorboard",
    ]  # no temporary file left


def test_official_weights_are_read_from_a_bucket(emulator):
    torch = pytest.importorskip("torch")
    from caco_jax.models import convert

    weights = {"conv1.weight": torch.ones(2, 3, 1, 1), "bn1.running_var": torch.ones(2)}
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    storage.path("gs://caco/weights/r18.pth").write_bytes(buffer.getvalue())
    loaded = convert.load_state_dict("gs://caco/weights/r18.pth")
    assert sorted(loaded) == ["bn1.running_var", "conv1.weight"]
    np.testing.assert_array_equal(loaded["conv1.weight"], np.ones((2, 3, 1, 1), np.float32))
    with pytest.raises(FileNotFoundError, match=r"config\.convert\.source: no file gs://caco/none"):
        convert.load_state_dict("gs://caco/none.pth")


def test_run_py_writes_its_results_into_a_bucket_workdir(emulator):
    result = subprocess.run(
        [
            sys.executable,
            "run.py",
            "--config",
            "configs/smoke.py",
            "--config.tasks=()",
            "--workdir",
            "gs://caco/run_py",
        ],
        cwd=ROOT,
        env={**os.environ, **emulator.environment},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "workdir: gs://caco/run_py" in result.stdout
    assert json.loads(storage.path("gs://caco/run_py/results.json").read_text()) == {}


def test_preparing_records_into_a_bucket_stops_before_any_work_naming_the_fix(tmp_path):
    config = config_lib.for_tasks("prepare", "pretrain")
    config.data.data_dir = "gs://caco/tfds"
    with pytest.raises(SettingsError, match=r"config\.data\.data_dir: .*gcsfuse"):
        config_lib.validate(config)
    synthesize = config_lib.for_tasks("synthesize")
    synthesize.data.archive = "gs://caco/archive"
    with pytest.raises(SettingsError, match=r"config\.data\.archive: .*gcsfuse"):
        config_lib.validate(synthesize)
    change_map = config_lib.for_tasks("change_map")
    change_map.change_map.kind = "pretraining"
    change_map.pretrained.cache_dir = "gs://caco/cache"
    with pytest.raises(SettingsError, match=r"config\.pretrained\.cache_dir: .*local"):
        config_lib.validate(change_map)
    pretrained = config_lib.for_tasks("pretrained")
    pretrained.pretrained.name = "r18_100k_caco"
    pretrained.pretrained.torch_output = "gs://caco/r18.pth"
    with pytest.raises(SettingsError, match=r"config\.pretrained\.torch_output: .*local"):
        config_lib.validate(pretrained)
    config.tasks = ("pretrain",)  # reading prepared records from a bucket is allowed
    config_lib.validate(config)
    with pytest.raises(ValueError, match=r"data_dir=gs://caco/tfds: .*gcsfuse BUCKET"):
        storage.local_records_dir("gs://caco/tfds", key="data_dir")
    assert storage.local_records_dir(str(tmp_path)) == str(tmp_path)


def test_embeddings_and_change_maps_are_written_to_a_bucket(emulator):
    import pyarrow.parquet as pq

    from caco_jax.products import change_map, embed

    rng = np.random.default_rng(0)
    ids = ["000000/0", "000000/1", "000001/0"]
    embeddings = embed.Embeddings(
        ids=ids,
        embeddings=rng.normal(size=(3, 4)).astype(np.float32),
        lat=np.array([45.0, 45.0, 46.0]),
        lon=np.array([7.0, 7.0, 8.0]),
        window=np.array([0, 1, 0]),
        nodata=np.zeros(3, np.float32),
    )
    folder, rows = embed.write_dataset(lambda: embeddings, "gs://caco/outputs/embeddings")
    assert (folder, rows) == ("gs://caco/outputs/embeddings", 3)
    read = embed.Embeddings.read(folder)
    np.testing.assert_array_equal(read.embeddings, embeddings.embeddings)
    assert read.ids == ids and read.footprints is None  # points: the locations' centres
    part = storage.path(folder) / "part-00000-of-00001.parquet"
    table = pq.read_table(io.BytesIO(part.read_bytes()))
    assert json.loads(table.schema.metadata[b"geo"])["columns"]["geometry"]["geometry_types"] == [
        "Point"
    ]
    with pytest.raises(FileExistsError, match=r"gs://caco/outputs/embeddings already holds"):
        embed.write_dataset(lambda: embeddings, folder)

    d_lt, d_st = np.array([0.5, 0.1]), np.array([0.1, 0.1])
    result = change_map.ChangeMap(
        ["000000", "000001"], np.array([45.0, 46.0]), np.array([7.0, 8.0]), d_lt, d_st,
        d_lt / (d_st + change_map.EPS), 3.0,
    )  # fmt: skip
    paths = change_map.write(result, "gs://caco/outputs/change_map", land_mask=False)
    assert paths["change_map_csv"] == "gs://caco/outputs/change_map/change_map.csv"
    rows = list(csv.DictReader(io.StringIO(storage.path(paths["change_map_csv"]).read_text())))
    assert [(r["location_id"], r["changed"]) for r in rows] == [
        ("000000", "True"),
        ("000001", "False"),
    ]
    features = json.loads(storage.path(paths["change_map_geojson"]).read_text())["features"]
    assert [f["geometry"]["coordinates"] for f in features] == [[7.0, 45.0], [8.0, 46.0]]
    for png in ("change_map_png", "histograms_png"):
        assert storage.path(paths[png]).read_bytes().startswith(b"\x89PNG")
    with pytest.raises(FileExistsError, match=r"change_map\.csv already exists"):
        change_map.write(result, "gs://caco/outputs/change_map", land_mask=False)
