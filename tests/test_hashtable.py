"""The collision-free hashtable: exact keys, tombstones, rebuilds, overflow, determinism.

Every test checks the invariant that matters most: each distinct (table, id) key owns
exactly one row, and lookups of it always return that row.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recis_jax  # noqa: F401  (x64)
from recis_jax import sorting
from recis_jax.embedding import capacity
from recis_jax.embedding import hashtable as ht
from recis_jax.embedding.dedup import unique_keys
from recis_jax.embedding.engine import Admission, EmbeddingEngine, EmbeddingOption
from recis_jax.embedding.initializers import Initializer, initial_rows, write_initial_rows
from recis_jax.optim.sparse import sparse_adam, sparse_sgd
from recis_jax.ragged import Ragged
from recis_jax.sorting import sort_by_table_and_key

I64 = np.iinfo(np.int64)
SPECIAL = np.array([-1, -2, 0, I64.min, I64.max, 1, I64.min + 1, I64.max - 1], np.int64)

CFG = ht.TableConfig("t", dim=4)  # shared by tests that need nothing special (compiles once)

# One jit per entry point, shared by all tests (configs are static arguments).
find_or_insert = jax.jit(ht.find_or_insert, static_argnums=0)
find = jax.jit(ht.find, static_argnums=4)
delete = jax.jit(ht.delete, static_argnums=0)
rebuild_index = jax.jit(ht.rebuild_index, static_argnums=1)


def bucket(n):
    """Lane count for n keys: 64 (or the power of two above), so that tests share
    compiles (each ~1 s on CPU)."""
    return max(64, 1 << max(n - 1, 0).bit_length())


def lanes(keys, tables=None, valid=None):
    """Device lanes (tables int32, keys int64, valid bool), padded with invalid lanes
    to `bucket(n)`."""
    keys = np.asarray(keys, np.int64)
    n = len(keys)
    m = bucket(n)
    t = np.zeros(m, np.int32)
    k = np.zeros(m, np.int64)
    v = np.zeros(m, bool)
    k[:n] = keys
    if tables is not None:
        t[:n] = np.asarray(tables, np.int32)
    v[:n] = True if valid is None else np.asarray(valid, bool)
    return jnp.asarray(t), jnp.asarray(k), jnp.asarray(v)


def _first(res, n):
    """A Find/InsertResult with its per-lane fields cut to the first n lanes."""
    return type(res)(*(x[:n] if x.ndim == 1 else x for x in res))


def insert(cfg, st, keys, tables=None, valid=None, counts=None):
    t, k, v = lanes(keys, tables, valid)
    c = None
    if counts is not None:
        c = np.ones(k.shape[0], np.int64)
        c[:len(counts)] = counts
        c = jnp.asarray(c)
    st, r = find_or_insert(cfg, st, t, k, v, c)
    return st, _first(r, len(keys))


def lookup(cfg, st, keys, tables=None, valid=None):
    t, k, v = lanes(keys, tables, valid)
    return _first(find(st, t, k, v, cfg.max_probes), len(keys))


def host(state):
    return jax.tree.map(lambda a: np.array(a), state)


def assert_identical(a, b):
    """Every leaf equal in shape, dtype and bits."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b))):
        assert (x.dtype, x.shape) == (y.dtype, y.shape)
        assert x.tobytes() == y.tobytes()


def expected_rows(cfg, tables, keys):
    """[N, dim] float32: the deterministic initial rows of (tables, keys) under cfg
    (a table index draws from its initializer stream, `cfg.stream_ids[t]` if given)."""
    tables = np.asarray(tables, np.int32)
    streams = np.asarray(cfg.stream_ids, np.int32)[tables] if cfg.stream_ids else tables
    return np.asarray(initial_rows(cfg.initializer, jnp.asarray(streams), jnp.asarray(np.asarray(keys, np.int64)),
                                   cfg.dim, cfg.seed))


def keys_with_home(num_slots, home, count, table=0, start=1):
    """`count` distinct int64 keys of `table` whose first probe is slot `home`."""
    out = []
    lo = start
    while len(out) < count:
        cand = np.arange(lo, lo + 65536, dtype=np.int64)
        h = np.asarray(ht.home_slot(jnp.full(cand.shape, table, jnp.int32), jnp.asarray(cand), num_slots))
        out.extend(cand[h == home].tolist())
        lo += 65536
    return np.array(out[:count], np.int64)


def check_one_row_per_key(st, tables, keys, cfg=None):
    """Every key is live, on a row of its own, found again at that row (within the
    table's max_probes), and export returns exactly these keys."""
    exp = ht.export(st)
    got = set(zip(exp["tables"].tolist(), exp["ids"].tolist()))
    want = set(zip(np.asarray(tables).tolist(), np.asarray(keys).tolist()))
    assert got == want and len(exp["ids"]) == len(want)
    f = lookup(cfg or ht.TableConfig("x", 1), st, keys, tables)
    assert bool(jnp.all(f.found))
    rows = np.asarray(f.rows)
    assert len(np.unique(rows)) == len(rows)
    np.testing.assert_array_equal(np.asarray(st.row_keys)[rows], keys)
    np.testing.assert_array_equal(np.asarray(st.row_tables)[rows], tables)
    assert bool(jnp.all(st.row_live[rows]))
    assert int(ht.size(st)) == len(want)


# -- no collisions ------------------------------------------------------------------------


def test_million_random_ids_no_collisions():
    cfg = ht.TableConfig("big", dim=1, initializer=Initializer("constant", value=0.5))
    n = 1 << 20
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(I64.min, I64.max, size=n + 4096, dtype=np.int64, endpoint=True))[:n]
    rng.shuffle(ids)
    st = ht.create(cfg, n)
    ins = jax.jit(ht.find_or_insert, static_argnums=0, donate_argnums=1)
    b = n // 4
    zeros = jnp.zeros(b, jnp.int32)
    all_rows = []
    for i in range(4):  # one compile, four batches
        st, r = ins(cfg, st, zeros, jnp.asarray(ids[i * b:(i + 1) * b]), jnp.ones(b, bool))
        assert not bool(r.overflow) and bool(jnp.all(r.is_new))
        all_rows.append(np.asarray(r.rows))
    rows = np.concatenate(all_rows)
    assert len(np.unique(rows)) == n  # distinct keys, distinct rows
    f = find(st, jnp.zeros(n, jnp.int32), jnp.asarray(ids), jnp.ones(n, bool), cfg.max_probes)
    assert bool(jnp.all(f.found))
    np.testing.assert_array_equal(np.asarray(f.rows), rows)
    np.testing.assert_array_equal(np.asarray(st.row_keys)[rows], ids)
    assert int(ht.size(st)) == n and int(st.num_free) == 0
    np.testing.assert_array_equal(ht.export(st)["ids"], np.sort(ids))


def test_adversarial_keys_same_home_slot_and_special_values():
    cfg = CFG
    st = ht.create(cfg, 128)  # S = 256
    s = st.num_slots
    # 60 keys share home slot 7; 20 more start in the cluster they form (home 9);
    # specials, and the same ids again in tables 1 and 2.
    k7 = keys_with_home(s, 7, 60)
    k9 = keys_with_home(s, 9, 20, start=10**9)
    ids0 = np.concatenate([k7, k9, SPECIAL])
    keys = np.concatenate([ids0, SPECIAL, SPECIAL, k7[:5]])
    tables = np.concatenate([np.zeros(len(ids0)), np.ones(len(SPECIAL)), np.full(len(SPECIAL), 2),
                             np.full(5, 3)]).astype(np.int32)
    # Insert in three batches, the clustered keys split over calls.
    for part in np.array_split(np.arange(len(keys)), 3):
        st, r = insert(cfg, st, keys[part], tables[part])
        assert not bool(r.overflow) and bool(jnp.all(r.is_new))
    check_one_row_per_key(st, tables, keys)
    # Inserting all of them again finds every one and adds no row.
    st, r = insert(cfg, st, keys, tables)
    assert bool(jnp.all(r.found)) and int(r.num_new) == 0
    check_one_row_per_key(st, tables, keys)


def test_same_id_in_different_tables_gets_different_rows_and_values():
    cfg = CFG
    st = ht.create(cfg, 64)
    st, r = insert(cfg, st, [5, 5, 5], [0, 1, 2])
    rows = np.asarray(r.rows)
    assert len(set(rows.tolist())) == 3
    emb = np.asarray(st.embedding)[rows]
    assert not np.array_equal(emb[0], emb[1]) and not np.array_equal(emb[1], emb[2])
    f = lookup(cfg, st, [5], [3])  # table 3 never saw 5
    assert not bool(f.found[0])


# -- find / valid lanes ---------------------------------------------------------------------


def test_find_missing_returns_not_found_and_row_zero():
    cfg = CFG
    st = ht.create(cfg, 64)
    st, _ = insert(cfg, st, [10, 11, 12])
    f = lookup(cfg, st, [13, -1, 10, I64.min])
    np.testing.assert_array_equal(np.asarray(f.found), [False, False, True, False])
    np.testing.assert_array_equal(np.asarray(f.rows)[[0, 1, 3]], 0)
    np.testing.assert_array_equal(np.asarray(f.slot)[[0, 1, 3]], -1)


def test_invalid_lanes_ignored_even_for_live_keys():
    cfg = CFG
    st = ht.create(cfg, 64)
    st, r = insert(cfg, st, [10, 11])
    f = lookup(cfg, st, [10, 11], valid=[False, True])
    np.testing.assert_array_equal(np.asarray(f.found), [False, True])
    assert int(f.rows[0]) == 0 and int(f.slot[0]) == -1
    before = host(st)
    # An invalid lane neither counts nor stamps its (live) key, nor inserts a new one.
    st = st._replace(step=jnp.asarray(5, jnp.int32))
    st, r2 = insert(cfg, st, [10, 99], valid=[False, False], counts=[7, 7])
    assert not bool(jnp.any(r2.found | r2.is_new)) and int(r2.num_new) == 0
    np.testing.assert_array_equal(np.asarray(st.count), before.count)
    np.testing.assert_array_equal(np.asarray(st.last_seen), before.last_seen)
    assert int(ht.size(st)) == 2


# -- delete, tombstones, rebuild ------------------------------------------------------------


def test_delete_then_find_misses_and_tombstones_are_skipped_and_reused():
    cfg = CFG
    st = ht.create(cfg, 64)  # S = 128
    a, b, c, d = keys_with_home(st.num_slots, 3, 4)
    st, r = insert(cfg, st, [a, b, c])
    slots = np.asarray(lookup(cfg, st, [a, b, c]).slot)
    np.testing.assert_array_equal(slots, [3, 4, 5])  # one chain from the home slot
    row_b = int(r.rows[1])
    st, deleted = delete(cfg, st, *lanes([b, 12345]))
    np.testing.assert_array_equal(np.asarray(deleted)[:2], [True, False])
    assert int(st.slot_state[4]) == ht.TOMBSTONE and not bool(st.row_live[row_b])
    f = lookup(cfg, st, [a, b, c])
    np.testing.assert_array_equal(np.asarray(f.found), [True, False, True])  # c: past the tombstone
    # A new key of the same chain takes the tombstone's slot (and b's freed row).
    st, r = insert(cfg, st, [d])
    assert bool(r.is_new[0]) and int(r.rows[0]) == row_b
    assert int(lookup(cfg, st, [d]).slot[0]) == 4
    # b comes back as a new key with its own row.
    st, r = insert(cfg, st, [b])
    assert bool(r.is_new[0])
    check_one_row_per_key(st, np.zeros(4, np.int32), np.array([a, b, c, d]))


def test_rebuild_index_preserves_lookups():
    cfg = CFG
    st = ht.create(cfg, 64)
    rng = np.random.default_rng(1)
    keys = np.concatenate([SPECIAL, rng.integers(I64.min, I64.max, 40, dtype=np.int64)])
    tables = (np.arange(len(keys)) % 3).astype(np.int32)
    st, r = insert(cfg, st, keys, tables)
    gone = keys[::4]
    st, _ = delete(cfg, st, *lanes(gone, tables[::4]))
    keep = np.ones(len(keys), bool)
    keep[::4] = False
    before = np.asarray(lookup(cfg, st, keys[keep], tables[keep]).rows)
    for s in (st.num_slots, 4 * st.num_slots):  # same size (drop tombstones), larger
        st2, overflow = rebuild_index(st, s)
        assert not bool(overflow) and st2.num_slots == s
        assert int(jnp.sum(st2.slot_state == ht.TOMBSTONE)) == 0 and int(st2.num_tombstones) == 0
        f = lookup(cfg, st2, keys[keep], tables[keep])
        assert bool(jnp.all(f.found))
        np.testing.assert_array_equal(np.asarray(f.rows), before)
        assert not bool(jnp.any(lookup(cfg, st2, gone, tables[::4]).found))
        check_one_row_per_key(st2, tables[keep], keys[keep])


def test_rebuild_index_keeps_keys_within_max_probes():
    """rebuild_index places keys in parallel rounds and probes up to S slots, so a key
    can land further from home than find looks (max_probes). capacity.rebuild checks
    the displacement and retries larger, so find never loses a key.

    Bug in hashtable.rebuild_index (reported): with max_probes=2, keys A, B (home 0) and
    C (home 1) inserted one per call sit at slots 0, 1, 2; the rebuild puts C at 1 and B
    at 2 (3 probes), find(B) misses, and after deleting C, inserting B again gives B a
    second row."""
    cfg = ht.TableConfig("mp", dim=2, max_probes=2)
    s = 8
    (a, b), (c,) = keys_with_home(s, 0, 2), keys_with_home(s, 1, 1)
    st = ht.create(cfg, 4, s)
    for k in (a, b, c):
        st, r = insert(cfg, st, [k])
        assert not bool(r.overflow)
    st = capacity.rebuild(cfg, st)  # here: S grows until every chain is short enough
    home = np.asarray(ht.home_slot(st.row_tables, st.row_keys, st.num_slots))
    displacement = (np.asarray(st.row_slot) - home) % st.num_slots
    assert np.all(displacement[np.asarray(st.row_live)] < cfg.max_probes)
    assert bool(jnp.all(lookup(cfg, st, [a, b, c]).found))
    check_one_row_per_key(st, np.zeros(3, np.int32), np.array([a, b, c]), cfg)


# -- overflow -------------------------------------------------------------------------------


def test_overflow_rows_exhausted_leaves_state_bit_identical():
    cfg = ht.TableConfig("o", dim=3)
    st = ht.create(cfg, 4, slot_init=sparse_adam(0.1).init(4, 3))
    st, _ = insert(cfg, st, [1, 2, 3], counts=[2, 2, 2])
    st = st._replace(step=jnp.asarray(9, jnp.int32))
    before = host(st)
    # Two new keys for one free row, plus a live key: nothing is written, not even the
    # live key's count and last_seen.
    st2, r = insert(cfg, st, [4, 5, 1], counts=[1, 1, 1])
    assert bool(r.overflow) and int(r.num_new) == 0 and not bool(jnp.any(r.is_new))
    assert_identical(st2, before)


def test_overflow_probes_exhausted_leaves_state_bit_identical():
    cfg = ht.TableConfig("p", dim=2, max_probes=3)
    st = ht.create(cfg, 32)  # plenty of rows, S = 64
    k = keys_with_home(st.num_slots, 5, 5)
    st, r = insert(cfg, st, k[:2])
    assert not bool(r.overflow)
    before = host(st)
    # Three more keys of the same chain: the third would need a 4th probe.
    st2, r = insert(cfg, st, k[2:])
    assert bool(r.overflow) and int(r.num_new) == 0
    assert_identical(st2, before)
    # One more fits (3rd probe), then the next overflows again.
    st3, r = insert(cfg, st2, k[2:3])
    assert not bool(r.overflow)
    st4, r = insert(cfg, st3, k[3:4])
    assert bool(r.overflow)
    assert_identical(st4, st3)


def _claim_oracle(state, homes, need, max_probes):
    """Sequential model of the claim rounds: per round, each active lane probes its
    slot; a non-LIVE slot not placed earlier in the call goes to the lowest lane
    probing it, the others move on."""
    st = np.asarray(state.slot_state)
    s, n = st.shape[0], homes.shape[0]
    pos, active = homes.copy(), need.copy()
    placed, tomb = np.full(n, -1), np.zeros(n, bool)
    for _ in range(max_probes):
        if not active.any():
            break
        taken = set(placed[placed >= 0].tolist())
        winners = {}
        for i in np.flatnonzero(active):
            if st[pos[i]] != ht.LIVE and pos[i] not in taken and pos[i] not in winners:
                winners[pos[i]] = i
        for p_, i in winners.items():
            placed[i], tomb[i], active[i] = p_, st[p_] == ht.TOMBSTONE, False
        pos = np.where(active, (pos + 1) % s, pos)
    return placed, tomb, bool(active.any())


@pytest.mark.parametrize("n,crowd", [(64, 16), (512, 64), (512, 400), (4096, 3000)])
def test_claim_slots_matches_sequential_rounds(n, crowd):
    # Keys crowd into a few home slots of a half-full index with tombstones, so the
    # rounds run long, lanes contend, and (crowd 400, 3000) the rounds over all lanes hand
    # over to the compacted lanes at different points (4096 lanes: three tiers).
    rng = np.random.default_rng(n + crowd)
    s = max(1024, 4 * n)
    state = rng.choice([ht.EMPTY, ht.LIVE, ht.TOMBSTONE], s, p=[0.45, 0.45, 0.1]).astype(np.int8)
    index = ht.create(CFG, 8, num_slots=s)._replace(slot_state=jnp.asarray(state))
    keys = np.concatenate([keys_with_home(s, int(h), 1 + n // crowd) for h in rng.integers(0, s, crowd)])[:n]
    keys = np.concatenate([keys, rng.integers(0, 2**40, n - len(keys))])
    need = rng.random(n) < 0.9
    homes = np.asarray(ht.home_slot(jnp.zeros(n, jnp.int32), jnp.asarray(keys), s))
    for max_probes in (8, 128):
        got = jax.jit(ht._claim_slots, static_argnums=4)(index, jnp.zeros(n, jnp.int32), jnp.asarray(keys),
                                                        jnp.asarray(need), max_probes)
        want = _claim_oracle(index, homes, need, max_probes)
        np.testing.assert_array_equal(np.asarray(got[0]), want[0])
        np.testing.assert_array_equal(np.asarray(got[1]), want[1])
        assert bool(got[2]) == want[2]


# -- deterministic values -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_initial_values_do_not_depend_on_order_or_batching(dtype):
    cfg = ht.TableConfig("det", dim=4, dtype=dtype, seed=3)
    rng = np.random.default_rng(2)
    keys = np.concatenate([SPECIAL, rng.integers(I64.min, I64.max, 50, dtype=np.int64)])
    tables = (np.arange(len(keys)) % 2).astype(np.int32)
    results = []
    for order, nb in ((np.arange(len(keys)), 1), (rng.permutation(len(keys)), 4), (np.arange(len(keys))[::-1], 7)):
        st = ht.create(cfg, 64)
        for part in np.array_split(order, nb):
            st, r = insert(cfg, st, keys[part], tables[part])
            assert not bool(r.overflow)
        results.append(ht.export(st))
    for e in results[1:]:
        np.testing.assert_array_equal(e["ids"], results[0]["ids"])
        np.testing.assert_array_equal(e["embedding"], results[0]["embedding"])
    e = results[0]
    want = expected_rows(cfg, e["tables"], e["ids"])
    np.testing.assert_array_equal(e["embedding"], np.asarray(jnp.asarray(want).astype(e["embedding"].dtype)))
    # A different seed gives different rows.
    cfg2 = ht.TableConfig("det", dim=4, dtype=dtype, seed=4)
    st, _ = insert(cfg2, ht.create(cfg2, 64), keys, tables)
    assert not np.array_equal(ht.export(st)["embedding"], e["embedding"])


# -- counts and admission -------------------------------------------------------------------


def test_counts_are_occurrences_before_dedup():
    cfg = CFG
    st = ht.create(cfg, 64)
    t, ids, valid = lanes([5, 3, 5, 5, 7, 5, 5, 0], valid=[True] * 7 + [False])
    u = unique_keys(t, ids, valid)
    st, _ = find_or_insert(cfg, st, u.tables, u.keys, u.valid, u.counts)
    e = ht.export(st)
    assert dict(zip(e["ids"].tolist(), e["count"].tolist())) == {3: 1, 5: 5, 7: 1}
    st, _ = find_or_insert(cfg, st, u.tables, u.keys, u.valid, u.counts)
    assert dict(zip(ht.export(st)["ids"].tolist(), ht.export(st)["count"].tolist())) == {3: 2, 5: 10, 7: 2}


@pytest.mark.parametrize("numpy_sorts", [True, False], ids=["cpu_numpy", "lax"])
@pytest.mark.parametrize("n", [0, 1, 300])
def test_sort_by_table_and_key_is_a_stable_lexsort(n, numpy_sorts, monkeypatch):
    """Both paths (the CPU's packed NumPy sorts, the two one-key lax sorts used on the GPU)
    give a stable (table, key) sort: duplicates keep lane order; int64 extremes and the
    invalid-table sentinel sort in place."""
    monkeypatch.setattr(sorting, "_numpy_sorts", lambda: numpy_sorts)
    rng = np.random.default_rng(n)
    keys = np.where(rng.random(n) < 0.3, rng.choice(SPECIAL, n), rng.integers(-5, 5, n)).astype(np.int64)
    tables = rng.choice(np.array([0, 1, 2, np.iinfo(np.int32).max], np.int32), n)
    s_t, s_k, order = jax.jit(sort_by_table_and_key)(jnp.asarray(tables), jnp.asarray(keys))
    want = np.lexsort((keys, tables))  # stable
    np.testing.assert_array_equal(np.asarray(order), want)
    np.testing.assert_array_equal(np.asarray(s_t), tables[want])
    np.testing.assert_array_equal(np.asarray(s_k), keys[want])


@pytest.mark.parametrize("n,tmax", [(1, 0), (7, 2**31 - 1), (3000, 26), (140_000, 26), (140_000, 2**31 - 1)])
def test_cpu_table_key_order_passes(n, tmax):
    """The CPU's packed LSD sort (`_np_table_key_order`) is a stable (table, key) sort
    whatever the number of passes the lane count and table width call for (2 or 3),
    with the INT32_MAX sentinel ranked past every other table."""
    rng = np.random.default_rng(n + tmax)
    keys = rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64)
    keys[rng.random(n) < 0.5] = rng.integers(-3, 3)  # many duplicates
    tables = rng.integers(0, tmax + 1, n).astype(np.int32)
    tables[rng.random(n) < 0.1] = np.iinfo(np.int32).max
    got = sorting._np_table_key_order(tables, keys.view(np.uint64) ^ np.uint64(1 << 63))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.lexsort((keys, tables)))
    if n > 1:  # negative tables compare as uint32, as on the GPU: after INT32_MAX
        tables[:n // 3] = -1
        got = sorting._np_table_key_order(tables, keys.view(np.uint64) ^ np.uint64(1 << 63))
        np.testing.assert_array_equal(got, np.lexsort((keys, tables.view(np.uint32))))


@pytest.mark.parametrize("case", ["one_pass", "top_bit_ties", "lsd_fallback"])
def test_cpu_table_key_order_tie_groups(case, monkeypatch):
    """`_np_table_key_order`'s paths: keys that fit one pass with the position; a first
    pass on V's top bits with groups tied there on distinct keys, sorted again; and groups
    too wide for that sort, which go to the LSD sort."""
    lsd, lsd_order = [], sorting._lsd_order
    monkeypatch.setattr(sorting, "_lsd_order", lambda *a: lsd.append(1) or lsd_order(*a))
    rng = np.random.default_rng(7)
    n = 140_000
    tables = rng.integers(0, 27, n).astype(np.int32)
    if case == "one_pass":
        keys = rng.integers(-1000, 10**6, n).astype(np.int64)
    elif case == "top_bit_ties":  # groups of keys sharing all but their low 3 bits, duplicates
        base = rng.integers(-2**63, 2**63 - 1, n // 8, dtype=np.int64)
        keys = base[rng.integers(0, n // 8, n)] ^ rng.integers(0, 8, n)
    else:  # 31 table bits: the first pass sees 15 key bits, shared by half the keys
        tables = rng.choice(np.array([0, 2**30, -1], np.int32), n)
        keys = rng.integers(0, 2**49, n, dtype=np.int64) | rng.choice(np.array([0, -2**62], np.int64), n)
    got = sorting._np_table_key_order(tables, keys.view(np.uint64) ^ np.uint64(1 << 63))
    np.testing.assert_array_equal(got, np.lexsort((keys, tables.view(np.uint32))))
    assert bool(lsd) == (case == "lsd_fallback")


def test_sort_u64_is_a_plain_sort():
    """The CPU's NumPy sort (a host callback) returns what lax.sort does, duplicates and
    the all-ones sentinel of the claim rounds included, also inside a while_loop."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.integers(0, 2**64 - 1, 500, dtype=np.uint64), np.full(40, 2**64 - 1, np.uint64),
                        np.repeat(np.uint64(7), 30)])
    rng.shuffle(x)
    want = np.sort(x)
    np.testing.assert_array_equal(np.asarray(jax.jit(sorting.sort_u64)(jnp.asarray(x))), want)
    looped = jax.jit(lambda v: jax.lax.fori_loop(0, 3, lambda i, a: sorting.sort_u64(a[::-1]), v))
    np.testing.assert_array_equal(np.asarray(looped(jnp.asarray(x))), want)


def test_admission_through_engine_on_third_occurrence():
    engine = EmbeddingEngine({"f": EmbeddingOption(dim=4, num_rows=32, admission=Admission(min_count=3))})
    opt = sparse_sgd(1.0)
    state = engine.init(opt)
    (pname,) = engine.physical

    @jax.jit
    def step(state, feats):
        state, lk = engine.lookup(state, feats, train=True)
        g = {p: jnp.ones_like(v) for p, v in lk.rows.items()}  # every live row gets -1
        state, _ = engine.apply_gradients(state, lk, g, opt)
        return state, lk

    def run(ids):
        nonlocal state
        feats = {"f": jax.tree.map(jnp.asarray, Ragged.from_lists([ids], capacity=8))}
        state, lk = step(state, feats)
        t = lk.tables[pname]
        got = {}
        for i in range(int(t.unique.num_unique)):
            got[int(t.unique.keys[i])] = (bool(t.live[i]), np.asarray(lk.rows[pname][i]))
        return got

    cfg = engine.physical[pname]
    init = lambda i: expected_rows(cfg, [0], [i])[0]  # noqa: E731
    # Step 1: 7 twice (2 occurrences), 9 once.  Step 2: 7 (3rd -> admitted), 9 (2nd).
    # Step 3: 9 (3rd -> admitted), 11 three times in one batch (admitted at once).
    g1 = run([7, 7, 9])
    assert g1[7][0] is False and g1[9][0] is False
    assert not np.any(g1[7][1]) and not np.any(g1[9][1])  # not admitted: zeros
    assert int(ht.size(state[pname].table)) == 0  # no row, so no update anywhere
    g2 = run([7, 9])
    assert g2[7][0] is True and g2[9][0] is False
    np.testing.assert_array_equal(g2[7][1], init(7))  # admitted: fresh deterministic row
    g3 = run([9, 11, 11, 11, 7])
    assert g3[9][0] and g3[11][0] and g3[7][0]
    np.testing.assert_array_equal(g3[7][1], init(7) - 1.0)  # one SGD update since admission
    np.testing.assert_array_equal(g3[9][1], init(9))
    e = ht.export(state[pname].table)
    assert e["ids"].tolist() == [7, 9, 11]
    np.testing.assert_array_equal(e["embedding"][0], (init(7) - 1.0) - 1.0)
    np.testing.assert_array_equal(e["embedding"][1], init(9) - 1.0)
    assert e["count"].tolist() == [2, 1, 3]  # occurrences counted since admission


# -- memory ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [8, 64])
def test_bytes_per_row_matches_allocation(dim):
    r = 1024
    cfg = ht.TableConfig("mem", dim=dim)
    st = ht.create(cfg, r, slot_init=sparse_adam(1e-3).init(r, dim))
    actual = sum(leaf.nbytes for leaf in jax.tree.leaves(st)) / r
    predicted = ht.bytes_per_row(dim, "float32", slot_floats_per_row=2 * dim)
    # Everything but the scalars and the slot defaults scales with R.
    fixed = (3 * 4 + 2 * dim * 4) / r
    assert predicted == pytest.approx(actual - fixed, abs=1e-9), (dim, actual, predicted)
    print(f"dim {dim} + Adam: {actual:.1f} bytes per row, bytes_per_row says {predicted:.1f}")


def test_rebuild_respects_max_probes_so_no_key_gets_two_rows():
    """Regression: a rebuild that pushed a key past max_probes made it invisible to
    find, and re-inserting it gave one key two rows."""
    cfg = ht.TableConfig("t", dim=2, max_probes=2)
    s = 8
    cand = np.arange(1, 5000, dtype=np.int64)
    home = np.asarray(ht.home_slot(jnp.zeros(len(cand), jnp.int32), jnp.asarray(cand), s))
    a, b = cand[home == 0][:2]
    c = cand[home == 1][0]
    st = ht.create(cfg, 4, s)
    one = (jnp.zeros(1, jnp.int32), jnp.ones(1, bool))
    for k in (a, b, c):
        st, _ = ht.find_or_insert(cfg, st, one[0], jnp.array([k]), one[1])
    st2, overflow = ht.rebuild_index(st, s, cfg.max_probes)
    if not bool(overflow):  # every key must then be findable within max_probes
        found = ht.find(st2, jnp.zeros(3, jnp.int32), jnp.array([a, b, c]), jnp.ones(3, bool), cfg.max_probes)
        assert np.asarray(found.found).all()


def test_reused_row_starts_with_its_own_count_and_tombstones_are_counted():
    cfg = ht.TableConfig("t", dim=2)
    t1, v1 = jnp.zeros(1, jnp.int32), jnp.ones(1, bool)
    st = ht.create(cfg, 1)
    st, _ = ht.find_or_insert(cfg, st, t1, jnp.array([7]), v1, counts=jnp.array([100]))
    st, _ = ht.delete(cfg, st, t1, jnp.array([7]), v1)
    assert int(st.num_tombstones) == 1
    st, r = ht.find_or_insert(cfg, st, t1, jnp.array([8]), v1)
    assert int(st.count[r.rows[0]]) == 1
    st, _ = ht.delete(cfg, st, t1, jnp.array([8]), v1)
    st, _ = ht.find_or_insert(cfg, st, t1, jnp.array([8]), v1)  # reuses its own tombstone
    assert int(st.num_tombstones) == int(np.sum(np.asarray(st.slot_state) == ht.TOMBSTONE))


@pytest.mark.parametrize("kind", ["truncated_normal", "normal", "uniform", "xavier_uniform", "constant"])
@pytest.mark.parametrize("chunk_elems", [16 * 16 * 37, 1 << 25])
def test_write_initial_rows_new_lanes_only_bitwise(kind, chunk_elems):
    # The initializer runs over the compacted new lanes in chunks: new rows get exactly
    # initial_rows' bits, every other row keeps its bits, and no new lane is missed.
    rng = np.random.default_rng(7)
    n, r = 1000, 1200
    ids = jnp.asarray(rng.integers(-2**62, 2**62, n))
    tables = jnp.asarray(rng.integers(0, 3, n).astype(np.int32))
    new = rng.random(n) < 0.6
    new[:5], new[-5:] = True, False  # boundaries
    targets = np.where(new, rng.permutation(r)[:n], r).astype(np.int32)
    emb = jnp.asarray(rng.normal(size=(r, 16)).astype(np.float32))
    init = Initializer(kind, std=0.01, value=0.5)
    whole = np.asarray(jax.jit(lambda t, i: initial_rows(init, t, i, 16, 3))(tables, ids))
    write = jax.jit(lambda e, g, t, i, w: write_initial_rows(init, e, g, t, i, w, 3, chunk_elems=chunk_elems))
    got = np.asarray(write(emb, jnp.asarray(targets), tables, ids, jnp.asarray(new)))
    expect = np.asarray(emb).copy()
    expect[targets[new]] = whole[new]
    np.testing.assert_array_equal(got.view(np.uint32), expect.view(np.uint32))
    none = np.asarray(write(emb, jnp.asarray(targets), tables, ids, jnp.zeros(n, bool)))
    np.testing.assert_array_equal(none.view(np.uint32), np.asarray(emb).view(np.uint32))


@pytest.mark.parametrize("kind,dist", [("truncated_normal", "truncnorm"), ("normal", "norm"),
                                       ("xavier_normal", "norm"), ("uniform", "uniform")])
def test_initial_rows_follow_their_distribution(kind, dist):
    # 500k values (an odd dim, so Box-Muller's cos / sin halves split unevenly) pass a
    # Kolmogorov-Smirnov test, and neighbouring columns are uncorrelated.
    from scipy import stats

    n, dim = 20000, 25
    init = Initializer(kind, mean=0.5, std=2.0, a=-1.5, b=2.0, minval=-1.0, maxval=3.0)
    x = np.asarray(jax.jit(lambda t, i: initial_rows(init, t, i, dim, 11))(
        jnp.zeros(n, jnp.int32), jnp.arange(n, dtype=jnp.int64)))
    ref = {"truncnorm": stats.truncnorm(-1.5, 2.0, loc=0.5, scale=2.0),
           "norm": stats.norm(0.5, 2.0) if kind == "normal" else stats.norm(0, np.sqrt(2 / (1 + dim))),
           "uniform": stats.uniform(-1.0, 4.0)}[dist]
    assert stats.kstest(x.ravel(), ref.cdf).pvalue > 1e-4
    corr = np.corrcoef(x.T)[np.triu_indices(dim, 1)]
    assert np.abs(corr).max() < 0.04
