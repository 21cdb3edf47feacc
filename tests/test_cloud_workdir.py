"""Pretraining with a bucket workdir (``gs://``), against the local GCS emulator of
`gcs_emulator` (which serves the object generations TensorStore needs): the Orbax checkpoints,
the encoder export, metrics.jsonl and TensorBoard land in the bucket, and a second run resumes from
the bucket's newest checkpoint. The records stay local, as `prepare` writes them.

The run: the embedded synthetic archive's 3 locations, prepared; batches of 6 items (the 3
locations, 2 views each) on one device, so an epoch is one step; a checkpoint every step.
"""

import json
import os
import tempfile

import gcs_emulator
import jax
import pytest
from helpers import prepare, synthetic_folder, tiny_settings

from caco_jax.data import dataset, normalization, records
from caco_jax.models import export
from caco_jax.pretrain import train
from caco_jax.runtime import mesh as mesh_lib
from caco_jax.runtime import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKDIR = f"gs://{gcs_emulator.BUCKET}/run"


@pytest.fixture(scope="module")
def emulator():
    with gcs_emulator.running() as environment:
        yield environment


def bucket_objects(prefix: str) -> list[str]:
    """Every object name under ``gs://<bucket>/<prefix>``, relative to it."""
    import gcsfs

    root = f"{gcs_emulator.BUCKET}/{prefix}/"
    gcs = gcsfs.GCSFileSystem()
    gcs.invalidate_cache()
    return sorted(name.removeprefix(root) for name in gcs.find(root))


def pretrain(settings, data_dir):
    source = dataset.open_records(data_dir, "rgb")
    return train.train(
        settings,
        WORKDIR,
        source,
        normalization=normalization.for_records("rgb", source),
        locations=lambda: records.location_table(source),
        mesh=mesh_lib.data_mesh(jax.devices()[:1]),
    )


def local_gs_folders(tree, *folders) -> list[str]:
    """``gs:`` folders (a bucket path taken for a local one) anywhere under ``tree`` or right in
    ``folders``."""
    found = [os.path.join(f, "gs:") for f in folders if os.path.exists(os.path.join(f, "gs:"))]
    for folder, dirnames, _ in os.walk(tree):
        found += [os.path.join(folder, d) for d in dirnames if d == "gs:"]
    return found


def test_pretraining_writes_into_a_bucket_and_resumes_from_it(
    emulator, tmp_path, tmp_path_factory, monkeypatch
):
    data_dir = tmp_path / "tfds"
    prepare(synthetic_folder(tmp_path_factory), data_dir, num_workers=1)
    monkeypatch.chdir(tmp_path)  # where a bucket path mistaken for a local one would land
    # One step per epoch: a checkpoint at each epoch's end.
    settings = tiny_settings(batch_size=6, epochs=2).replace(checkpoint={"every_steps": 1})

    first = pretrain(settings, os.fspath(data_dir))
    assert (first["steps"], first["resumed_from"], first["steps_per_epoch"]) == (2, None, 1)
    assert first["encoder"] == f"{WORKDIR}/encoder"
    written = bucket_objects("run")
    for step in (1, 2):
        for item in ("state/manifest.ocdbt", "data_position/metadata", "config/metadata"):
            assert f"checkpoints/{step}/{item}" in written
    assert "encoder/state/manifest.ocdbt" in written and "encoder/metadata/metadata" in written
    assert not [name for name in written if name.startswith("encoder.")]  # swapped in, not left
    assert any(name.startswith("tensorboard/events.out.tfevents") for name in written)
    assert {"change/histogram_epoch=000.png", "change/labels.csv"} <= set(written)
    assert export.read_metadata(f"{WORKDIR}/encoder")["step"] == 2
    steps = [json.loads(line)["step"] for line in storage.path(f"{WORKDIR}/metrics.jsonl").open()]
    assert steps[0] == 1 and steps[-1] == 2

    second = pretrain(settings.replace(train={"epochs": 3}), os.fspath(data_dir))
    assert (second["resumed_from"], second["steps"]) == (2, 3)
    assert "checkpoints/3/state/manifest.ocdbt" in bucket_objects("run")
    assert export.read_metadata(f"{WORKDIR}/encoder")["step"] == 3
    lines = [json.loads(line) for line in storage.path(f"{WORKDIR}/metrics.jsonl").open()]
    assert sorted({line["step"] for line in lines}) == [1, 2, 3]  # the second run appended
    assert not local_gs_folders(tmp_path, ROOT, tempfile.gettempdir(), os.path.expanduser("~"))
