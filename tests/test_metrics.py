"""Exact host metrics against brute force, streaming device metrics against exact ones."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from recis_jax.metrics import StreamingState, auc, calibration, gauc, logloss, streaming
from recis_jax.metrics.streaming import _accumulate

PIN_LABELS = [0, 0, 1, 0, 0, 0, 1, 0, 1, 1]
PIN_PREDS = [.1, .2, .3, .4, .4, .5, .6, .7, .8, .9]
HIST_AUC_BOUND = 1e-4  # the bound stated in streaming's docstring for DEFAULT_BINS


def brute_auc(y, s, w=None):
    """O(n^2) weighted pair count with ties = 1/2 (0/1 labels)."""
    y, s = np.asarray(y, bool), np.asarray(s, np.float64)
    w = np.ones(len(s)) if w is None else np.asarray(w, np.float64)
    sp, wp, sn, wn = s[y], w[y], s[~y], w[~y]
    pair = (sp[:, None] > sn[None, :]) + 0.5 * (sp[:, None] == sn[None, :])
    return float(np.sum(wp[:, None] * wn[None, :] * pair) / (wp.sum() * wn.sum()))


def loop_gauc(y, s, g, w=None):
    w = np.ones(len(s)) if w is None else np.asarray(w, np.float64)
    num = den = 0.0
    used = 0
    for k in np.unique(g):
        m = g == k
        if y[m].all() or not y[m].any():
            continue
        n_g = w[m].sum()
        num += n_g * brute_auc(y[m], s[m], w[m])
        den += n_g
        used += 1
    return num / den, used


def ctr_like(rng, n, num_tasks=None):
    """CTR-like logits (~3% positives) with labels drawn from their probabilities."""
    shape = (n,) if num_tasks is None else (n, num_tasks)
    x = rng.normal(-4.0, 1.0, shape).astype(np.float32)
    y = (rng.random(shape) < 1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    return x, y


def probs(x):
    """The float32 probabilities the streaming metric bins, as float64."""
    return np.asarray(jax.nn.sigmoid(jnp.asarray(x, jnp.float32)), np.float64)


update = jax.jit(streaming.update)


# --------------------------------------------------------------------------- exact


def test_pinned_auc_and_gauc():
    assert auc(PIN_LABELS, PIN_PREDS) == 19 / 24
    assert auc(np.asarray(PIN_LABELS, np.float32), PIN_PREDS) == 19 / 24
    value, used = gauc([1, 0, 0, 1, 1, 0, 1, 0, 1, 1], [.9, .1, .2, .8, .3, .6, .7, .4, .5, .2],
                       np.asarray([0, 0, 0, 0, 1, 1, 1, 2, 2, 2], np.int64))
    assert (value, used) == (0.7, 3)


def test_auc_matches_brute_force_with_ties_and_weights():
    rng = np.random.default_rng(0)
    for _ in range(5):
        n = 300
        y = rng.random(n) < 0.3
        s = rng.integers(0, 20, n) / 20.0  # many ties
        w = rng.random(n) * 3
        assert auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)
        assert auc(y.astype(np.float64), s, w) == pytest.approx(brute_auc(y, s, w), abs=1e-12)
    # Integer weights = repeated rows.
    w = rng.integers(1, 4, 50)
    y, s = rng.random(50) < 0.5, rng.random(50)
    assert auc(y, s, w) == pytest.approx(auc(np.repeat(y, w), np.repeat(s, w)), abs=1e-12)


def test_single_class_and_nan():
    assert np.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert np.isnan(auc([0, 0], [0.1, 0.2]))
    assert np.isnan(auc([0, 1], [0.1, 0.2], weights=[1.0, 0.0]))
    assert np.isnan(auc([0, 1], [0.1, np.nan]))
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    value, used = gauc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1])
    assert np.isnan(value) and used == 0
    with pytest.raises(ValueError):
        auc([0, 1], [0.1, 0.2, 0.3])


def test_gauc_matches_loop_including_first_and_last_group():
    rng = np.random.default_rng(1)
    n = 2000
    g = rng.integers(-(1 << 62), 1 << 62, 60)[rng.integers(0, 60, n)]  # any int64 ids
    y = rng.random(n) < 0.4
    s = rng.integers(0, 10, n) / 10.0
    w = rng.random(n) + 0.5
    value, used = gauc(y, s, g)
    ref, ref_used = loop_gauc(y, s, g)
    assert value == pytest.approx(ref, abs=1e-12) and used == ref_used
    value, used = gauc(y, s, g, w)
    ref, ref_used = loop_gauc(y, s, g, w)
    assert value == pytest.approx(ref, abs=1e-12) and used == ref_used
    # Only the smallest and largest group ids have both classes: both must count.
    g2 = np.array([0, 0, 5, 6, 9, 9])
    assert gauc([1, 0, 1, 0, 0, 1], [0.9, 0.1, 0.5, 0.5, 0.9, 0.1], g2) == (0.5, 2)


def test_gauc_is_fast():
    rng = np.random.default_rng(2)
    n = 1_000_000
    g = rng.integers(0, 100_000, n).astype(np.int64)
    y = rng.random(n) < 0.3
    s = rng.random(n).astype(np.float32)
    t0 = time.perf_counter()
    value, used = gauc(y, s, g)
    assert time.perf_counter() - t0 < 2.0  # ~0.5 s; slack for a loaded CI machine
    assert abs(value - 0.5) < 0.01 and used > 90_000


def test_logloss_and_calibration():
    y = np.array([1.0, 0.0, 1.0, 0.0])
    p = np.array([0.9, 0.2, 0.6, 0.0])
    ref = -(np.log(0.9) + np.log(0.8) + np.log(0.6) + np.log1p(-1e-7)) / 4
    assert logloss(y, p) == pytest.approx(ref, rel=1e-12)
    assert np.isfinite(logloss([1.0], [0.0]))  # clipped
    assert calibration(y, p) == pytest.approx(1.7 / 2)
    assert np.isnan(calibration([0, 0], [0.1, 0.2]))


# --------------------------------------------------------------------------- streaming


def test_streaming_matches_exact():
    rng = np.random.default_rng(3)
    n = 200_000
    x, y = ctr_like(rng, n)
    state = streaming.init()
    for lo in range(0, n, 50_000):
        state = update(state, x[lo:lo + 50_000], y[lo:lo + 50_000])
    res = streaming.result(state)
    assert set(res) == {"auc", "logloss", "calibration", "count"}
    p = probs(x)
    assert abs(res["auc"] - auc(y, p)) < HIST_AUC_BOUND
    assert res["count"] == n
    assert res["logloss"] == pytest.approx(logloss(y, p, eps=1e-12), rel=1e-5)
    assert res["calibration"] == pytest.approx(calibration(y, p), rel=1e-5)
    # Spread predictions, balanced labels, per-sample weights.
    y = (rng.random(n) < 0.5).astype(np.float32)
    x = (rng.normal(0, 1.5, n) + y).astype(np.float32)
    w = rng.integers(1, 4, n).astype(np.float32)
    res = streaming.result(update(streaming.init(), x, y, weights=w))
    assert abs(res["auc"] - auc(y, probs(x), w)) < HIST_AUC_BOUND
    assert res["count"] == w.sum()


def test_histogram_auc_equals_exact_auc_of_binned_predictions():
    # In-bin pairs count 1/2, as exact ties do: same value as exact AUC on bin indices.
    rng = np.random.default_rng(4)
    x = rng.normal(0, 2, 5000).astype(np.float32)
    y = (rng.random(5000) < probs(x)).astype(np.float32)
    res = streaming.result(update(streaming.init(num_bins=64), x, y))
    bins = np.clip(np.floor(np.asarray(jax.nn.sigmoid(x)) * 64), 0, 63)
    assert res["auc"] == pytest.approx(auc(y, bins), abs=1e-12)


def test_merge_of_halves_equals_whole():
    rng = np.random.default_rng(5)
    x, y = ctr_like(rng, 20_000, num_tasks=2)
    whole = update(streaming.init(2), x, y)
    a = update(streaming.init(2), x[:10_000], y[:10_000])
    b = update(streaming.init(2), x[10_000:], y[10_000:])
    merged = streaming.merge(a, b)
    np.testing.assert_array_equal(merged.pos, whole.pos)
    np.testing.assert_array_equal(merged.neg, whole.neg)
    for k, v in streaming.result(whole).items():
        assert streaming.result(merged)[k] == pytest.approx(v, rel=1e-6), k


def test_masked_rows_are_ignored():
    rng = np.random.default_rng(6)
    x, y = ctr_like(rng, 1000)
    mask = rng.random(1000) < 0.7
    junk_x = np.where(mask, x, np.float32(np.nan))  # padding may hold anything
    junk_y = np.where(mask, y, np.float32(7.0))
    masked = update(streaming.init(), junk_x, junk_y, mask=jnp.asarray(mask))
    ref = update(streaming.init(), x[mask], y[mask])
    for f in ("pos", "neg", "count", "label_sum"):
        np.testing.assert_array_equal(getattr(masked, f), getattr(ref, f))
    for k, v in streaming.result(ref).items():
        assert streaming.result(masked)[k] == pytest.approx(v, rel=1e-6), k
    assert np.isnan(streaming.result(streaming.init())["auc"])
    assert np.isnan(streaming.result(streaming.init())["logloss"])


def test_update_stays_float32():
    state = streaming.init(2, 128)
    args = (jnp.zeros((16, 2), jnp.float32), jnp.zeros((16, 2), jnp.float32), jnp.ones(16, bool),
            jnp.ones(16, jnp.float32))
    text = str(jax.make_jaxpr(streaming.update)(state, *args))
    assert "f64" not in text
    out = jax.jit(streaming.update)(state, *args)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(out))


def test_compensated_sum_keeps_counting_past_2_pow_24():
    start = jnp.full((4,), 2.0 ** 26, jnp.float32)

    def body(_, hl):
        return _accumulate(*hl, jnp.ones(4, jnp.float32))

    high, low = jax.lax.fori_loop(0, 10_000, body, (start, jnp.zeros(4, jnp.float32)))
    np.testing.assert_array_equal(np.asarray(high, np.float64) + np.asarray(low, np.float64),
                                  2.0 ** 26 + 10_000)
    plain = jax.lax.fori_loop(0, 10_000, lambda _, h: h + jnp.float32(1), start)
    assert float(plain[0]) == 2.0 ** 26  # what the compensation is for


def test_psum_across_devices_equals_single_device():
    mesh = jax.make_mesh((8,), ("data",))
    rng = np.random.default_rng(7)
    x, y = ctr_like(rng, 8 * 512, num_tasks=3)
    mask = rng.random(8 * 512) < 0.9

    def f(x, y, mask):
        local = streaming.update(streaming.init(3, 1024), x, y, mask=mask)
        return jax.lax.psum(local, "data")

    rows = NamedSharding(mesh, P("data"))
    args = [jax.device_put(a, rows) for a in (x, y, mask)]
    sharded = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P()))(*args)
    single = update(streaming.init(3, 1024), x, y, mask=mask)
    assert isinstance(sharded, StreamingState)
    np.testing.assert_array_equal(sharded.pos, single.pos)
    np.testing.assert_array_equal(sharded.neg, single.neg)
    np.testing.assert_array_equal(sharded.count, single.count)
    for k, v in streaming.result(single).items():
        assert streaming.result(sharded)[k] == pytest.approx(v, rel=1e-6), k


def test_multi_task_shapes_and_keys():
    rng = np.random.default_rng(8)
    x, y = ctr_like(rng, 4096, num_tasks=3)
    state = update(streaming.init(3), x, y)
    assert state.pos.shape == state.neg.shape == (3, streaming.DEFAULT_BINS)
    assert state.count.shape == state.loss_sum.shape == (3,)
    res = streaming.result(state)
    assert set(res) == {f"{m}{s}" for m in ("auc", "logloss", "calibration", "count")
                        for s in ("", "/1", "/2")}
    for t, sfx in enumerate(("", "/1", "/2")):
        assert abs(res["auc" + sfx] - auc(y[:, t], probs(x[:, t]))) < 1e-3
    # [B] mask and weights broadcast over tasks; [B] logits need T == 1.
    w = rng.random(4096).astype(np.float32)
    state = update(streaming.init(3), x, y, mask=jnp.ones(4096, bool), weights=w)
    np.testing.assert_allclose(np.asarray(state.count), [w.sum()] * 3, rtol=1e-5)
    with pytest.raises(ValueError):
        streaming.update(streaming.init(3), x[:, 0], y[:, 0])
