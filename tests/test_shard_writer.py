"""Writing records in worker processes (data/shard_writer.py): layout, order and failures."""

import multiprocessing
import os
import signal

import pytest
from helpers import EARLY, LATE, RGB_GROUPS, RGB_KEEP, prepare, replicated_tar, write_location

from caco_jax.data import archive, builder, dataset, shard_writer


@pytest.fixture(scope="module")
def seven_locations(tmp_path_factory):
    """A tar.gz of 7 copies of one location, ids 000000..000006."""
    root = tmp_path_factory.mktemp("seven")
    write_location(root / "one", "000000", EARLY + LATE)
    manual = root / "manual"
    manual.mkdir()
    replicated_tar(root / "one" / "000000", 7, manual / "caco10k.tar.gz")
    return manual


def test_shard_layout_and_record_order_do_not_depend_on_the_number_of_workers(
    seven_locations, tmp_path, monkeypatch
):
    # 2 lanes of 2 locations per shard: location n -> lane n % 2, piece n // 4.
    monkeypatch.setattr(shard_writer, "LANES", 2)
    monkeypatch.setattr(shard_writer, "LOCATIONS_PER_SHARD", 2)
    for num_workers in (1, 2):
        data_dir = tmp_path / f"workers{num_workers}"
        prepared = prepare(seven_locations, data_dir, num_workers=num_workers)
        source = dataset.open_records(os.fspath(data_dir))
        order = [source.location_id(i) for i in range(len(source))]
        assert order == ["000000", "000002", "000001", "000003", "000004", "000006", "000005"]
        assert source.index.first.tolist() == [10 * i for i in range(7)]
        # Each location's 10 acquisition records are contiguous, in the locations' order.
        ids = [r["location_id"].decode() for r in source.acquisitions]
        assert ids == [i for i in order for _ in range(10)]
        assert prepared.info.splits["train"].shard_lengths == [20, 20, 20, 10]
        names = sorted(os.listdir(prepared.data_path))
        assert [n for n in names if ".array_record-" in n] == [
            f"caco_geography-train.array_record-{i:05d}-of-00004" for i in range(4)
        ]
        assert not [n for n in names if n.endswith(".tmp")]


def _write(tar, out, on_location, features=None):
    return shard_writer.write_shards(
        archive.read_locations(archive.find_archive(tar), RGB_KEEP),
        groups=RGB_GROUPS,
        features=features or builder.acquisition_features(RGB_GROUPS),
        directory=os.fspath(out),
        prefix="records",
        num_workers=2,
        on_location=on_location,
    )


def test_an_error_in_a_worker_stops_the_build_and_names_the_location(seven_locations, tmp_path):
    # Records that do not fit the features make the worker raise: a bug, not a bad file.
    wrong = builder.acquisition_features(builder.PIXEL_GROUPS["all_bands"])
    with pytest.raises(shard_writer.WorkerError, match=r"decoding location 0000\d\d failed"):
        _write(seven_locations / "caco10k.tar.gz", tmp_path, lambda _: None, wrong)


def test_a_killed_worker_stops_the_build_and_names_its_locations(seven_locations, tmp_path):
    def locations_killing_a_worker():
        """The stream, killing a worker after location 2: no worker can have finished by then."""
        stream = archive.read_locations(
            archive.find_archive(seven_locations / "caco10k.tar.gz"), RGB_KEEP
        )
        for n, location in enumerate(stream):
            yield location
            if n == 2:
                worker = next(
                    p for p in multiprocessing.active_children() if p.name == "caco-shard-writer-1"
                )
                os.kill(worker.pid, signal.SIGKILL)

    with pytest.raises(shard_writer.WorkerError, match=r"worker 1 died \(exit code .*\) while"):
        shard_writer.write_shards(
            locations_killing_a_worker(),
            groups=RGB_GROUPS,
            features=builder.acquisition_features(RGB_GROUPS),
            directory=os.fspath(tmp_path),
            prefix="records",
            num_workers=2,
            on_location=lambda _: None,
        )


def test_the_number_of_workers_divides_the_lanes():
    assert shard_writer.LANES == 48
    assert [shard_writer.usable_workers(n) for n in (0, 1, 2, 5, 7, 10, 16, 20, 100)] == [
        1,
        1,
        2,
        4,
        6,
        8,
        16,
        16,
        48,
    ]
