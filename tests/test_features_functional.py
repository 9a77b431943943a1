"""recis_jax.features.functional: pinned RecIS values, NumPy references, errors."""

import struct

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pytest

import recis_jax  # noqa: F401  (x64)
from recis_jax.features import functional as F
from recis_jax.features import string_hash as S
from recis_jax.ragged import Ragged

I64_MIN, I64_MAX = -(2**63), 2**63 - 1


def both(fn, *args, static=()):
    """fn(*args) eagerly and under jit (static positions as static_argnums)."""
    return fn(*args), jax.jit(fn, static_argnums=static)(*args)


# -- NumPy references ------------------------------------------------------------------------
def np_bucketize(x, b):
    x = np.asarray(x)
    b = np.asarray(b, np.float64)
    if np.issubdtype(x.dtype, np.floating):
        idx = np.searchsorted(b.astype(x.dtype), x, side="right")
        return np.where(np.isnan(x), len(b), idx)
    return np.array([sum(1 for v in b if v <= int(xi)) for xi in x.reshape(-1)]).reshape(x.shape)


def np_mod(x, m):
    return (np.asarray(x, np.int64).view(np.uint64) % np.uint64(m)).astype(np.int64)


def np_multi_hash(x, n):
    primes = F.multi_hash_primes(n)
    out = []
    with np.errstate(over="ignore"):
        for j, (p, nj) in enumerate(zip(primes, n)):
            t = np.fmod(np.asarray(x, np.int64) * np.int64(F.MULTI_HASH_MULS[j]), p)  # C remainder
            t = np.fmod(t + p, p)
            out.append(np.fmod(t, nj))
    return out


def scalar_cross(a: int, b: int) -> int:
    h = S.murmurhash64a(struct.pack("<qq", a, b), 0)
    return h - 2**64 if h >= 2**63 else h


def np_feature_cross(xs, ys, wxs=None, wys=None):
    """Python lists reference: per row distinct x (first weight) times distinct y."""
    ids, ws = [], []
    for i, (xr, yr) in enumerate(zip(xs, ys)):
        wx = wxs[i] if wxs is not None else [1.0] * len(xr)
        wy = wys[i] if wys is not None else [1.0] * len(yr)
        dx, dy = {}, {}
        for v, w in zip(xr, wx):
            dx.setdefault(v, w)
        for v, w in zip(yr, wy):
            dy.setdefault(v, w)
        ids.append([scalar_cross(a, b) for a in sorted(dx) for b in sorted(dy)])
        ws.append([np.float32(dx[a]) * np.float32(dy[b]) for a in sorted(dx) for b in sorted(dy)])
    return ids, ws


def np_truncate(rows, n, side):
    return [r[-n:] if side == "left" and len(r) > n else r[:n] for r in rows]


def random_ragged(rng, nrows, max_len, capacity, lo=-50, hi=50, weights=False, empty_p=0.3):
    rows = [list(rng.integers(lo, hi, size=0 if rng.random() < empty_p else rng.integers(1, max_len + 1)))
            for _ in range(nrows)]
    w = [list(rng.uniform(0.1, 2.0, size=len(r)).astype(np.float32)) for r in rows] if weights else None
    return rows, w, Ragged.from_lists(rows, capacity=capacity, weights=w)


# -- pinned values ---------------------------------------------------------------------------
def test_bucketize_pinned():
    x = jnp.array([-1, 1, 1.5, 5, 5.5, 0.999, np.nan], jnp.float32)
    for out in (F.bucketize(x, [1, 2, 3, 4, 5]), jax.jit(lambda v: F.bucketize(v, [1, 2, 3, 4, 5]))(x)):
        assert out.dtype == jnp.int32
        np.testing.assert_array_equal(out, [0, 1, 1, 5, 5, 0, 5])


def test_mod_pinned():
    x = jnp.array([12345, -1, -7, I64_MAX, I64_MIN, 0], jnp.int64)
    for out in (F.mod(x, 1000), jax.jit(lambda v: F.mod(v, 1000))(x)):
        assert out.dtype == jnp.int64
        np.testing.assert_array_equal(out, [345, 615, 609, 807, 808, 0])


def test_hash_pinned():
    assert F.hash_strings([b"a"], "farm")[0] == -5528939962900187677
    assert F.hash_strings(["hello world"], "murmur")[0] == -3190198453633110066
    assert F.hash_strings(pa.array(["a", "hello world"]), "murmur").dtype == np.int64
    two_d = np.array([[b"a", b"hello world"]], object)
    np.testing.assert_array_equal(F.hash_strings(two_d, "farm"), F.hash_strings([b"a", b"hello world"], "farm")[None])


def test_multi_hash_pinned():
    x = jnp.array([1001, 1002, 1003], jnp.int64)
    want = [[1, 2, 3], [3, 6, 9], [5, 10, 15], [7, 14, 21]]
    for outs in (F.multi_hash(x, [1000] * 4), jax.jit(lambda v: F.multi_hash(v, [1000] * 4))(x)):
        assert len(outs) == 4
        for o, w in zip(outs, want):
            assert o.dtype == jnp.int64
            np.testing.assert_array_equal(o, w)


def test_cross_pinned():
    assert int(F.cross_ids(1001, 1)) == -7808879811642834040
    assert int(jax.jit(F.cross_ids)(jnp.int64(1001), jnp.int64(1))) == -7808879811642834040
    r = Ragged.from_lists([[1], [2], [3]])
    for out in (F.feature_cross(r, r), jax.jit(F.feature_cross)(r, r)):
        assert out.to_lists() == [[scalar_cross(1, 1)], [scalar_cross(2, 2)], [scalar_cross(3, 3)]]
        np.testing.assert_array_equal(F.mod(out.values, 1000)[:3], [216, 2, 783])


def test_sequence_truncate_pinned():
    r = Ragged(np.arange(1, 11, dtype=np.int64), np.array([0, 4, 7, 10], np.int32))
    for out in both(F.sequence_truncate, r, 2, "left", static=(1, 2)):
        n = int(out.row_splits[-1])
        np.testing.assert_array_equal(np.asarray(out.values)[:n], [3, 4, 6, 7, 9, 10])
        np.testing.assert_array_equal(out.row_splits, [0, 2, 4, 6])
        assert out.capacity == 6  # min(capacity, nrows * seq_len)


# -- randomized comparisons against NumPy -------------------------------------------------------
def test_bucketize_random_float():
    rng = np.random.default_rng(0)
    f = jax.jit(F.bucketize, static_argnums=1)
    for b in ([0.0], [-3.0, -1.0, -1.0, 0.5, 2.0, 7.25], tuple(np.sort(rng.normal(size=40)).round(3))):
        b = tuple(float(v) for v in b)
        x = rng.normal(0, 3, 200).astype(np.float32)
        x[:len(b)] = b  # boundary-equal values go up
        x[-4:] = [np.nan, np.inf, -np.inf, np.nan]
        np.testing.assert_array_equal(f(jnp.asarray(x), b), np_bucketize(x, b))
        np.testing.assert_array_equal(F.bucketize(x.reshape(20, 10), b), np_bucketize(x, b).reshape(20, 10))


def test_bucketize_integer_input_exact():
    b = (-2.5, -1.0, 0.0, 1.5, 3.0, 1e30)
    x = np.array([-4, -3, -2, -1, 0, 1, 2, 3, 4, I64_MAX, I64_MIN], np.int64)
    out = F.bucketize(jnp.asarray(x), b)
    np.testing.assert_array_equal(out, [0, 0, 1, 2, 3, 3, 4, 5, 5, 5, 0])
    np.testing.assert_array_equal(out, np_bucketize(x, b))
    np.testing.assert_array_equal(F.bucketize(jnp.asarray(x), (-1e30, 1e30)), np.ones(len(x)))


def test_mod_random_and_per_value_modulus():
    rng = np.random.default_rng(1)
    x = rng.integers(I64_MIN, I64_MAX, size=500, dtype=np.int64, endpoint=True)
    x[:4] = [I64_MIN, I64_MAX, -1, 0]
    m = rng.integers(1, I64_MAX, size=500, dtype=np.int64, endpoint=True)
    m[:3] = [1, I64_MAX, 2]
    per_value = jax.jit(F.mod)(jnp.asarray(x), jnp.asarray(m))
    want = (x.view(np.uint64) % m.astype(np.uint64)).astype(np.int64)
    np.testing.assert_array_equal(per_value, want)
    for mm in (1, 7, 1000, 2**31 + 11, I64_MAX):
        np.testing.assert_array_equal(F.mod(x, mm), np_mod(x, mm))
    np.testing.assert_array_equal(F.mod(np.array([-5], np.int32), 10), [np_mod([-5], 10)[0]])  # int32 sign-extends


def test_multi_hash_random_negative_ids():
    rng = np.random.default_rng(2)
    x = rng.integers(I64_MIN, I64_MAX, size=400, dtype=np.int64, endpoint=True)
    x[:6] = [I64_MIN, I64_MAX, -1, 0, -1001, 1001]
    n = [1, 97, 10**6, 2**40]
    f = jax.jit(lambda v: F.multi_hash(v, n))
    for got, want in zip(f(jnp.asarray(x)), np_multi_hash(x, n)):
        np.testing.assert_array_equal(got, want)
        assert np.all((np.asarray(got) >= 0))
    # primes: largest prime <= mods[j] * n_j (RecIS's _find_prime_lower_than)
    assert F.multi_hash_primes([1000, 1000]) == (28979, 46997)
    assert F.multi_hash_primes([1]) == (29,)


def test_cross_ids_matches_numpy_and_scalar_murmur():
    rng = np.random.default_rng(3)
    x = rng.integers(I64_MIN, I64_MAX, size=300, dtype=np.int64, endpoint=True)
    y = rng.integers(I64_MIN, I64_MAX, size=300, dtype=np.int64, endpoint=True)
    x[:3], y[:3] = [0, -1, I64_MIN], [0, I64_MAX, -1]
    got = np.asarray(jax.jit(F.cross_ids)(x, y))
    np.testing.assert_array_equal(got, S.murmurhash64a_u64x2(x, y))
    assert [scalar_cross(int(a), int(b)) for a, b in zip(x[:20], y[:20])] == got[:20].tolist()


def test_feature_cross_random():
    rng = np.random.default_rng(4)
    exact = jax.jit(F.feature_cross)
    capped = jax.jit(F.feature_cross_capped, static_argnums=2)
    for case in range(6):
        wx_on, wy_on = case % 3 == 1, case % 3 != 0
        xr, wx, x = random_ragged(rng, 7, 5, 40, lo=-4, hi=4, weights=wx_on)  # small range: duplicates
        yr, wy, y = random_ragged(rng, 7, 4, 32, lo=-(2**62), hi=2**62, weights=wy_on)
        want_ids, want_w = np_feature_cross(xr, yr, wx, wy)
        out = exact(x, y)
        assert out.capacity == 40 * 32 and out.values.dtype == jnp.int64
        assert out.to_lists() == want_ids
        assert (out.weights is None) == (not wx_on and not wy_on)
        flat_w = [w for r in want_w for w in r]
        n = int(out.row_splits[-1])
        if out.weights is not None:
            np.testing.assert_array_equal(np.asarray(out.weights)[:n], np.asarray(flat_w, np.float32))
            assert not np.asarray(out.weights)[n:].any()
        assert not np.asarray(out.values)[n:].any()  # padding stays zero
        # Capped: a valid prefix of the exact result plus the count it needs.
        cut, needed = capped(x, y, 10)
        assert int(needed) == n
        flat = [v for r in want_ids for v in r]
        got_rows = cut.to_lists()
        assert [v for r in got_rows for v in r] == flat[:10]
        assert all(len(g) <= len(w) for g, w in zip(got_rows, want_ids))


def test_feature_cross_empty_sides_and_empty_batch():
    x = Ragged.from_lists([[1, 2], [], [3]], capacity=4)
    y = Ragged.from_lists([[], [5], [6, 6]], capacity=4)
    out = F.feature_cross(x, y)
    assert out.to_lists() == [[], [], [scalar_cross(3, 6)]]
    z = Ragged.from_lists([[], [], []], capacity=0)
    out, needed = F.feature_cross_capped(x, z, 5)
    assert out.to_lists() == [[], [], []] and int(needed) == 0
    e = Ragged.from_lists([], capacity=3)
    assert F.feature_cross(e, e).nrows == 0


def test_sequence_truncate_random_2d_and_3d():
    rng = np.random.default_rng(5)
    for side in ("left", "right"):
        f = jax.jit(F.sequence_truncate, static_argnums=(1, 2))
        rows, w, r = random_ragged(rng, 9, 7, 48, weights=True)
        for n in (1, 3):
            out = f(r, n, side)
            assert out.to_lists() == np_truncate(rows, n, side)
            k = int(out.row_splits[-1])
            want_w = [v for row in np_truncate(w, n, side) for v in row]
            np.testing.assert_array_equal(np.asarray(out.weights)[:k], np.asarray(want_w, np.float32))
        # 3-level: lists of lists; every sequence becomes exactly n items, padded with [].
        seqs = [[list(rng.integers(-9, 9, size=rng.integers(0, 4))) for _ in range(rng.integers(0, 6))]
                for _ in range(8)]
        r3 = Ragged.from_lists(seqs, ragged_rank=2, capacity=40, inner_capacity=80)
        for n in (1, 4):
            out = f(r3, n, side)
            want = [s + [[]] * (n - len(s)) for s in np_truncate(seqs, n, side)]
            assert out.to_lists() == want
            np.testing.assert_array_equal(out.row_splits, np.arange(9) * n)


# -- numeric transforms ----------------------------------------------------------------------------
def test_numeric_transforms():
    x = np.array([np.nan, -3.0, -0.5, 0.0, 2.0, 1e6, np.inf], np.float32)
    np.testing.assert_array_equal(F.fill_missing(x, 7.0), np.where(np.isnan(x), 7.0, x).astype(np.float32))
    np.testing.assert_array_equal(F.clip(x, -1.0, 10.0), np.clip(x, -1.0, 10.0))  # NaN stays NaN
    np.testing.assert_allclose(F.log1p_clipped(x), np.log1p(np.clip(x, 0.0, None)), rtol=1e-6)
    np.testing.assert_allclose(F.log1p_clipped(x, -0.5, 100.0), np.log1p(np.clip(x, -0.5, 100.0)), rtol=1e-6)
    np.testing.assert_allclose(F.standardize(x, 1.0, 4.0), (x - 1.0) / 4.0, rtol=1e-6)
    ints = np.array([1, 2, 3], np.int64)
    for out in (F.fill_missing(ints), F.clip(ints, 0, 2), F.log1p_clipped(ints), F.standardize(ints, 0.0, 2.0)):
        assert out.dtype == jnp.float32


# -- merged tables --------------------------------------------------------------------------------
def test_table_id_pairs_keeps_all_bits():
    big = 2**60 + 5  # RecIS's 52-bit ids_encode would fold these two together
    a = Ragged.from_lists([[big, 1], []], capacity=4)
    b = np.array([[big + 2**52], [1]], np.int64)
    pairs = jax.jit(lambda fa, fb: F.table_id_pairs({"a": fa, "b": fb}, {"a": 0, "b": 1}))(a, b)
    np.testing.assert_array_equal(pairs.table, [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(pairs.ids, [big, 1, 0, 0, big + 2**52, 1])
    np.testing.assert_array_equal(pairs.mask, [True, True, False, False, True, True])
    assert pairs.slices == (("a", 0, 4), ("b", 4, 6))
    # id 1 appears in both tables: distinct pairs, so distinct rows.
    live = np.asarray(pairs.mask)
    keys = set(zip(np.asarray(pairs.table)[live].tolist(), np.asarray(pairs.ids)[live].tolist()))
    assert len(keys) == 4
    with pytest.raises(KeyError, match="'c'"):
        F.table_id_pairs({"c": b}, {"a": 0})


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("b, match", [
    ([3.0, 1.0], "sorted"), ([1.0, np.nan], "finite"), ([1.0, np.inf], "finite"), ([], "non-empty"),
    ([[1.0, 2.0]], "1-D"), (["a", "b"], "real"),
])
def test_bad_boundaries(b, match):
    with pytest.raises(ValueError, match=match):
        F.bucketize(jnp.zeros(3, jnp.float32), b)


def test_bad_arguments():
    x = jnp.arange(3, dtype=jnp.int64)
    for m in (0, -5, 2**63, 1.5, True):
        with pytest.raises(ValueError, match="modulus"):
            F.mod(x, m)
    with pytest.raises(TypeError, match="integer"):
        F.mod(jnp.ones(3, jnp.float32), 10)
    with pytest.raises(TypeError, match="real numeric"):
        F.bucketize(jnp.ones(3, bool), [1.0])
    for n, match in (([1] * 5, "1 to 4"), ([], "1 to 4"), ([0], "positive"), ([10, -1], "positive"),
                     (7, "list"), ([2**61], "too large")):
        with pytest.raises(ValueError, match=match):
            F.multi_hash(x, n)
    with pytest.raises(TypeError, match="integer"):
        F.multi_hash(jnp.ones(3, jnp.float32), [10])
    r3, r4 = Ragged.from_lists([[1], [2], [3]]), Ragged.from_lists([[1], [2], [3], [4]])
    with pytest.raises(ValueError, match="3 rows but y has 4"):
        F.feature_cross(r3, r4)
    with pytest.raises(TypeError, match="integer"):
        F.feature_cross(r3, Ragged.from_lists([[1.0], [2.0], [3.0]], dtype=np.float32))
    with pytest.raises(TypeError, match="Ragged"):
        F.feature_cross(r3, np.ones((3, 1), np.int64))
    for n in (0, -1, 2.0):
        with pytest.raises(ValueError, match="seq_len"):
            F.sequence_truncate(r3, n)
    with pytest.raises(ValueError, match="side"):
        F.sequence_truncate(r3, 2, "middle")
    with pytest.raises(ValueError, match="kind"):
        F.hash_strings([b"a"], "sha1")
    with pytest.raises(ValueError, match="std"):
        F.standardize(jnp.ones(2), 0.0, 0.0)
