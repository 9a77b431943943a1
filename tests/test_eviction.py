"""Eviction: GlobalStepFilter (max_age), LFU size cap, row reuse, the policy schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recis_jax  # noqa: F401  (x64)
from recis_jax.embedding import eviction as ev
from recis_jax.embedding import hashtable as ht
from recis_jax.embedding.dedup import unique_keys
from recis_jax.optim.sparse import sparse_adagrad
from tests.test_hashtable import CFG, check_one_row_per_key, expected_rows, find_or_insert, host, insert, lanes

evict_stale = jax.jit(ev.evict_stale, donate_argnums=0)
evict_lfu = jax.jit(ev.evict_lfu, donate_argnums=0)


def live_ids(st):
    e = ht.export(st)
    return dict(zip(zip(e["tables"].tolist(), e["ids"].tolist()), zip(e["last_seen"].tolist(), e["count"].tolist())))


def test_evict_stale_boundary():
    st = ht.create(CFG, 64)
    for step, ids in ((0, [1, 2, 3]), (2, [2, 4]), (5, [3, 5])):
        st = st._replace(step=jnp.asarray(step, jnp.int32))
        st, _ = insert(CFG, st, ids)
    # last_seen: 1 -> 0, 2 -> 2, 3 -> 5, 4 -> 2, 5 -> 5; at step 7 the ages are 7, 5, 2, 5, 2.
    snapshot = host(st)
    st2, n = evict_stale(jax.tree.map(jnp.asarray, snapshot), 7, 5)  # age 5 == max_age stays
    assert int(n) == 1 and sorted(i for _, i in live_ids(st2)) == [2, 3, 4, 5]
    st3, n = evict_stale(jax.tree.map(jnp.asarray, snapshot), 7, 4)
    assert int(n) == 3 and sorted(i for _, i in live_ids(st3)) == [3, 5]
    # Evicted keys miss; their slots are tombstones, their rows free.
    assert int(ht.size(st3)) == 2 and int(jnp.sum(st3.slot_state == ht.TOMBSTONE)) == 3
    check_one_row_per_key(st3, [0, 0], [3, 5])


def test_global_step_filter_scripted_against_a_model():
    """30 steps of random batches from a pool of 40 IDs in 2 tables, maybe_evict every 3
    steps with max_age 4, against a dict model of last_seen and count."""
    policy = ev.EvictionPolicy(max_age=4, every=3)
    rng = np.random.default_rng(0)
    st = ht.create(CFG, 64)
    model = {}  # (table, id) -> [last_seen, count]
    for step in range(30):
        st = st._replace(step=jnp.asarray(step, jnp.int32))  # the table's clock
        n = int(rng.integers(0, 12))
        ids = rng.choice(40, n, replace=False).astype(np.int64) - 20  # negative IDs too
        tables = rng.integers(0, 2, n).astype(np.int32)
        ids = np.unique(np.stack([tables, ids], 1), axis=0)
        tables, ids = ids[:, 0].astype(np.int32), ids[:, 1]
        counts = rng.integers(1, 4, len(ids))
        st, r = insert(CFG, st, ids, tables, counts=counts)
        assert not bool(r.overflow)
        for t, i, c in zip(tables.tolist(), ids.tolist(), counts.tolist()):
            ls, cnt = model.get((t, i), (0, 0))
            model[(t, i)] = (step, cnt + c)
        st, n_ev = ev.maybe_evict(policy, st, step)
        if step % 3 == 0:
            stale = [k for k, (ls, _) in model.items() if step - ls > 4]
            for k in stale:
                del model[k]  # an evicted ID that comes back starts from count 0
            assert int(n_ev) == len(stale)
        else:
            assert int(n_ev) == 0
        assert live_ids(st) == model, step
    keys = np.array(sorted(model))
    check_one_row_per_key(st, keys[:, 0], keys[:, 1])


def test_lfu_keeps_most_frequent_ties_by_id_then_table():
    st = ht.create(CFG, 64)
    ids = [10, -3, 7, 2, 99, 7, 10]
    tables = [0, 0, 0, 0, 0, 1, 2]
    counts = [5, 5, 5, 1, 9, 5, 5]
    st, _ = insert(CFG, st, ids, tables, counts=counts)
    snapshot = host(st)
    # Order: 99 (9), then count 5 by ID (signed) then table: -3, 7@0, 7@1, 10@0, 10@2, then 2.
    want_order = [(0, 99), (0, -3), (0, 7), (1, 7), (0, 10), (2, 10), (0, 2)]
    for keep in (1, 3, 4, 6, 7, 100):
        st2, n = evict_lfu(jax.tree.map(jnp.asarray, snapshot), keep)
        assert int(n) == max(0, 7 - keep)
        assert set(live_ids(st2)) == set(want_order[:keep]), keep


def test_lfu_counts_occurrences_before_dedup():
    st = ht.create(CFG, 64)
    t, ids, valid = lanes([4, 8, 8, 6, 4, 4, 4, 4, 6])  # 4 seen 5 times, 6 twice, 8 twice
    u = unique_keys(t, ids, valid)
    st, _ = find_or_insert(CFG, st, u.tables, u.keys, u.valid, u.counts)
    assert {i: c for (_, i), (_, c) in live_ids(st).items()} == {4: 5, 6: 2, 8: 2}
    st, n = evict_lfu(st, 2)
    assert int(n) == 1 and sorted(i for _, i in live_ids(st)) == [4, 6]  # 6 beats 8 on the tie


def test_evicted_rows_are_reused_with_fresh_values_and_slots():
    """Evict 90%, reinsert as many new IDs: no growth, each new ID starts from its
    deterministic initial row, the slot defaults, count = its occurrences."""
    r = 64
    opt = sparse_adagrad(0.5, initial_accumulator_value=0.1)
    st = ht.create(CFG, r, slot_init=opt.init(r, CFG.dim))
    old = np.arange(1000, 1000 + r, dtype=np.int64)
    st, res = insert(CFG, st, old, counts=np.arange(1, r + 1))  # ID 1000 + k seen k + 1 times
    # Train every row once, so embeddings and slots move away from their initial values.
    rows = res.rows
    emb, slots = opt.apply(st.embedding, st.slots, rows, jnp.ones((r, CFG.dim), jnp.float32),
                           jnp.ones(r, bool), jnp.asarray(1, jnp.int32))
    st = st._replace(embedding=emb, slots=slots, step=jnp.asarray(3, jnp.int32))
    keep = 6
    survivors = ht.export(st)
    st, n = evict_lfu(st, keep)
    assert int(n) == r - keep and int(st.num_free) == r - keep
    survivors = {k: survivors[k][-keep:] for k in ("ids", "embedding", "slot_acc", "count")}  # most frequent
    new = np.arange(-5000, -5000 + r - keep, dtype=np.int64)
    st, res = insert(CFG, st, new)
    assert not bool(res.overflow) and bool(jnp.all(res.is_new)) and st.capacity == r and int(st.num_free) == 0
    e = ht.export(st)
    is_new = np.isin(e["ids"], new)
    np.testing.assert_array_equal(e["ids"][is_new], new)
    np.testing.assert_array_equal(e["embedding"][is_new], expected_rows(CFG, np.zeros(len(new)), new))
    np.testing.assert_array_equal(e["slot_acc"][is_new], np.full((len(new), CFG.dim), 0.1, np.float32))
    np.testing.assert_array_equal(e["count"][is_new], 1)
    np.testing.assert_array_equal(e["last_seen"][is_new], 3)
    for k in ("ids", "embedding", "slot_acc", "count"):
        np.testing.assert_array_equal(e[k][~is_new], survivors[k])
    check_one_row_per_key(st, np.zeros(r, np.int32), np.concatenate([new, survivors["ids"]]))


def test_policy_validation_and_schedule():
    with pytest.raises(ValueError, match="max_age"):
        ev.EvictionPolicy(max_age=0)
    with pytest.raises(ValueError, match="every"):
        ev.EvictionPolicy(max_age=3, every=0)
    with pytest.raises(ValueError, match="max_rows"):
        ev.EvictionPolicy(max_rows=0)
    st = ht.create(CFG, 64)
    st, _ = insert(CFG, st, [1, 2, 3], counts=[3, 2, 1])
    policy = ev.EvictionPolicy(every=4, max_rows=1)
    st, n = ev.maybe_evict(policy, st, 6)  # not a multiple of 4: nothing runs
    assert int(n) == 0 and int(ht.size(st)) == 3
    st, n = ev.maybe_evict(policy, st, 8)
    assert int(n) == 2 and sorted(i for _, i in live_ids(st)) == [1]
    # An explicit clock: with last_seen 0 and current_step 10, max_age 9 evicts.
    st, n = ev.maybe_evict(ev.EvictionPolicy(max_age=9), st, 1, current_step=10)
    assert int(n) == 1 and int(ht.size(st)) == 0
