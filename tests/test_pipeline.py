"""The host input pipeline: epochs, pairs, draws, determinism, resume, process shards."""

import dataclasses
import os

import numpy as np
import pytest
from helpers import (
    InMemoryLocations,
    count_record_reads,
    prepare,
    synthetic_folder,
    tiny_config,
)

from caco_jax import config as config_lib
from caco_jax import methods
from caco_jax.data import dataset, item_sampler, normalization, pipeline
from caco_jax.data.pipeline import InputSettings

SIZE = 4  # pixels per side of the fake images
WINDOWS = np.asarray((0,) * 5 + (1,) * 5)


def fake_records(num_locations, windows=WINDOWS, bands=False):
    """Locations shaped like the records: pixel (0, 0) encodes (location, acquisition)."""
    windows = np.asarray(windows)
    locations = []
    for index in range(num_locations):
        count = len(windows)
        pixels = np.zeros((count, SIZE, SIZE, 3), np.uint8)
        pixels[:, 0, 0, 0] = index
        pixels[:, 0, 0, 1] = np.arange(count)
        if bands:
            pixels = {
                "bands_10m": np.repeat(pixels[..., :1], 4, axis=-1),
                "bands_20m": np.full((count, 2, 2, 6), 100 + index, np.uint8),
                "bands_60m": np.full((count, 1, 1, 2), 200, np.uint8),
            }
        locations.append({"location_id": f"{index:06d}", "pixels": pixels, "window": windows})
    return InMemoryLocations(locations)


def make(
    source, mode="caco", batch=4, seed=0, epochs=1, workers=0, threads=0, process=(0, 1), start=0
):
    counts = int(source.acquisition_counts().sum())
    return pipeline.make_pipeline(
        InputSettings(num_workers=workers, num_threads=threads),
        source,
        pipeline.Stream.of(methods.get(mode), batch, seed, len(source), counts),
        num_epochs=epochs,
        process_index=process[0],
        process_count=process[1],
        start_batch=start,
    )


def decode(batch):
    """(location, acquisition index) of every row and view, from the encoded pixel."""
    return batch["images"][:, :, 0, 0, 0], batch["images"][:, :, 0, 0, 1]


def test_caco_epoch_visits_every_location_once_with_pairs_side_by_side():
    source = fake_records(11)  # 11 locations, 2 per batch: 5 steps, one location dropped per epoch
    assert pipeline.Stream("caco", 4, 0, 11).steps_per_epoch == 5
    batches = list(make(source, epochs=2))
    assert len(batches) == 10
    for epoch in (batches[:5], batches[5:]):
        seen = np.concatenate([b["location_index"][::2] for b in epoch])
        assert len(set(seen.tolist())) == 10
    first = np.concatenate([b["location_index"] for b in batches[:5]])
    second = np.concatenate([b["location_index"] for b in batches[5:]])
    assert not np.array_equal(first, second)  # reshuffled per epoch
    for b in batches:
        assert b["images"].shape == (4, 3, SIZE, SIZE, 3) and b["images"].dtype == np.uint8
        loc = b["location_index"]
        np.testing.assert_array_equal(loc[0::2], loc[1::2])
        np.testing.assert_array_equal(b["window"], [0, 1, 0, 1])
        np.testing.assert_array_equal(b["item_id"], 2 * loc + b["window"])
        assert {k: v.dtype for k, v in b.items() if k != "images"} == dict.fromkeys(
            ("item_id", "window", "location_index"), np.int32
        )
        locations, acquisitions = decode(b)
        np.testing.assert_array_equal(locations, np.repeat(loc[:, None], 3, axis=1))
        for row in range(4):
            picks = acquisitions[row]
            assert len(set(picks.tolist())) == 3  # caco: distinct
            np.testing.assert_array_equal(WINDOWS[picks], b["window"][row])


def test_draw_rules_per_mode():
    windows = np.array([0] * 5 + [1] * 5)
    rng = np.random.default_rng(0)
    teco_repeats = seco_repeats = 0
    for _ in range(200):
        teco = item_sampler.draw_acquisitions(
            windows, method=methods.get("teco"), item_window=1, rng=rng
        )
        assert (windows[teco] == 1).all() and len(teco) == 3
        teco_repeats += len(set(teco.tolist())) < 3
        seco = item_sampler.draw_acquisitions(
            windows, method=methods.get("seco"), item_window=0, rng=rng
        )
        seco_repeats += len(set(seco.tolist())) < 3
        distinct = item_sampler.draw_acquisitions(
            windows,
            method=methods.get("seco"),
            item_window=0,
            rng=rng,
            acquisition_draws="distinct",
        )
        assert len(set(distinct.tolist())) == 3
        assert (
            len(
                item_sampler.draw_acquisitions(
                    windows, method=methods.get("moco"), item_window=0, rng=rng
                )
            )
            == 1
        )
    # The official teco/seco code draws with replacement: repeats are common (P ~ 0.52 and 0.28).
    assert teco_repeats > 50 and seco_repeats > 20
    with pytest.raises(
        ValueError, match=r"location 000007: caco needs 3 acquisition\(s\) in window 1"
    ):
        item_sampler.draw_acquisitions(
            np.array([0, 0, 0, 1, 1]),
            method=methods.get("caco"),
            item_window=1,
            rng=rng,
            location="000007",
        )


def test_seco_one_row_per_location_from_all_acquisitions():
    source = fake_records(8)
    batches = list(make(source, mode="seco", batch=4))
    assert len(batches) == 2
    picked = set()
    for b in batches:
        assert b["images"].shape == (4, 3, SIZE, SIZE, 3)
        np.testing.assert_array_equal(b["item_id"], b["location_index"])
        locations, acquisitions = decode(b)
        np.testing.assert_array_equal(locations[:, 0], b["location_index"])
        np.testing.assert_array_equal(b["window"], WINDOWS[acquisitions[:, 0]])
        picked.update(acquisitions.ravel().tolist())
    assert sorted(np.concatenate([b["location_index"] for b in batches])) == list(range(8))
    assert len(picked & {0, 1, 2, 3, 4}) > 0 and len(picked & {5, 6, 7, 8, 9}) > 0


def test_moco_epoch_visits_every_acquisition_once():
    windows = [WINDOWS, WINDOWS[1:], WINDOWS]  # 10, 9 and 10 acquisitions
    locations = [fake_records(1, windows=w).locations[0] for w in windows]
    for index, location in enumerate(locations):
        location["pixels"][:, 0, 0, 0] = index
        location["location_id"] = f"{index:06d}"
    source = InMemoryLocations(locations)
    assert pipeline.Stream("moco", 4, 0, 3, num_acquisitions=29).steps_per_epoch == 7  # 1 dropped
    assert pipeline.Stream("moco", 1, 0, 3, num_acquisitions=29).steps_per_epoch == 29
    with pytest.raises(ValueError, match="needs more acquisitions than the 0 in the dataset"):
        pipeline.Stream("moco", 1, 0, 3).steps_per_epoch  # noqa: B018
    batches = list(make(source, mode="moco", batch=1, epochs=2))
    assert len(batches) == 58
    epochs = []
    for epoch in (batches[:29], batches[29:]):
        seen = []
        for b in epoch:
            assert b["images"].shape == (1, 1, SIZE, SIZE, 3)
            location, acquisition = (int(x[0, 0]) for x in decode(b))
            assert b["location_index"][0] == b["item_id"][0] == location
            assert b["window"][0] == windows[location][acquisition]
            seen.append((location, acquisition))
        assert sorted(seen) == [(i, t) for i in range(3) for t in range(len(windows[i]))]
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    assert source.pixel_reads == 58  # one acquisition read per item
    with pytest.raises(ValueError, match="the stream is of 30 acquisitions, the source holds 29"):
        pipeline.make_pipeline(
            InputSettings(),
            source,
            pipeline.Stream("moco", 1, 0, 3, num_acquisitions=30),
        )


def test_reproducible_and_independent_of_threads_and_workers():
    source = fake_records(12)
    reference = list(make(source, seed=3, epochs=2))
    for threads, workers in ((4, 0), (0, 2)):
        other = list(make(source, seed=3, epochs=2, threads=threads, workers=workers))
        assert len(other) == len(reference)
        for a, b in zip(reference, other, strict=True):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
    different = list(make(source, seed=4, epochs=2))
    assert any(
        not np.array_equal(a["images"], b["images"])
        for a, b in zip(reference, different, strict=True)
    )


@pytest.mark.parametrize("method", ["caco", "moco"])
def test_stream_started_at_a_global_batch_continues_the_stream_on_any_process_count(method):
    # caco: 16 locations, 4 per global batch of 8; moco: 16 x 10 acquisitions, 8 per batch.
    source = fake_records(16)
    batches = {"caco": 4, "moco": 20}[method]
    straight = list(make(source, mode=method, batch=8, epochs=3))
    assert len(straight) == 3 * batches
    for count in (1, 2, 4):  # resumed mid-epoch 1 (batch batches + 1) by 1, 2 or 4 processes
        start = batches + 1
        shards = [
            list(make(source, mode=method, batch=8, epochs=3, process=(p, count), start=start))
            for p in range(count)
        ]
        assert [len(s) for s in shards] == [2 * batches - 1] * count
        for step, want in enumerate(straight[start:]):
            for key in want:
                joined = np.concatenate([shard[step][key] for shard in shards])
                np.testing.assert_array_equal(joined, want[key])
    end = 3 * batches
    assert list(make(source, mode=method, batch=8, epochs=3, start=end)) == []
    with pytest.raises(ValueError, match=f"start_batch={end + 1} is not within the stream's {end}"):
        make(source, mode=method, batch=8, epochs=3, start=end + 1)


def test_resume_refuses_a_position_saved_for_another_stream():
    stream = pipeline.Stream("caco", 8, 0, 16)
    saved = pipeline.Position.from_json(pipeline.Position(5, stream).to_json())  # as checkpointed
    assert saved.start_batch(stream) == 5
    with pytest.raises(ValueError, match="global_batch_size=8, this run has global_batch_size=16"):
        saved.start_batch(dataclasses.replace(stream, global_batch_size=16))
    with pytest.raises(ValueError, match="seed=0, this run has seed=1"):
        saved.start_batch(dataclasses.replace(stream, seed=1))
    with pytest.raises(ValueError, match="method='caco', this run has method='teco'"):
        saved.start_batch(dataclasses.replace(stream, method="teco"))
    # A position saved before the method table, when the method was called "mode", still resumes.
    old = {"next_global_batch": 5, "mode": "caco", "global_batch_size": 8, "seed": 0}
    assert pipeline.Position.from_json({**old, "num_locations": 16}).start_batch(stream) == 5
    # A moco position from when its epochs were over locations means other batches now.
    moco = pipeline.Stream("moco", 8, 0, 16, num_acquisitions=160)
    assert moco.epoch_over == "acquisitions" and stream.epoch_over == "locations"
    saved = pipeline.Position.from_json({**old, "mode": "moco", "num_locations": 16})
    with pytest.raises(ValueError, match="epoch_over='locations', this run has epoch_over='acq"):
        saved.start_batch(moco)
    with pytest.raises(ValueError, match="num_acquisitions=160, this run has num_acquisitions=150"):
        pipeline.Position(5, moco).start_batch(dataclasses.replace(moco, num_acquisitions=150))


def test_process_shards_partition_the_global_batch_keeping_pairs():
    source = fake_records(16)
    whole = list(make(source, batch=8))
    shards = [list(make(source, batch=8, process=(p, 2))) for p in range(2)]
    assert len(whole) == len(shards[0]) == len(shards[1]) == 4
    for step, batch in enumerate(whole):
        for key in batch:
            joined = np.concatenate([shards[0][step][key], shards[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key])
        np.testing.assert_array_equal(shards[1][step]["window"], [0, 1, 0, 1])


def test_bad_batch_shapes_are_named():
    source = fake_records(4)
    with pytest.raises(ValueError, match="global_batch_size=5 must be a positive multiple of 2"):
        make(source, batch=5)
    with pytest.raises(ValueError, match="divide evenly over process_count=4"):
        make(source, batch=4, process=(0, 4))
    with pytest.raises(ValueError, match="needs more locations than the 4"):
        make(source, batch=10)
    short = fake_records(2, windows=(0, 0, 0, 1, 1))
    with pytest.raises(ValueError, match=r"location 0 \(000000\): caco needs 3"):
        next(make(short, batch=2))


def test_all_bands_batches_and_statistics():
    source = fake_records(4, bands=True)
    batch = next(make(source, batch=4))
    shapes = {k: v.shape for k, v in batch["images"].items()}
    assert shapes == {
        "bands_10m": (4, 3, SIZE, SIZE, 4),
        "bands_20m": (4, 3, 2, 2, 6),
        "bands_60m": (4, 3, 1, 1, 2),
    }
    norm = normalization.for_records("all_bands", source)
    assert len(norm.low) == len(norm.mean) == 12
    # B1 (60 m) is constant 200: its range is pinned to [200, 201] and it stretches to 0.
    assert norm.low[0] == 200 and norm.high[0] == 201 and norm.mean[0] == 0
    assert normalization.for_records("rgb", source).low == (0.0, 2.0, 3.0)


# The (location, acquisition) of every row and view of two epochs with seed 5 over 6 fake
# locations, as the one-record-per-location layout (builder 1.0.0) gave them: the draws do not
# depend on how the records are laid out.
PER_LOCATION_LAYOUT = {
    "caco": [
        [[1, 1, 4, 4], [[2, 4, 3], [5, 6, 9], [2, 0, 4], [9, 6, 7]]],
        [[2, 2, 3, 3], [[4, 0, 1], [6, 9, 8], [2, 4, 0], [9, 7, 5]]],
        [[5, 5, 0, 0], [[0, 2, 3], [9, 6, 7], [3, 2, 0], [7, 9, 5]]],
        [[2, 2, 0, 0], [[1, 3, 2], [6, 7, 9], [0, 4, 3], [7, 8, 6]]],
        [[5, 5, 4, 4], [[2, 0, 4], [7, 9, 8], [4, 2, 3], [7, 5, 9]]],
        [[3, 3, 1, 1], [[3, 1, 2], [5, 7, 9], [1, 2, 3], [6, 8, 7]]],
    ],
    "teco": [
        [[1, 1, 4, 4], [[4, 3, 2], [6, 6, 9], [0, 3, 4], [7, 8, 6]]],
        [[2, 2, 3, 3], [[0, 2, 0], [7, 9, 9], [3, 0, 2], [5, 8, 9]]],
        [[5, 5, 0, 0], [[0, 3, 3], [9, 7, 7], [3, 4, 0], [5, 7, 7]]],
        [[2, 2, 0, 0], [[2, 4, 2], [7, 8, 7], [0, 3, 3], [7, 8, 8]]],
        [[5, 5, 4, 4], [[1, 3, 2], [9, 7, 8], [4, 2, 4], [5, 7, 9]]],
        [[3, 3, 1, 1], [[2, 1, 2], [9, 5, 7], [4, 4, 1], [7, 8, 8]]],
    ],
    "seco": [
        [[1, 4, 2, 3], [[8, 7, 5], [1, 7, 9], [1, 4, 0], [7, 1, 4]]],
        [[2, 0, 5, 4], [[4, 8, 4], [1, 7, 7], [2, 7, 5], [9, 5, 9]]],
    ],
}


@pytest.mark.parametrize("method", sorted(PER_LOCATION_LAYOUT))
def test_batches_are_those_of_the_per_location_layout(method):
    source = fake_records(6)
    batches = list(make(source, mode=method, seed=5, epochs=2))
    assert len(batches) == len(PER_LOCATION_LAYOUT[method])
    for batch, (locations, acquisitions) in zip(batches, PER_LOCATION_LAYOUT[method], strict=True):
        np.testing.assert_array_equal(batch["location_index"], locations)
        np.testing.assert_array_equal(decode(batch)[1], acquisitions)
        np.testing.assert_array_equal(decode(batch)[0][:, 0], locations)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The `rgb` records of the synthetic archive (3 locations): their data_dir."""
    data_dir = tmp_path_factory.mktemp("pipeline_tfds")
    prepare(synthetic_folder(tmp_path_factory), data_dir, num_workers=1)
    return os.fspath(data_dir)


def test_prepared_records_end_to_end(prepared):
    """The real records (synthetic archive -> builder): each location reads only the acquisitions
    its items drew, each once, and the batches hold exactly those acquisitions' pixels."""
    source = dataset.open_records(prepared, "rgb")
    whole = [source[i] for i in range(len(source))]
    reads = count_record_reads(source)
    input_settings = InputSettings()
    for method, batch_size in (("caco", 2), ("seco", 1)):
        reads.clear()
        batches = list(
            pipeline.make_pipeline(
                input_settings,
                source,
                pipeline.Stream(method, batch_size, 0, len(source)),
                num_epochs=1,
            )
        )
        assert len(batches) == len(source) == 3
        drawn = 0
        for batch in batches:
            location = int(batch["location_index"][0])
            arrays = whole[location]
            picks = [
                item_sampler.draw_acquisitions(
                    arrays["window"],
                    method=methods.get(method),
                    item_window=w,
                    rng=item_sampler.item_rng(0, 0, location, w),
                )
                for w in range(methods.get(method).items_per_location)
            ]
            drawn += len(np.unique(np.concatenate(picks)))
            np.testing.assert_array_equal(batch["images"], arrays["pixels"][np.stack(picks)])
        assert len(reads) == drawn  # each drawn acquisition read once, nothing else
        assert drawn <= {"caco": 6, "seco": 3}[method] * len(source)
    reads.clear()  # moco: each acquisition once, read alone
    stream = pipeline.Stream("moco", 1, 0, len(source), num_acquisitions=30)
    batches = list(pipeline.make_pipeline(input_settings, source, stream, num_epochs=1))
    assert len(batches) == 30 and sorted(reads) == list(range(30))
    visited = set()
    for batch in batches:
        location = int(batch["location_index"][0])
        pixels = whole[location]["pixels"]
        (t,) = [t for t in range(len(pixels)) if np.array_equal(pixels[t], batch["images"][0, 0])]
        visited.add((location, t))
    assert len(visited) == 30


def test_pretrain_reads_no_pixels_before_its_first_batch(prepared, tmp_path, monkeypatch):
    """Counting locations, their ids and coordinates, the normalisation and the stream: what the
    `pretrain` task prepares before its first step comes from the side index. (`train.train` then
    only builds the model from ``len(source)`` and asks the change report's table lazily.)"""
    from caco_jax.pretrain import train

    opened, handed_to_train = [], {}
    open_records = dataset.open_records

    def counted_records(*args, **kwargs):
        source = open_records(*args, **kwargs)
        opened.append(count_record_reads(source))
        return source

    monkeypatch.setattr(dataset, "open_records", counted_records)
    monkeypatch.setattr(train, "train", lambda *args, **kwargs: handed_to_train.update(kwargs))
    config = tiny_config(batch_size=2)  # caco: one location per batch
    config.data.data_dir = prepared
    settings = config_lib.resolve(config)
    train.run_task(settings, os.fspath(tmp_path))
    (reads,) = opened
    table = handed_to_train["locations"]()
    assert [row[0] for row in table] == ["000000", "000001", "000002"]
    assert handed_to_train["normalization"].bands == ("B4", "B3", "B2")
    assert reads == []
    source = dataset.open_records(prepared)
    reads = opened[-1]
    stream = pipeline.Stream.of(settings.method.method, 2, settings.seed, len(source))
    batches = pipeline.make_pipeline(settings.input, source, stream)
    assert reads == []
    first = next(batches)
    assert first["images"].shape == (2, 3, 264, 264, 3)
    assert 3 <= len(reads) <= 6 * 3  # the drawn acquisitions of the first batch(es) prefetched


def test_the_pretrain_config_runs_the_official_moco_schedule():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_config", "configs/pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    moco = module.get_config("moco,r18,100k")
    assert (moco.train.epochs, tuple(moco.train.milestones)) == (200, (120, 160))
    # No official MoCo run on the 1M archive: the same schedule, labelled an extrapolation.
    with pytest.warns(UserWarning, match=r"moco,r50,1m: no official run; an extrapolation .*781k"):
        moco = module.get_config("moco,r50,1m")
    assert (moco.train.epochs, tuple(moco.train.milestones)) == (200, (120, 160))
    caco = module.get_config("caco,r50,100k")
    assert (caco.train.epochs, tuple(caco.train.milestones)) == (1000, (600, 800))
