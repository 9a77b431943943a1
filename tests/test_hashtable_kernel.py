"""pallas_kernels.hashtable: the find and insert kernels against the XLA reference.

One test class, run three ways: "reference" (the XLA code of
recis_jax.embedding.hashtable), "interpret" (the kernel body in Pallas interpret mode,
CPU) and "pallas" (compiled, GPU only). Interpret mode claims slots differently from the
GPU (see the module docstring), so both must pass.

Insert results are checked against invariants rather than the reference's slots (the
kernel may place keys elsewhere): every need lane owns a distinct, previously free slot
within max_probes of home, that slot holds its key/table/row, every other slot is
bitwise unchanged, and every key is found again (by the reference) at its row.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recis_jax  # noqa: F401  (x64)
from pallas_kernels import hashtable as ph
from recis_jax.embedding import hashtable as ht

I64 = np.iinfo(np.int64)
SPECIAL = np.array([0, -1, I64.min, I64.max, 1, -2, I64.min + 1, I64.max - 1], np.int64)
ON_GPU = jax.default_backend() == "gpu"
IMPLS = ["reference", "interpret",
         pytest.param("pallas", marks=pytest.mark.skipif(not ON_GPU, reason="compiled Pallas-Triton needs a GPU"))]


def empty_index(s):
    return ph.Index(jnp.zeros(s, jnp.int64), jnp.zeros(s, jnp.int32), jnp.zeros(s, jnp.int32), jnp.zeros(s, jnp.int8))


def host(index):
    return ph.Index(*(np.array(a) for a in index))


def assert_same_index(a, b):
    for x, y in zip(host(a), host(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def unique_keys(rng, n, tables_hi=3):
    """n distinct (table, key) pairs: SPECIAL first, then random int64 keys."""
    keys = np.concatenate([SPECIAL, rng.integers(I64.min, I64.max, n, dtype=np.int64, endpoint=True)])
    tables = rng.integers(0, tables_hi, len(keys)).astype(np.int32)
    _, first = np.unique(np.stack([tables.astype(np.int64), keys]), axis=1, return_index=True)
    first = np.sort(first)[:n]
    assert len(first) == n
    return tables[first], keys[first]


def keys_with_home(s, home, count, table=0, start=1):
    out, lo = [], start
    while len(out) < count:
        cand = np.arange(lo, lo + 65536, dtype=np.int64)
        h = np.asarray(ht.home_slot(jnp.full(cand.shape, table, jnp.int32), jnp.asarray(cand), s))
        out.extend(cand[h == home].tolist())
        lo += 65536
    return np.array(out[:count], np.int64)


def skip_reference_variants(impl, variant):
    if impl == "reference" and variant != VARIANTS[0]:
        pytest.skip("kernel variants do not apply to the reference")


@functools.partial(jax.jit, static_argnames=("max_probes",))
def ref_find(index, tables, keys, valid, max_probes=128):
    return ph.find(index, tables, keys, valid, max_probes=max_probes, impl="reference")


def build(s, tables, keys, rows=None, delete=None, max_probes=128):
    """An index with (tables, keys) inserted by the reference (rows default 0..n-1), then
    the lanes in `delete` tombstoned."""
    n = len(keys)
    rows = np.arange(n, dtype=np.int32) if rows is None else rows
    r = ph.insert(empty_index(s), jnp.asarray(tables), jnp.asarray(keys), jnp.asarray(rows, jnp.int32),
                  jnp.ones(n, bool), max_probes=max_probes, impl="reference")
    assert not bool(r.overflow)
    index = r.index
    if delete is not None:
        st = np.array(index.slot_state)
        st[np.asarray(r.placed)[delete]] = ph.TOMBSTONE
        index = index._replace(slot_state=jnp.asarray(st))
    return index


def check_insert(before, res, tables, keys, rows, need, max_probes):
    """The insert invariants (module docstring) for a successful insert."""
    b, a = host(before), host(res.index)
    s = len(b.slot_keys)
    placed, need = np.asarray(res.placed), np.asarray(need)
    assert not bool(res.overflow)
    assert np.all(placed[need] >= 0) and np.all(placed[~need] == -1)
    p = placed[need]
    assert len(np.unique(p)) == len(p), "two lanes share a slot"
    assert np.all(b.slot_state[p] != ph.LIVE), "a live slot was taken"
    np.testing.assert_array_equal(np.asarray(res.was_tombstone)[need], b.slot_state[p] == ph.TOMBSTONE)
    home = np.asarray(ph.home_slot(jnp.asarray(tables), jnp.asarray(keys), s))[need]
    assert np.all((p - home) % s < max_probes)
    assert np.all(a.slot_state[p] == ph.LIVE)
    np.testing.assert_array_equal(a.slot_keys[p], np.asarray(keys)[need])
    np.testing.assert_array_equal(a.slot_tables[p], np.asarray(tables)[need])
    np.testing.assert_array_equal(a.slot_rows[p], np.asarray(rows)[need])
    other = np.ones(s, bool)
    other[p] = False
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x[other], y[other])
    f = ref_find(res.index, jnp.asarray(tables), jnp.asarray(keys), jnp.asarray(need), max_probes=max_probes)
    assert np.all(np.asarray(f.found)[need])
    np.testing.assert_array_equal(np.asarray(f.rows)[need], np.asarray(rows)[need])


def test_constants_and_home_slot_match_the_table():
    assert (ph.EMPTY, ph.LIVE, ph.TOMBSTONE) == (ht.EMPTY, ht.LIVE, ht.TOMBSTONE)
    rng = np.random.default_rng(0)
    keys = np.concatenate([SPECIAL, rng.integers(I64.min, I64.max, 4000, dtype=np.int64)])
    tables = rng.integers(-5, 1 << 30, len(keys)).astype(np.int32)
    tables[:4] = [0, -1, np.iinfo(np.int32).min, np.iinfo(np.int32).max]
    for s in (2, 64, 1 << 20):
        np.testing.assert_array_equal(np.asarray(ph.home_slot(jnp.asarray(tables), jnp.asarray(keys), s)),
                                      np.asarray(ht.home_slot(jnp.asarray(tables), jnp.asarray(keys), s)))


# Kernel variants: probe width (Config.width) of (find, insert).
VARIANTS = [(1, 1), (4, 8)]


@pytest.fixture(params=VARIANTS, ids=lambda v: f"w{v[0]}-{v[1]}")
def variant(request, monkeypatch):
    find_w, claim_w = request.param
    monkeypatch.setattr(ph, "FIND_CONFIG", ph.FIND_CONFIG._replace(width=find_w))
    monkeypatch.setattr(ph, "CLAIM_CONFIG", ph.CLAIM_CONFIG._replace(width=claim_w))
    return request.param


@pytest.mark.parametrize("impl", IMPLS)
class TestHashtableKernel:

    def test_find_random_duplicates_specials_tombstones(self, impl, variant):
        skip_reference_variants(impl, variant)
        rng = np.random.default_rng(1)
        s = 1024
        tables, keys = unique_keys(rng, 700)
        dead = np.arange(0, 700, 7)
        index = build(s, tables, keys, delete=dead)
        # 1000 lanes (not a multiple of the block): live, tombstoned, absent keys,
        # duplicates and invalid lanes.
        absent_t, absent_k = unique_keys(np.random.default_rng(99), 300)
        pick = rng.integers(0, 1000, 1000)
        qt, qk = np.concatenate([tables, absent_t])[pick], np.concatenate([keys, absent_k])[pick]
        valid = rng.random(1000) < 0.9
        args = (index, jnp.asarray(qt), jnp.asarray(qk), jnp.asarray(valid))
        got = ph.find(*args, impl=impl)
        want = ref_find(*args)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        # ...and against a dict of what should be there
        live = {(int(t), int(k)): r for r, (t, k) in enumerate(zip(tables, keys)) if r % 7}
        exp = np.array([v and (int(t), int(k)) in live for t, k, v in zip(qt, qk, valid)])
        np.testing.assert_array_equal(np.asarray(got.found), exp)
        rows = np.array([live.get((int(t), int(k)), 0) if f else 0 for t, k, f in zip(qt, qk, exp)])
        np.testing.assert_array_equal(np.asarray(got.rows), rows)
        assert np.all(np.asarray(got.slot)[~exp] == -1)

    def test_insert_random_with_tombstones_and_skipped_lanes(self, impl, variant):
        skip_reference_variants(impl, variant)
        rng = np.random.default_rng(2)
        s = 1024
        tables, keys = unique_keys(rng, 1300)
        old = np.arange(300)
        index = build(s, tables[old], keys[old], delete=np.arange(0, 300, 3))  # 100 tombstones
        nt, nk = tables[300:], keys[300:]                                       # 1000 new lanes
        need = rng.random(1000) < 0.6
        rows = rng.permutation(5000)[:1000].astype(np.int32)
        res = ph.insert(index, jnp.asarray(nt), jnp.asarray(nk), jnp.asarray(rows), jnp.asarray(need), impl=impl)
        check_insert(index, res, nt, nk, rows, need, 128)
        if impl != "reference":
            assert int(np.sum(np.asarray(res.was_tombstone)[need])) > 0
        # The old keys are still found at their rows.
        keep = old[old % 3 != 0]
        f = ref_find(res.index, jnp.asarray(tables[keep]), jnp.asarray(keys[keep]), jnp.ones(len(keep), bool))
        assert np.all(np.asarray(f.found))
        np.testing.assert_array_equal(np.asarray(f.rows), keep)
        # ...and the kernel's find agrees with the reference on the kernel-built index.
        qa = (res.index, jnp.asarray(nt), jnp.asarray(nk), jnp.ones(1000, bool))
        for g, w in zip(ph.find(*qa, impl=impl), ref_find(*qa)):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

    def test_all_keys_one_home_slot_wrapping_around(self, impl, variant):
        skip_reference_variants(impl, variant)
        s = 256
        k = keys_with_home(s, s - 3, 40)
        t = np.zeros(40, np.int32)
        rows = np.arange(100, 140, dtype=np.int32)
        index = empty_index(s)
        res = ph.insert(index, jnp.asarray(t), jnp.asarray(k), jnp.asarray(rows), jnp.ones(40, bool),
                        max_probes=64, impl=impl)
        check_insert(index, res, t, k, rows, np.ones(40, bool), 64)
        np.testing.assert_array_equal(np.sort(np.asarray(res.placed)), np.sort((s - 3 + np.arange(40)) % s))
        # Probes exhausted: 40 keys of one chain with max_probes 32 -> nothing written.
        res = ph.insert(index, jnp.asarray(t), jnp.asarray(k), jnp.asarray(rows), jnp.ones(40, bool),
                        max_probes=32, impl=impl)
        assert bool(res.overflow)
        assert_same_index(res.index, index)

    def test_find_stops_at_max_probes(self, impl, variant):
        skip_reference_variants(impl, variant)
        s = 256
        k = keys_with_home(s, s - 5, 40)
        t = np.zeros(40, np.int32)
        index = build(s, t, k, max_probes=64)  # displacements 0..39
        for mp in (1, 3, 20):
            f = ph.find(index, jnp.asarray(t), jnp.asarray(k), jnp.ones(40, bool), max_probes=mp, impl=impl)
            np.testing.assert_array_equal(np.asarray(f.found), np.arange(40) < mp)
            np.testing.assert_array_equal(np.asarray(f.rows), np.where(np.arange(40) < mp, np.arange(40), 0))

    def test_near_full_then_overflow_leaves_index_bit_identical(self, impl, variant):
        skip_reference_variants(impl, variant)
        rng = np.random.default_rng(3)
        s = 64
        tables, keys = unique_keys(rng, 70)
        index = build(s, tables[:60], keys[:60], rows=np.arange(60, dtype=np.int32) * 3, max_probes=s)
        # Four more fill the table exactly (max_probes = S reaches every slot).
        t4, k4, r4 = tables[60:64], keys[60:64], np.array([7, 8, 9, 10], np.int32)
        res = ph.insert(index, jnp.asarray(t4), jnp.asarray(k4), jnp.asarray(r4), jnp.ones(4, bool),
                        max_probes=s, impl=impl)
        check_insert(index, res, t4, k4, r4, np.ones(4, bool), s)
        full = res.index
        assert np.all(np.asarray(full.slot_state) == ph.LIVE)
        # A missing key in a full table: the probe stops at max_probes, not found.
        f = ph.find(full, jnp.asarray(tables[64:]), jnp.asarray(keys[64:]), jnp.ones(6, bool),
                    max_probes=s, impl=impl)
        assert not np.any(np.asarray(f.found))
        # One more key: overflow, the index comes back bitwise unchanged.
        before = host(full)
        res = ph.insert(full, jnp.asarray(tables[64:66]), jnp.asarray(keys[64:66]), jnp.asarray([1, 2], jnp.int32),
                        jnp.asarray([False, True]), max_probes=s, impl=impl)
        assert bool(res.overflow)
        assert_same_index(res.index, before)

    def test_decide_overflow_writes_nothing(self, impl, variant):
        skip_reference_variants(impl, variant)
        rng = np.random.default_rng(4)
        s = 1024
        tables, keys = unique_keys(rng, 600)
        index = build(s, tables[:100], keys[:100], delete=np.arange(0, 100, 2))
        before = host(index)
        res = ph.insert(index, jnp.asarray(tables[100:]), jnp.asarray(keys[100:]), jnp.arange(500, dtype=jnp.int32),
                        jnp.ones(500, bool), decide=lambda po: po | True, impl=impl)
        assert bool(res.overflow)
        assert np.all(np.asarray(res.placed) >= 0)  # tentative slots were found...
        assert_same_index(res.index, before)        # ...and nothing was written

    def test_find_or_insert_rows_match_reference(self, impl):
        rng = np.random.default_rng(5)
        s, r = 1024, 700
        tables, keys = unique_keys(rng, 900)
        free = jnp.arange(r - 1, -1, -1, dtype=jnp.int32)  # a fresh free stack
        fr = jax.jit(functools.partial(ph.find_or_insert, impl="reference"))
        fi = fr if impl == "reference" else jax.jit(functools.partial(ph.find_or_insert, impl=impl))
        ia, ib, nf = empty_index(s), empty_index(s), jnp.int32(r)
        # Two steps of 500 lanes (one compile): 400 new keys and 100 invalid lanes, then
        # 200 old, 250 new, 50 invalid.
        for lanes, valid in ((np.arange(500), np.arange(500) < 400),
                             (np.concatenate([np.arange(200, 400), np.arange(400, 700)]),
                              np.arange(500) < 450)):
            args = (jnp.asarray(tables[lanes]), jnp.asarray(keys[lanes]), jnp.asarray(valid), free, nf)
            ia, ra = fi(ia, *args)
            ib, rb = fr(ib, *args)
            for x, y in zip(ra, rb):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
            assert not bool(ra.overflow)
            nf = nf - ra.num_new
        assert int(nf) == r - 650
        q = (jnp.asarray(tables[:650]), jnp.asarray(keys[:650]), jnp.ones(650, bool))
        fa, fb = ref_find(ia, *q), ref_find(ib, *q)
        np.testing.assert_array_equal(np.asarray(fa.rows), np.asarray(fb.rows))
        assert np.all(np.asarray(fa.found)) and len(np.unique(np.asarray(fa.rows))) == 650
        # Rows exhausted (200 new keys, 50 free rows): nothing written.
        before = host(ia)
        args = (jnp.asarray(tables[400:900]), jnp.asarray(keys[400:900]), jnp.ones(500, bool), free, nf)
        ia2, ra = fi(ia, *args)
        assert bool(ra.overflow) and int(ra.num_new) == 0 and not np.any(np.asarray(ra.is_new))
        assert_same_index(ia2, before)

    def test_hashtable_find_or_insert_wired_through_dispatch(self, impl, variant, monkeypatch):
        """recis_jax.embedding.hashtable with RECIS_KERNELS=impl: same rows, values and
        lookups as the XLA path (slots may differ)."""
        if impl == "reference":
            pytest.skip("the reference path is what the others are compared with")
        cfg = ht.TableConfig("w", dim=4, max_probes=64)
        rng = np.random.default_rng(6)
        tables, keys = unique_keys(rng, 300)

        def run(kernels):
            monkeypatch.setenv("RECIS_KERNELS", kernels)
            foi = jax.jit(functools.partial(ht.find_or_insert, cfg))  # fresh trace per setting
            st = ht.create(cfg, 256, 512)
            out = []
            for lo, hi in ((0, 150), (100, 250), (150, 300)):  # one lane count: one compile
                st, r = foi(st, jnp.asarray(tables[lo:hi]), jnp.asarray(keys[lo:hi]), jnp.ones(hi - lo, bool))
                out.append(r)
            return st, out

        st_a, ra = run(impl)
        st_b, rb = run("reference")
        for x, y in zip(ra, rb):
            for u, v in zip(x, y):
                np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
        assert bool(ra[-1].overflow)  # 300 keys, 256 rows: the third batch overflows...
        ea, eb = ht.export(st_a), ht.export(st_b)
        for name in eb:
            np.testing.assert_array_equal(ea[name], eb[name])
        for name in ("embedding", "row_keys", "row_tables", "row_live", "free_rows", "num_free", "count"):
            np.testing.assert_array_equal(np.asarray(getattr(st_a, name)), np.asarray(getattr(st_b, name)))


@pytest.mark.skipif(not ON_GPU, reason="compiled Pallas-Triton needs a GPU")
def test_gpu_contention_and_size(variant):
    """Many programs racing for few chains, and a batch of 300k lanes."""
    s = 1 << 14
    cand = np.arange(1, 1 << 24, dtype=np.int64)
    home = np.asarray(ht.home_slot(jnp.zeros(cand.shape, jnp.int32), jnp.asarray(cand), s))
    k = np.concatenate([cand[home == h][:128] for h in range(0, s, s // 16)])  # 16 chains of 128
    t = np.zeros(len(k), np.int32)
    rows = np.arange(len(k), dtype=np.int32)
    index = empty_index(s)
    res = ph.insert(index, jnp.asarray(t), jnp.asarray(k), jnp.asarray(rows), jnp.ones(len(k), bool),
                    max_probes=4096, impl="pallas")
    check_insert(index, res, t, k, rows, np.ones(len(k), bool), 4096)
    rng = np.random.default_rng(7)
    s = 1 << 19
    tables, keys = unique_keys(rng, 300_000, tables_hi=1000)
    need = rng.random(len(keys)) < 0.97
    rows = rng.permutation(len(keys)).astype(np.int32)
    index = build(s, tables[:1000], keys[:1000] ^ 12345)
    res = ph.insert(index, jnp.asarray(tables), jnp.asarray(keys), jnp.asarray(rows), jnp.asarray(need),
                    impl="pallas")
    check_insert(index, res, tables, keys, rows, need, 128)
    q = (res.index, jnp.asarray(tables), jnp.asarray(keys), jnp.ones(len(keys), bool))
    for g, w in zip(ph.find(*q, impl="pallas"), ref_find(*q)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
