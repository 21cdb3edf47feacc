"""The change estimate: ratio, running statistics (also sharded), mixture labels, the diagnostic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caco_jax.pretrain import change, change_report


def test_statistics_on_hand_made_embeddings():
    # Location 0: the two windows are orthogonal (d_lt = sqrt 2); location 1: identical (d_lt = 0).
    e_q = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.6, 0.8]])
    e_k1 = jnp.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.6, 0.8]])
    stats = np.asarray(change.change_statistics(e_q, e_k1))
    d_st = np.array([0.0, np.hypot(0.6, 0.2), np.hypot(0.2, 0.2), 0.0])
    d_lt = np.array([np.sqrt(2), np.sqrt(2), 0.0, 0.0])
    np.testing.assert_allclose(stats[:, change.LONG_TERM], d_lt, rtol=1e-6)
    np.testing.assert_allclose(stats[:, change.SHORT_TERM], d_st, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats[:, change.RATIO], d_lt / (d_st + 1e-4), rtol=1e-5)
    np.testing.assert_allclose(
        change.change_ratio(e_q, e_k1, eps=0.5), d_lt / (d_st + 0.5), rtol=1e-6
    )
    with pytest.raises(ValueError, match="odd"):
        change.change_statistics(e_q[:3], e_k1[:3])


def test_running_values_first_visit_then_ema():
    update = jax.jit(change.update_running_change, static_argnames=("beta", "use_ema"))
    running = change.init_running_change(6)
    first = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    running = update(running, jnp.array([4, 1]), first)
    np.testing.assert_array_equal(running.seen, [False, True, False, False, True, False])
    np.testing.assert_array_equal(np.asarray(running.values)[[4, 1]], first)
    second = jnp.array([[10.0, 10.0, 10.0], [0.0, 0.0, 0.0]])
    running = update(running, jnp.array([1, 2]), second)
    np.testing.assert_allclose(running.values[1], 0.8 * first[1] + 0.2 * second[0], rtol=1e-6)
    np.testing.assert_array_equal(running.values[2], second[1])  # first visit of item 2
    np.testing.assert_array_equal(running.values[4], first[0])  # untouched
    no_ema = update(running, jnp.array([1]), second[:1], use_ema=False)
    np.testing.assert_array_equal(no_ema.values[1], second[0])


def test_sharded_statistics_and_update_match_one_device():
    """4 devices, each with one location (2 rows): local statistics, gathered, then folded in."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    P = jax.sharding.PartitionSpec
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.permutation(20)[:8])
    e_q, e_k1 = jnp.asarray(rng.normal(size=(2, 8, 5)), jnp.float32)
    start = change.update_running_change(
        change.init_running_change(20), ids[:3], jnp.ones((3, 3)), beta=0.5
    )
    gather = lambda x: jax.lax.all_gather(x, "data", tiled=True, to="invarying")

    def local_step(running, ids, e_q, e_k1):
        statistics = change.change_statistics(e_q, e_k1)
        return change.update_running_change(running, gather(ids), gather(statistics), beta=0.5)

    sharded = jax.shard_map(
        local_step, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data")), out_specs=P()
    )
    got = jax.jit(sharded)(start, ids, e_q, e_k1)
    expected = change.update_running_change(
        start, ids, change.change_statistics(e_q, e_k1), beta=0.5
    )
    np.testing.assert_allclose(got.values, expected.values, rtol=1e-6)
    np.testing.assert_array_equal(got.seen, expected.seen)


def bimodal(seed, num_items=400):
    rng = np.random.default_rng(seed)
    truth = rng.random(num_items) < 0.3
    ratio = np.where(truth, rng.normal(3.0, 0.3, num_items), rng.normal(1.0, 0.2, num_items))
    values = np.stack([ratio / 2, np.full(num_items, 0.5), ratio], axis=1)
    return values, truth


def test_mixture_labels_the_high_mode_changed():
    values, truth = bimodal(0)
    seen = np.ones(len(truth), bool)
    seen[:10] = False
    labels = change.fit_change_labels(values, seen, seed=0)
    assert labels.dtype == bool and not labels[:10].any()  # never visited: not changed
    assert np.mean(labels[10:] == truth[10:]) > 0.98
    np.testing.assert_array_equal(labels, change.fit_change_labels(values, seen, seed=0))
    # d_lt alone (column 0) carries the same modes here.
    long_term = change.fit_change_labels(values, seen, seed=1, statistic="long_term")
    assert np.mean(long_term[10:] == truth[10:]) > 0.98


def test_per_location_labels_pair_the_items():
    values, truth = bimodal(1)
    values[1::2] = values[0::2] * 1.05  # both windows of a location in the same mode
    seen = np.ones(len(truth), bool)
    seen[7] = False  # location 3 is decided by item 6 alone
    labels = change.fit_change_labels(values, seen, seed=0, granularity="location")
    np.testing.assert_array_equal(labels[0::2], labels[1::2])
    location_ratio = np.where(seen, values[:, 2], np.nan).reshape(-1, 2)
    location_ratio = np.nanmean(location_ratio, axis=1)
    assert np.all(labels[0::2][location_ratio > 2.5]) and not np.any(
        labels[0::2][location_ratio < 1.5]
    )


@pytest.mark.parametrize(
    "values, seen",
    [
        (np.full((6, 3), 0.7), np.ones(6, bool)),  # all equal
        (np.arange(18.0).reshape(6, 3), np.eye(6, dtype=bool)[2]),  # a single seen item
        (np.zeros((6, 3)), np.zeros(6, bool)),  # nothing seen (epoch 0)
        (np.zeros((0, 3)), np.zeros(0, bool)),  # no items
    ],
)
def test_degenerate_inputs_label_nothing_changed(values, seen):
    labels = change.fit_change_labels(values, seen, seed=0)
    assert labels.shape == seen.shape and not labels.any()


def test_non_finite_values_are_excluded_and_not_changed():
    values, truth = bimodal(2, num_items=100)
    values[5, 2] = np.nan
    values[6, 2] = np.inf
    labels = change.fit_change_labels(values, np.ones(100, bool), seed=0)
    assert not labels[5] and not labels[6]
    keep = np.r_[0:5, 7:100]
    assert np.mean(labels[keep] == truth[keep]) > 0.95


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="granularity"):
        change.fit_change_labels(np.zeros((2, 3)), np.ones(2, bool), seed=0, granularity="city")
    with pytest.raises(ValueError, match="statistic"):
        change.fit_change_labels(np.zeros((2, 3)), np.ones(2, bool), seed=0, statistic="short")
    with pytest.raises(ValueError, match="values"):
        change.fit_change_labels(np.zeros((2, 2)), np.ones(2, bool), seed=0)


def test_histograms_png(tmp_path):
    values, truth = bimodal(3, num_items=60)
    path = tmp_path / "histograms" / "epoch_003.png"
    fraction = change_report.save_change_histograms(
        path, values[:, 0], values[:, 1], values[:, 2], truth, epoch=3
    )
    assert fraction == pytest.approx(truth.mean())
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
