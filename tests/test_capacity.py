"""Growing tables between steps: grow, ensure_headroom, and the overflow-rerun loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recis_jax  # noqa: F401  (x64)
from recis_jax.embedding import capacity
from recis_jax.embedding import hashtable as ht
from recis_jax.optim.sparse import sparse_adagrad
from tests.test_hashtable import (CFG, assert_identical, check_one_row_per_key, delete, expected_rows, host, insert,
                                  lanes, lookup)

# Rows-part leaves: bit-identical between a table that grew and one that started big
# (the index leaves and row_slot depend on placement history, lookups do not).
ROW_LEAVES = ("embedding", "slots", "slot_defaults", "row_keys", "row_tables", "row_live", "last_seen", "count",
              "free_rows", "num_free", "step")


def make_stream(num_ids, batch_new, batch_old, lanes, seed=0):
    """Batches of (ids, valid): `batch_new` never-seen IDs plus up to `batch_old` IDs
    seen before, unique within the batch, padded to `lanes` with invalid lanes (whose
    keys repeat live IDs, which must be ignored)."""
    rng = np.random.default_rng(seed)
    fresh = rng.permutation(np.arange(-num_ids // 2, num_ids - num_ids // 2, dtype=np.int64) * 7919)
    batches, seen, pos = [], [], 0
    while pos < num_ids:
        new = fresh[pos:pos + batch_new]
        pos += len(new)
        old = rng.choice(np.array(seen), min(batch_old, len(seen)), replace=False) if seen else np.zeros(0, np.int64)
        ids = np.zeros(lanes, np.int64)
        valid = np.zeros(lanes, bool)
        n = len(new) + len(old)
        ids[:n] = np.concatenate([new, old])
        valid[:n] = True
        if seen:
            ids[n:] = seen[0]  # padding that equals a live key
        batches.append((ids, valid))
        seen.extend(new.tolist())
    return batches


def test_trainer_loop_grows_from_8_rows_to_100x():
    """R = 8 fed 800 new IDs: each overflowed step returns its input bit-identical, the
    host grows and reruns; every ID ends up once, with its initial value, its count and
    last step; the step compiles once per power-of-two size."""
    cfg = ht.TableConfig("grow", dim=4)
    num_lanes = 32
    batches = make_stream(800, batch_new=20, batch_old=8, lanes=num_lanes)
    step_fn = jax.jit(ht.find_or_insert, static_argnums=0, donate_argnums=1)
    tables = jnp.zeros(num_lanes, jnp.int32)
    state = ht.create(cfg, 8)
    counts, last = {}, {}
    overflows = grown_by_headroom = 0
    for i, (ids, valid) in enumerate(batches):
        if i % 5 == 0:  # the trainer checks headroom every K steps, for fewer steps than K
            state, grew = capacity.ensure_headroom(cfg, state, max_new_per_step=20, steps=2)
            grown_by_headroom += grew
        state = state._replace(step=jnp.asarray(i, jnp.int32))
        while True:
            before = host(state)  # the input is donated: keep a copy to compare with
            state, res = step_fn(cfg, state, tables, jnp.asarray(ids), jnp.asarray(valid))
            if not bool(res.overflow):
                break
            overflows += 1
            assert_identical(state, before)
            state = capacity.grow(cfg, state, 2 * state.capacity)
        for k in ids[valid].tolist():
            counts[k] = counts.get(k, 0) + 1
            last[k] = i
    assert overflows > 0 and grown_by_headroom > 0  # both paths ran
    assert state.capacity == 1024 and state.num_slots == 2048
    e = ht.export(state)
    want = np.array(sorted(counts), np.int64)
    np.testing.assert_array_equal(e["ids"], want)  # every ID exactly once
    np.testing.assert_array_equal(e["embedding"], expected_rows(cfg, np.zeros(len(want)), want))
    np.testing.assert_array_equal(e["count"], [counts[k] for k in want.tolist()])
    np.testing.assert_array_equal(e["last_seen"], [last[k] for k in want.tolist()])
    check_one_row_per_key(state, np.zeros(len(want), np.int32), want, cfg)
    # 8 sizes (8 ... 1024 rows): one compile each, for the step and for the rebuild.
    assert step_fn._cache_size() <= 8, step_fn._cache_size()
    assert capacity._rebuild._cache_size() <= 10, capacity._rebuild._cache_size()
    print(f"8 -> {state.capacity} rows: {overflows} overflowed steps rerun, {grown_by_headroom} headroom growths, "
          f"{step_fn._cache_size()} step compiles, {capacity._rebuild._cache_size()} rebuild compiles")

    # The same stream into a table that starts at 1024 rows: the same rows, bit for bit.
    big = ht.create(cfg, 1024)
    for i, (ids, valid) in enumerate(batches):
        big = big._replace(step=jnp.asarray(i, jnp.int32))
        big, res = step_fn(cfg, big, tables, jnp.asarray(ids), jnp.asarray(valid))
        assert not bool(res.overflow)
    for name in ROW_LEAVES:
        assert_identical(getattr(state, name), getattr(big, name))


def test_grow_preserves_rows_slots_and_free_stack_order():
    opt = sparse_adagrad(0.5, initial_accumulator_value=0.1)
    apply = jax.jit(opt.apply)
    small = ht.create(CFG, 8, slot_init=opt.init(8, CFG.dim))
    big = ht.create(CFG, 32, slot_init=opt.init(32, CFG.dim))

    def ops(st, grow_now):
        st = st._replace(step=jnp.asarray(4, jnp.int32))
        st, r = insert(CFG, st, [10, 11, 12, 13, 14, 15], counts=[1, 2, 3, 4, 5, 6])
        emb, slots = apply(st.embedding, st.slots, r.rows, jnp.ones((6, CFG.dim), jnp.float32),
                           jnp.ones(6, bool), jnp.asarray(1, jnp.int32))
        st = st._replace(embedding=emb, slots=slots)
        st, _ = delete(CFG, st, *lanes([11, 13]))  # their rows go on top of the free stack
        if grow_now:
            old = st
            st = capacity.grow(CFG, st, 32)
            assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))  # old state invalid
        st, r = insert(CFG, st, np.arange(100, 120))  # 2 reused, 2 never used, then 16 new rows
        return st, np.asarray(r.rows)

    small, rows_small = ops(small, True)
    big, rows_big = ops(big, False)
    np.testing.assert_array_equal(rows_small, rows_big)
    assert small.capacity == 32 and small.num_slots == 64
    for name in ROW_LEAVES:
        assert_identical(getattr(small, name), getattr(big, name))
    keys = np.array([10, 12, 14, 15] + list(range(100, 120)))
    check_one_row_per_key(small, np.zeros(len(keys), np.int32), keys)
    assert int(small.num_tombstones) == 0


def test_grow_rejects_shrinking_and_too_small_index():
    st = ht.create(CFG, 16)
    with pytest.raises(ValueError, match="shrink"):
        capacity.grow(CFG, st, 8)
    with pytest.raises(ValueError, match="index slots"):
        capacity.grow(CFG, st, 64, num_slots=32)


def test_ensure_headroom_noop_and_row_growth():
    st = ht.create(CFG, 16)
    st, _ = insert(CFG, st, np.arange(6))
    st2, grew = capacity.ensure_headroom(CFG, st, max_new_per_step=2, steps=4)  # 10 free >= 8
    assert not grew and st2 is st
    st, _ = insert(CFG, st, np.arange(6, 10))  # 6 free < 8
    st, grew = capacity.ensure_headroom(CFG, st, max_new_per_step=2, steps=4)
    assert grew and st.capacity == 32 and st.num_slots == 64
    st, grew = capacity.ensure_headroom(CFG, st, max_new_per_step=30, steps=4)  # 10 live + 120
    assert grew and st.capacity == 256 and st.num_slots == 512
    check_one_row_per_key(st, np.zeros(10, np.int32), np.arange(10))


def test_ensure_headroom_rebuilds_same_size_when_tombstones_dominate():
    st = ht.create(CFG, 64)  # S = 128
    st, _ = insert(CFG, st, np.arange(60))
    st, _ = delete(CFG, st, *lanes(np.arange(50)))
    assert int(jnp.sum(st.slot_state == ht.TOMBSTONE)) == 50
    # (10 live + 50 tombstones + 8) / 128 > 0.5, but (10 + 8) / 128 is not.
    st, grew = capacity.ensure_headroom(CFG, st, max_new_per_step=2, steps=4)
    assert not grew and st.capacity == 64 and st.num_slots == 128
    assert int(jnp.sum(st.slot_state == ht.TOMBSTONE)) == 0
    check_one_row_per_key(st, np.zeros(10, np.int32), np.arange(50, 60))
    assert not bool(jnp.any(lookup(CFG, st, np.arange(50)).found))


def test_ensure_headroom_grows_a_small_index():
    st = ht.create(CFG, 64, num_slots=64)
    st, _ = insert(CFG, st, np.arange(40))
    st, grew = capacity.ensure_headroom(CFG, st, max_new_per_step=2, steps=4)  # (40 + 8) / 64 > 0.5
    assert grew and st.capacity == 64 and st.num_slots == 128
    check_one_row_per_key(st, np.zeros(40, np.int32), np.arange(40))


def test_ensure_headroom_respects_the_budget():
    st = ht.create(CFG, 16)
    st, _ = insert(CFG, st, np.arange(10))
    # 2x would be 32 rows; the budget of 20 still leaves 8 free: grow to exactly 20.
    st2, grew = capacity.ensure_headroom(CFG, host_copy(st), max_new_per_step=2, steps=4, max_rows=20)
    assert grew and st2.capacity == 20 and int(st2.num_free) == 10
    with pytest.raises(ValueError, match=r"'t'.*18 rows.*max_rows is 16.*enable eviction or raise the budget"):
        capacity.ensure_headroom(CFG, st, max_new_per_step=2, steps=4, max_rows=16)


def host_copy(st):
    return jax.tree.map(jnp.asarray, host(st))


def test_ensure_headroom_argument_checks():
    st = ht.create(CFG, 16)
    with pytest.raises(ValueError, match="growth"):
        capacity.ensure_headroom(CFG, st, 4, growth=1.0)
    assert capacity.next_pow2(1) == 1 and capacity.next_pow2(8) == 8 and capacity.next_pow2(9) == 16
