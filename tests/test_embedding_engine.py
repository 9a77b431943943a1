"""EmbeddingEngine: merging, pooling, gradients vs a dense table, sparse updates."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recis_jax.embedding import hashtable as ht
from recis_jax.embedding.engine import EmbeddingEngine, EmbeddingOption, stream_id
from recis_jax.embedding.initializers import Initializer, initial_rows
from recis_jax.optim import sparse_adam, sparse_adamw, sparse_sgd
from recis_jax.ragged import Ragged

RNG = np.random.default_rng(0)


def random_ragged(b, vocab, max_len, cap, weights=False):
    rows = [list(RNG.choice(vocab, RNG.integers(0, max_len + 1))) for _ in range(b)]
    w = [list(RNG.uniform(0.5, 2.0, len(r))) for r in rows] if weights else None
    return Ragged.from_lists(rows, capacity=cap, weights=w)


VOCAB = np.array([5, -1, -2, 0, 2**63 - 1, -(2**63), 77, 123456789012345], np.int64)

OPTIONS = {
    "a": EmbeddingOption(4, combiner="sum"),
    "b": EmbeddingOption(4, combiner="mean"),
    "s": EmbeddingOption(4, combiner="none", length=3, shared_name="a"),
    "t": EmbeddingOption(4, combiner="tile", length=2),
}


def batch(seed=0):
    global RNG
    RNG = np.random.default_rng(seed)
    return {"a": random_ragged(6, VOCAB, 4, 32), "b": random_ragged(6, VOCAB, 3, 32, weights=True),
            "s": random_ragged(6, VOCAB, 5, 32), "t": random_ragged(6, VOCAB, 3, 32, weights=True)}


def loss_of(out):
    total = 0.0
    for k, v in sorted(out.items()):
        x = v[0] if isinstance(v, tuple) else v
        total = total + jnp.sum(jnp.sin(x) * (1.0 + jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape) / 7))
    return total


def make_step(engine, opt):
    @jax.jit
    def step(state, feats):
        state, lk = engine.lookup(state, feats)

        def loss(rows):
            out = engine.pool(rows, lk, feats)
            return loss_of(out), out

        (l, out), g = jax.value_and_grad(loss, has_aux=True)(lk.rows)
        state, stats = engine.apply_gradients(state, lk, g, opt)
        return state, l, out, stats

    return step


def rows_by_id(engine, state):
    """{(logical table name, id): embedding row} over all physical tables."""
    out = {}
    for pname, ts in state.items():
        ex = ht.export(ts.table)
        names = {m.table_index: (m.option.shared_name or m.feature) for m in engine.members[pname]}
        for t, i, e in zip(ex["tables"], ex["ids"], ex["embedding"]):
            out[(names[int(t)], int(i))] = e
    return out


def test_merging_groups_tables_and_keys_on_pairs():
    eng = EmbeddingEngine(OPTIONS)
    assert len(eng.physical) == 1  # all dim 4, same initializer
    members = {m.feature: m.table_index for m in next(iter(eng.members.values()))}
    assert members["a"] == members["s"] != members["b"] != members["t"]
    assert len(EmbeddingEngine(OPTIONS, merge=False).physical) == 3  # a+s shared, b, t


def test_merged_equals_unmerged_over_steps():
    opt = sparse_adamw(0.05, weight_decay=0.01)
    merged, unmerged = EmbeddingEngine(OPTIONS), EmbeddingEngine(OPTIONS, merge=False)
    sm, su = merged.init(opt), unmerged.init(opt)
    fm, fu = make_step(merged, opt), make_step(unmerged, opt)
    for seed in range(3):
        feats = jax.device_put(batch(seed))
        sm, lm, om, _ = fm(sm, feats)
        su, lu, ou, _ = fu(su, feats)
        np.testing.assert_allclose(lm, lu, rtol=1e-6)
        for k in om:
            jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), om[k], ou[k])
    rm, ru = rows_by_id(merged, sm), rows_by_id(unmerged, su)
    assert rm.keys() == ru.keys()
    for k in rm:
        np.testing.assert_allclose(rm[k], ru[k], rtol=1e-6, atol=1e-7)


def test_gradients_match_dense_table_jax_grad():
    """The engine's per-unique-row gradients equal jax.grad of the same model written
    with a dense [V, dim] table and plain jnp ops."""
    eng = EmbeddingEngine(OPTIONS, merge=False)
    state = eng.init(None)
    feats = jax.device_put(batch(1))
    state, lk = jax.jit(eng.lookup)(state, feats)

    def loss(rows):
        return loss_of(eng.pool(rows, lk, feats))

    g_rows = jax.grad(loss)(lk.rows)

    # Dense equivalent: vocabulary index per logical table, rows = the engine's rows.
    def dense_tables():
        out = {}
        for pname, tl in lk.tables.items():
            n = int(tl.unique.num_unique)
            out[pname] = lk.rows[pname][:n]
        return out

    def dense_loss(tables):
        res = {}
        for pname, members in eng.members.items():
            tl = lk.tables[pname]
            n = int(tl.unique.num_unique)
            keys = [(int(t), int(k)) for t, k in zip(tl.unique.tables[:n], tl.unique.keys[:n])]
            for m in members:
                r = feats[m.feature]
                ids = np.asarray(r.values)
                splits = np.asarray(r.row_splits)
                idx = jnp.array([keys.index((m.table_index, int(i))) for i in ids[: splits[-1]]], jnp.int32)
                e = jnp.take(tables[pname], idx, axis=0)
                if r.weights is not None:
                    e = e * jnp.asarray(r.weights[: splits[-1]])[:, None]
                seg = np.repeat(np.arange(len(splits) - 1), np.diff(splits))
                if m.option.combiner in ("sum", "mean"):
                    x = jax.ops.segment_sum(e, seg, len(splits) - 1)
                    if m.option.combiner == "mean":
                        w = r.weights[: splits[-1]] if r.weights is not None else np.ones(splits[-1])
                        den = np.bincount(seg, w, len(splits) - 1)
                        x = jnp.where(den[:, None] > 0, x / np.where(den > 0, den, 1)[:, None], 0)
                    res[m.feature] = x
                else:
                    L = m.option.length
                    rows = []
                    for i in range(len(splits) - 1):
                        part = e[splits[i]:min(splits[i + 1], splits[i] + L)]
                        rows.append(jnp.concatenate([part, jnp.zeros((L - part.shape[0], 4), jnp.float32)]))
                    seq = jnp.stack(rows)
                    res[m.feature] = (seq, None) if m.option.combiner == "none" else seq.reshape(len(rows), -1)
        return loss_of(res)

    g_dense = jax.grad(dense_loss)(dense_tables())
    for pname in g_dense:
        n = g_dense[pname].shape[0]
        np.testing.assert_allclose(g_rows[pname][:n], g_dense[pname], rtol=1e-5, atol=1e-6)
        assert not np.any(np.asarray(g_rows[pname][n:]))  # padding lanes get no gradient


@pytest.mark.parametrize("impl", ["reference", "interpret"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pool_vjp_reads_the_tables_and_matches_pool(monkeypatch, impl, dtype):
    """pool_vjp == jax.vjp of pool over lookup.rows, bit for bit: pooled outputs and row
    gradients of the real unique keys (sum, weighted mean, a shared table with a
    sequence, tile). With float32
    storage the sum/mean-only tables read the table rows themselves: lookup.rows set
    to NaN changes nothing there (bfloat16 storage, and tables with sequence / tile
    features, pool from lookup.rows)."""
    from pallas_kernels import dispatch

    monkeypatch.setenv(dispatch.ENV_VAR, impl)
    opts = {f: dataclasses.replace(o, dtype=dtype) for f, o in OPTIONS.items()}
    eng = EmbeddingEngine(opts, merge=False)
    state = eng.init(sparse_sgd(0.1))
    feats = jax.device_put(batch(4))
    state, lk = jax.jit(eng.lookup)(state, feats)
    g_out = jax.tree.map(lambda x: jnp.sin(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape))
                         if x.dtype == jnp.float32 else np.zeros(x.shape, jax.dtypes.float0),  # the masks
                         eng.pool(lk.rows, lk, feats))

    @jax.jit
    def both(state, lk):
        want, vjp = jax.vjp(lambda r: eng.pool(r, lk, feats), lk.rows)
        got, vjp2 = eng.pool_vjp(state, lk, feats)
        return want, vjp(g_out), got, vjp2(g_out)

    want, g_want, got, g_got = both(state, lk)
    # pool_vjp leaves the rows of lanes past num_unique unspecified (the kernel skips them).
    real = lambda g: {p: jnp.where(lk.tables[p].unique.valid[:, None], r, 0) for p, r in g[0].items()}  # noqa: E731
    for a, b in zip(jax.tree.leaves((got, real(g_got))), jax.tree.leaves((want, real(g_want)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(g_got))

    nan_lk = lk._replace(rows={p: jnp.full_like(r, jnp.nan) for p, r in lk.rows.items()})
    got_nan = jax.jit(lambda s, lk: eng.pool_vjp(s, lk, feats)[0])(state, nan_lk)
    for f in ("a", "b", "s", "t"):
        finite = bool(jnp.all(jnp.isfinite(jnp.asarray(jax.tree.leaves(got_nan[f])[0]))))
        from_table = dtype == "float32" and f == "b"  # "a" shares its table with the sequence "s"
        assert finite == from_table, f
        if from_table:
            np.testing.assert_array_equal(np.asarray(got_nan[f]), np.asarray(want[f]))


@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_segment_grads_update_like_materialized_ones(monkeypatch, impl):
    """pool_vjp(segments=True): the sum/mean tables' gradients as SegmentGrads, which the
    sparse optimizer sums where it updates each row (the fused kernel), give the tables
    the materialised gradients give (weighted mean, a shared table with a sequence, tile;
    Adam and row-wise Adagrad), and the same touched / nonfinite counts."""
    from pallas_kernels import dispatch
    from pallas_kernels.sparse_update import SegmentGrads
    from recis_jax.optim import rowwise_adagrad

    monkeypatch.setenv(dispatch.ENV_VAR, impl)
    eng = EmbeddingEngine({**OPTIONS, "c": EmbeddingOption(8, combiner="sum")}, merge=False)
    feats = jax.device_put({**batch(5), "c": random_ragged(6, VOCAB, 40, 256)})
    for opt in (sparse_adam(0.05), rowwise_adagrad(0.1)):
        state = eng.init(opt)
        state, lk = jax.jit(eng.lookup)(state, feats)
        g_out = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape))
                             if x.dtype == jnp.float32 else np.zeros(x.shape, jax.dtypes.float0),
                             eng.pool(lk.rows, lk, feats))

        def run(state, lk, segments):
            _, vjp = eng.pool_vjp(state, lk, feats, segments=segments)
            (g,) = vjp(g_out)
            kinds = {p: isinstance(x, SegmentGrads) for p, x in g.items()}
            state, stats = eng.apply_gradients(state, lk, g, opt)
            return state, stats, kinds

        fused, fused_stats, kinds = jax.jit(run, static_argnums=2)(state, lk, True)
        plain, plain_stats, plain_kinds = jax.jit(run, static_argnums=2)(state, lk, False)
        assert sum(kinds.values()) == 2 and not any(plain_kinds.values())  # "b" (mean) and "c" (sum)
        assert jax.tree.map(int, fused_stats) == jax.tree.map(int, plain_stats)
        for p in fused:
            a, b = fused[p].table, plain[p].table
            jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7),
                         (a.embedding, a.slots), (b.embedding, b.slots))
        assert not np.array_equal(np.asarray(fused["c"].table.embedding), np.asarray(state["c"].table.embedding))


@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_pool_in_bfloat16_is_the_float32_pool_rounded(monkeypatch, impl):
    """pool / pool_vjp with dtype=bfloat16 (what a bfloat16 DCNv2 reads) == the float32
    pool cast to bfloat16, bit for bit, and its row gradients == the float32 path's for
    the bfloat16 cotangent: two sum features of one table (pooled in bfloat16 by the
    kernel, sample-major), a mean table (divided in float32, then rounded), a sequence."""
    from pallas_kernels import dispatch

    monkeypatch.setenv(dispatch.ENV_VAR, impl)
    eng = EmbeddingEngine({"c": EmbeddingOption(8, combiner="sum"), "d": EmbeddingOption(8, combiner="sum"),
                           "b": EmbeddingOption(4, combiner="mean"),
                           "s": EmbeddingOption(6, combiner="none", length=3)})
    assert len(eng.physical) == 3
    b = batch(3)  # seeds RNG
    feats = jax.device_put({"c": b["a"], "d": b["t"], "b": b["b"], "s": random_ragged(6, VOCAB, 5, 32)})
    state = eng.init(sparse_sgd(0.1))
    state, lk = jax.jit(eng.lookup)(state, feats)
    bf16 = jnp.bfloat16

    def cot(x, dtype):
        return (jnp.sin(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape).astype(bf16).astype(dtype)
                if jnp.issubdtype(x.dtype, jnp.floating) else np.zeros(x.shape, jax.dtypes.float0))

    @jax.jit
    def both(state, lk):
        want, vjp32 = eng.pool_vjp(state, lk, feats)
        got, vjp16 = eng.pool_vjp(state, lk, feats, bf16)
        return (want, vjp32(jax.tree.map(lambda x: cot(x, jnp.float32), want)),
                got, vjp16(jax.tree.map(lambda x: cot(x, bf16), got)), eng.pool(lk.rows, lk, feats, bf16))

    want, g_want, got, g_got, plain = both(state, lk)
    for f in ("c", "d", "b"):
        assert got[f].dtype == bf16 and plain[f].dtype == bf16
        np.testing.assert_array_equal(np.asarray(got[f]), np.asarray(want[f].astype(bf16)))
        np.testing.assert_array_equal(np.asarray(plain[f]), np.asarray(got[f]))
    np.testing.assert_array_equal(np.asarray(got["s"][0]), np.asarray(want["s"][0].astype(bf16)))
    valid = {p: lk.tables[p].unique.valid[:, None] for p in lk.tables}
    for p in g_want[0]:
        assert g_got[0][p].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(jnp.where(valid[p], g_got[0][p], 0)),
                                      np.asarray(jnp.where(valid[p], g_want[0][p], 0)))
    assert float(jnp.abs(got["c"].astype(jnp.float32)).sum()) > 0


def test_sparse_adamw_example_through_the_engine():
    """The issue's two-step SparseAdamW example, with rows set through `insert`."""
    opt = sparse_adamw(0.01, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    eng = EmbeddingEngine({"f": EmbeddingOption(2, combiner="sum", num_rows=8)})
    state = eng.init(opt)
    (pname,) = eng.physical
    cfg = eng.physical[pname]
    tbl, _ = ht.insert(cfg, state[pname].table, jnp.zeros(2, jnp.int32), jnp.array([10, 20], jnp.int64),
                       jnp.ones(2, bool), embedding=jnp.array([[0.5, -0.25], [1.0, 2.0]], jnp.float32))
    state = {pname: state[pname]._replace(table=tbl)}

    @jax.jit
    def step(state, feats, gbag):
        state, lk = eng.lookup(state, feats)
        g = jax.grad(lambda rows: jnp.sum(eng.pool(rows, lk, feats)["f"] * gbag))(lk.rows)
        return eng.apply_gradients(state, lk, g, opt)[0]

    f1 = Ragged.from_lists([[10], [20]], capacity=4)
    state = step(state, {"f": f1}, jnp.array([[0.1, -0.2], [0.0, 0.4]], jnp.float32))
    f2 = Ragged.from_lists([[10], []], capacity=4)
    state = step(state, {"f": f2}, jnp.array([[0.3, 0.05], [9.0, 9.0]], jnp.float32))
    rows = rows_by_id(eng, state)
    np.testing.assert_allclose(rows[("f", 10)], [0.48072323461, -0.23525634380], atol=1e-6)
    np.testing.assert_allclose(rows[("f", 20)], [0.9999, 1.98980000791], atol=1e-6)
    assert int(state[pname].table.step) == 2


def test_new_rows_start_at_their_deterministic_initial_value():
    init = Initializer("normal", std=0.1)
    eng = EmbeddingEngine({"f": EmbeddingOption(3, initializer=init, num_rows=16)}, seed=42)
    state = eng.init(None)
    f = Ragged.from_lists([[7, -1], [2**62]], capacity=4)
    state, lk = jax.jit(eng.lookup)(state, {"f": f})
    (pname,) = eng.physical
    n = int(lk.tables[pname].unique.num_unique)
    keys = lk.tables[pname].unique.keys[:n]
    # jit both sides: eager and compiled may differ by an ulp (FMA fusion).
    expect = jax.jit(initial_rows, static_argnums=(0, 3, 4))(init, jnp.full(n, stream_id("f"), jnp.int32), keys, 3, 42)
    np.testing.assert_array_equal(lk.rows[pname][:n], expect)


def test_eval_mode_finds_only():
    opt = sparse_sgd(0.1)
    eng = EmbeddingEngine({"f": EmbeddingOption(2, num_rows=8)})
    state = eng.init(opt)
    state, _ = jax.jit(eng.lookup)(state, {"f": Ragged.from_lists([[1, 2]], capacity=4)})
    before = jax.tree_util.tree_map(np.asarray, state)
    after, lk = jax.jit(eng.lookup, static_argnames="train")(state, {"f": Ragged.from_lists([[1, 3]], capacity=4)},
                                                             train=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.asarray, after))
    (pname,) = eng.physical
    tl = lk.tables[pname]
    assert int(tl.missing) == 1 and np.asarray(tl.live)[:2].tolist() == [True, False]
    assert not np.any(np.asarray(lk.rows[pname][1]))  # the missing ID reads zeros


def test_nonfinite_gradients_are_reported_not_written():
    opt = sparse_adam(0.1)
    eng = EmbeddingEngine({"f": EmbeddingOption(2, num_rows=8)})
    state = eng.init(opt)
    f = {"f": Ragged.from_lists([[1], [2]], capacity=4)}

    @jax.jit
    def step(state):
        state, lk = eng.lookup(state, f)
        g = jax.grad(lambda rows: jnp.sum(eng.pool(rows, lk, f)["f"] * jnp.array([[jnp.nan, 1.0], [1.0, 1.0]])))(
            lk.rows)
        return eng.apply_gradients(state, lk, g, opt), lk

    (state2, stats), lk = step(state)
    (pname,) = eng.physical
    assert int(stats[pname]["nonfinite"]) == 1 and int(stats[pname]["touched"]) == 2
    ex = ht.export(state2[pname].table)
    assert np.all(np.isfinite(ex["embedding"]))
    np.testing.assert_array_equal(ex["embedding"][0], lk.rows[pname][0])  # id 1 untouched


def test_train_step_is_bitwise_deterministic_and_has_no_f64():
    opt = sparse_adamw(0.05, weight_decay=0.01)
    eng = EmbeddingEngine(OPTIONS)
    step = make_step(eng, opt)
    runs = []
    for _ in range(2):
        state = eng.init(opt)
        for seed in range(3):
            state, *_ = step(state, jax.device_put(batch(seed)))
        runs.append(jax.tree_util.tree_map(np.asarray, state))
    jax.tree_util.tree_map(np.testing.assert_array_equal, *runs)
    jaxpr = str(jax.make_jaxpr(step.__wrapped__)(eng.init(opt), jax.device_put(batch(0))))
    assert "f64" not in jaxpr


def test_bad_input():
    with pytest.raises(ValueError, match="shares table 'x'"):
        EmbeddingEngine({"x": EmbeddingOption(4), "y": EmbeddingOption(8, shared_name="x")})
    with pytest.raises(ValueError, match="combiner"):
        EmbeddingOption(4, combiner="max")
    with pytest.raises(ValueError, match="dim"):
        EmbeddingOption(0)
    eng = EmbeddingEngine({"f": EmbeddingOption(2)})
    state = eng.init(None)
    with pytest.raises(KeyError, match="'f' missing from the batch"):
        eng.lookup(state, {"g": Ragged.from_lists([[1]])})
    with pytest.raises(TypeError, match="IDs must be integers"):
        eng.lookup(state, {"f": Ragged.from_lists([[1.5]], dtype=np.float32)})


def test_gradient_accumulation_stays_sparse_and_matches_one_big_step():
    """Two micro-steps accumulated then applied == one SGD step on their summed grads."""
    from recis_jax.embedding.engine import accumulate

    opt = sparse_sgd(0.5)
    eng = EmbeddingEngine({"f": EmbeddingOption(3, num_rows=32)})
    f1 = {"f": Ragged.from_lists([[1, 2], [3]], capacity=4)}
    f2 = {"f": Ragged.from_lists([[2], [4, 1]], capacity=4)}

    def grads(state, feats):
        state, lk = eng.lookup(state, feats)
        g = jax.grad(lambda rows: jnp.sum(jnp.sin(eng.pool(rows, lk, feats)["f"])))(lk.rows)
        return state, eng.sparse_grads(lk, g), lk

    state = eng.init(opt)
    state, g1, lk1 = jax.jit(grads)(state, f1)
    state, g2, lk2 = jax.jit(grads)(state, f2)
    acc = jax.jit(accumulate)(g1, g2)
    (pname,) = eng.physical
    assert acc[pname].rows.shape == (8,) and int(acc[pname].mask.sum()) == 4  # ids 1..4
    before = ht.export(state[pname].table)
    state, stats = jax.jit(eng.apply_sparse, static_argnums=2)(state, acc, opt)
    after = ht.export(state[pname].table)
    assert int(stats[pname]["touched"]) == 4 and int(state[pname].table.step) == 1
    # Expected: each id's rows minus lr * (sum of its grads over both micro-steps).
    per_id = {}
    for g, lk in ((g1, lk1), (g2, lk2)):
        u = lk.tables[pname].unique
        for i in range(int(u.num_unique)):
            per_id[int(u.keys[i])] = per_id.get(int(u.keys[i]), 0) + np.asarray(g[pname].grads[i])
    for i, key in enumerate(before["ids"]):
        np.testing.assert_allclose(after["embedding"][i], before["embedding"][i] - 0.5 * per_id[int(key)],
                                   rtol=1e-6, atol=1e-7)


def test_bfloat16_storage_trains_with_float32_math():
    opt = sparse_adam(0.01)
    eng = EmbeddingEngine({"f": EmbeddingOption(4, dtype="bfloat16", num_rows=16)})
    state = eng.init(opt)
    (pname,) = eng.physical
    assert state[pname].table.embedding.dtype == jnp.bfloat16
    assert state[pname].table.slots["m"].dtype == jnp.float32
    step = make_step(eng, opt)
    state, l1, *_ = step(state, {"f": Ragged.from_lists([[1, 2], [3]], capacity=4)})
    state, l2, *_ = step(state, {"f": Ragged.from_lists([[1, 2], [3]], capacity=4)})
    assert state[pname].table.embedding.dtype == jnp.bfloat16 and np.isfinite(float(l2))


def test_combined_dense_and_sparse_update():
    import optax

    from recis_jax.optim.combined import apply_gradients

    sched = optax.linear_schedule(0.1, 0.0, 10)
    sparse_opt, dense_tx = sparse_sgd(sched), optax.sgd(sched)
    eng = EmbeddingEngine({"f": EmbeddingOption(2, num_rows=8)})
    tables = eng.init(sparse_opt)
    params = {"w": jnp.ones((2,), jnp.float32)}
    opt_state = dense_tx.init(params)
    feats = {"f": Ragged.from_lists([[1], [2]], capacity=4)}

    @jax.jit
    def step(params, opt_state, tables, gstep):
        tables, lk = eng.lookup(tables, feats)

        def loss(p, rows):
            return jnp.sum(eng.pool(rows, lk, feats)["f"] * p["w"])

        gp, gr = jax.grad(loss, argnums=(0, 1))(params, lk.rows)
        return apply_gradients(eng, sparse_opt, dense_tx, params, opt_state, gp, tables, lk, gr, gstep)

    p0 = params
    # optax schedules count the dense optimizer's own updates, which equal the global
    # step when training starts at 0 (an overflowed, skipped step advances neither).
    params, opt_state, tables2, stats = step(params, opt_state, tables, jnp.int32(0))
    (pname,) = eng.physical
    _, lk = jax.jit(eng.lookup)(tables, feats)
    # lr at step 0 is 0.1 for both sides: dense grad = sum of pooled rows.
    np.testing.assert_allclose(params["w"], p0["w"] - 0.1 * np.asarray(lk.rows[pname][:2]).sum(0), rtol=1e-6)
    ex = ht.export(tables2[pname].table)
    np.testing.assert_allclose(ex["embedding"], np.asarray(lk.rows[pname][:2]) - 0.1 * np.asarray(p0["w"]),
                               rtol=1e-6)
    assert not bool(stats["skipped"])
    params, opt_state, tables3, _ = step(params, opt_state, tables2, jnp.int32(1))
    ex3 = ht.export(tables3[pname].table)  # lr 0.09 at step 1 on the sparse side
    np.testing.assert_allclose(ex3["embedding"], ex["embedding"] - 0.09 * np.asarray(p0["w"] - 0.1 * np.asarray(
        lk.rows[pname][:2]).sum(0)), rtol=1e-5)


def test_read_only_admission_trains_existing_rows_only():
    from recis_jax.embedding.engine import Admission

    opt = sparse_sgd(1.0)
    eng = EmbeddingEngine({"f": EmbeddingOption(2, num_rows=8, admission=Admission.read_only())})
    state = eng.init(opt)
    (pname,) = eng.physical
    tbl, _ = ht.insert(eng.physical[pname], state[pname].table, jnp.zeros(1, jnp.int32), jnp.array([5], jnp.int64),
                       jnp.ones(1, bool), embedding=jnp.array([[1.0, 2.0]], jnp.float32))
    state = {pname: state[pname]._replace(table=tbl)}
    step = make_step(eng, opt)
    state, _, out, _ = step(state, {"f": Ragged.from_lists([[5, 6], [6]], capacity=4)})
    ex = ht.export(state[pname].table)
    assert ex["ids"].tolist() == [5]  # 6 never admitted
    assert not np.allclose(ex["embedding"][0], [1.0, 2.0])  # 5 trained
    np.testing.assert_array_equal(np.asarray(out["f"][1]), 0.0)  # 6 reads zeros


def test_engine_eviction_policy_on_the_global_step_clock():
    from recis_jax.embedding.eviction import EvictionPolicy

    opt = sparse_sgd(0.1)
    eng = EmbeddingEngine({"f": EmbeddingOption(2, num_rows=16, eviction=EvictionPolicy(max_age=2, every=1))})
    state = eng.init(opt)
    (pname,) = eng.physical

    @jax.jit
    def step(state, feats, gstep):
        state, lk = eng.lookup(state, feats, step=gstep)
        g = jax.grad(lambda rows: jnp.sum(eng.pool(rows, lk, feats)["f"]))(lk.rows)
        return eng.apply_gradients(state, lk, g, opt)[0]

    seen = {0: [[1, 2]], 1: [[2]], 2: [[2]], 3: [[2, 3]]}
    for t in range(4):
        state = step(state, {"f": Ragged.from_lists(seen[t], capacity=4)}, jnp.int32(t))
        state, n = eng.evict(state, t, global_step=t)
    # id 1 was last seen at step 0: at step 3 its age 3 > 2, so it is gone; 2 and 3 stay.
    assert ht.export(state[pname].table)["ids"].tolist() == [2, 3]
    assert int(n[pname]) == 1


def test_sorted_segment_sum_is_an_in_order_sum():
    """dedup.sorted_segment_sum: per segment the left-to-right sum (bitwise, on the CPU's
    scatter-add path), ids >= num_segments dropped, 16-bit data summed in float32."""
    from recis_jax.embedding.dedup import sorted_segment_sum

    rng = np.random.default_rng(0)
    n, s = 3000, 40
    seg = np.sort(rng.integers(0, s + 3, n)).astype(np.int32)        # ids s..s+2: dropped
    x = (rng.standard_normal((n, 3)) * np.exp(3 * rng.standard_normal((n, 1)))).astype(np.float32)
    want = np.zeros((s, 3), np.float32)
    for i in range(n):
        if seg[i] < s:
            want[seg[i]] += x[i]
    got = np.asarray(jax.jit(sorted_segment_sum, static_argnums=2)(jnp.asarray(x), jnp.asarray(seg), s))
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    hot = sorted_segment_sum(jnp.full((4096, 2), 0.01, jnp.bfloat16), jnp.zeros(4096, jnp.int32), 1)
    assert hot.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(hot, np.float32), 40.96, rtol=1e-2)
    assert sorted_segment_sum(jnp.zeros((0, 2)), jnp.zeros(0, jnp.int32), 3).shape == (3, 2)
