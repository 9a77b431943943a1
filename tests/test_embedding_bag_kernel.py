"""embedding_bag / segment_gather_sum: reference and Pallas kernel vs NumPy.

One class runs the reference and the kernel in interpret mode on CPU, and the compiled
kernel ("pallas") when the default backend is a GPU
(`JAX_PLATFORMS=cuda python3 -m pytest -q tests/test_embedding_bag_kernel.py`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels import embedding_bag as eb

ON_GPU = jax.default_backend() == "gpu"
IMPLS = ["reference", "interpret"] + (["pallas"] if ON_GPU else [])
# Small pieces and blocks so that short inputs exercise long-segment splitting (bags
# > 32 items), several programs and partial blocks without slow interpretation.
SMALL = eb.Config(rows=8, lanes=2, piece=32, num_warps=4, combine_rows=4)
RTOL, ATOL = 1e-5, 1e-5


def np_segment_gather_sum(src, splits, idx=None, w=None, mean=False):
    src = np.asarray(src, np.float64)
    s = len(splits) - 1
    out = np.zeros((s, src.shape[1]))
    for k in range(s):
        tot, wsum = np.zeros(src.shape[1]), 0.0
        for i in range(splits[k], splits[k + 1]):
            r = i if idx is None else idx[i]
            if r < 0:
                continue
            wi = 1.0 if w is None else float(w[i])
            tot += wi * src[r]
            wsum += wi
        out[k] = (tot / wsum if wsum != 0 else 0.0) if mean else tot
    return out


def make_bags(rng, lens, extra=0):
    """row_splits for bag lengths `lens` plus `extra` trailing padding items."""
    splits = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    return splits, int(splits[-1]) + extra


# Empty bags, singletons, bags around the piece size (32), long bags (> 4 pieces); 13
# bags: not a multiple of the 2 lanes of a program.
LENS = [3, 0, 40, 1, 0, 130, 7, 32, 33, 0, 64, 5, 2]


def run_sgs(impl, src, splits, idx=None, w=None, mean=False, config=None):
    args = (jnp.asarray(src), jnp.asarray(splits), None if idx is None else jnp.asarray(idx),
            None if w is None else jnp.asarray(w))
    if impl == "reference":
        return eb.segment_gather_sum(*args, mean=mean, impl="reference")
    return eb.segment_gather_sum_pallas(*args, mean=mean, interpret=impl == "interpret",
                                        config=config or SMALL)


@pytest.mark.parametrize("impl", IMPLS)
class TestSegmentGatherSum:

    @pytest.mark.parametrize("weighted,mean", [(False, False), (True, False), (True, True), (False, True)])
    def test_random_gather(self, impl, weighted, mean):
        rng = np.random.default_rng(int(weighted) * 2 + int(mean))
        splits, c = make_bags(rng, LENS, extra=5)
        r, d = 20, 16                                     # 20 rows: many duplicates
        src = rng.standard_normal((r, d)).astype(np.float32)
        idx = rng.integers(-1, r, c).astype(np.int32)     # -1: skipped item
        idx[splits[2]:splits[3]] = 7                      # one row repeated through a long bag
        w = rng.standard_normal(c).astype(np.float32) if weighted else None
        if weighted and mean:
            w[splits[0]:splits[1]] = [1.0, -1.0, 0.0]     # zero weight sum -> 0
        got = run_sgs(impl, src, splits, idx, w, mean)
        assert got.shape == (len(LENS), d) and got.dtype == jnp.float32
        want = np_segment_gather_sum(src, splits, idx, w, mean)
        np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)

    def test_one_item_per_step(self, impl):
        # K = 1 (default_config's choice for one-item bags and the backward's unique
        # rows): [G, 1, D] tiles; pieces of 4 items, so long bags still combine slots.
        rng = np.random.default_rng(11)
        splits, c = make_bags(rng, LENS, extra=3)
        src = rng.standard_normal((20, 16)).astype(np.float32)
        idx = rng.integers(-1, 20, c).astype(np.int32)
        w = rng.standard_normal(c).astype(np.float32)
        cfg = eb.Config(rows=1, lanes=4, piece=4, num_warps=4, combine_rows=4)
        assert eb.default_config(16, 1.0).rows == 1
        got = run_sgs(impl, src, splits, idx, w, config=cfg)
        np.testing.assert_allclose(np.asarray(got), np_segment_gather_sum(src, splits, idx, w),
                                   rtol=RTOL, atol=ATOL)

    @pytest.mark.parametrize("d", [16, 9])
    def test_out_rows_fill_one_array(self, impl, d):
        # Two calls write their segments (long ones included) to scattered rows of one
        # [M, d] array, the second in place into the first's output; skip_empty leaves
        # the empty segments' rows as they were (NaN here), others keep out's values.
        rng = np.random.default_rng(5)
        splits, c = make_bags(rng, LENS, extra=2)
        src = rng.standard_normal((20, d)).astype(np.float32)
        idx = rng.integers(-1, 20, c).astype(np.int32)
        s, m = len(LENS), 2 * len(LENS) + 3
        perm = rng.permutation(m).astype(np.int32)
        rows_a, rows_b = perm[:s], perm[s:2 * s]
        kw = {} if impl == "reference" else dict(config=SMALL, interpret=impl == "interpret")
        sgs = (lambda *a, **k: eb.segment_gather_sum(*a, impl="reference", **k)) if impl == "reference" \
            else (lambda *a, **k: eb.segment_gather_sum_pallas(*a, **kw, **k))
        base = jnp.full((m, d), np.nan, jnp.float32)
        a = sgs(jnp.asarray(src), jnp.asarray(splits), jnp.asarray(idx), out_rows=jnp.asarray(rows_a), out=base,
                skip_empty=True)
        b = sgs(jnp.asarray(2 * src), jnp.asarray(splits), jnp.asarray(idx), out_rows=jnp.asarray(rows_b), out=a)
        want = np.full((m, d), np.nan)
        ref = np_segment_gather_sum(src, splits, idx)
        nonempty = np.diff(splits) > 0
        want[rows_a[nonempty]] = ref[nonempty]
        want[rows_b] = 2 * ref
        assert b.shape == (m, d)
        np.testing.assert_allclose(np.asarray(b), want, rtol=RTOL, atol=ATOL)  # NaN where NaN
        # num_out: a fresh array; only the written rows are specified.
        fresh = sgs(jnp.asarray(src), jnp.asarray(splits), jnp.asarray(idx), out_rows=jnp.asarray(rows_a),
                    num_out=m)
        assert fresh.shape == (m, d)
        np.testing.assert_allclose(np.asarray(fresh)[rows_a], ref, rtol=RTOL, atol=ATOL)

    def test_output_dtype(self, impl):
        # float32 sums rounded once to a bfloat16 output, long segments included; and
        # bfloat16 rows summed into a float32 output (the backward of bfloat16 pooling).
        rng = np.random.default_rng(8)
        splits, c = make_bags(rng, LENS, extra=2)
        src = rng.standard_normal((20, 16)).astype(np.float32)
        idx = rng.integers(-1, 20, c).astype(np.int32)
        kw = dict(impl="reference") if impl == "reference" else dict(impl=impl)
        args = (jnp.asarray(splits), jnp.asarray(idx))
        if impl != "reference":
            sgs = lambda s_, dtype: eb.segment_gather_sum_pallas(s_, *args, dtype=dtype, config=SMALL,  # noqa: E731
                                                                 interpret=impl == "interpret")
        else:
            sgs = lambda s_, dtype: eb.segment_gather_sum(s_, *args, dtype=dtype, **kw)  # noqa: E731
        got = sgs(jnp.asarray(src), jnp.bfloat16)
        assert got.dtype == jnp.bfloat16
        want = np_segment_gather_sum(src, splits, idx)
        np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=1e-2, atol=1e-2)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(sgs(jnp.asarray(src), None).astype(jnp.bfloat16)))
        src16 = jnp.asarray(src, jnp.bfloat16)
        got32 = sgs(src16, jnp.float32)
        assert got32.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got32), np_segment_gather_sum(np.asarray(src16.astype(jnp.float32)),
                                                                           splits, idx), rtol=RTOL, atol=ATOL)

    @pytest.mark.parametrize("d", [3, 9, 24])
    def test_width_not_a_power_of_2(self, impl, d):
        # DeepFM's fused rows are 8 + 1 wide: tiles of the next power of 2, columns >= d
        # masked on load and store (long bags: the partial rows and combine kernel too).
        rng = np.random.default_rng(d)
        splits, c = make_bags(rng, LENS, extra=2)
        src = rng.standard_normal((20, d)).astype(np.float32)
        idx = rng.integers(-1, 20, c).astype(np.int32)
        w = rng.standard_normal(c).astype(np.float32)
        for mean in (False, True):
            got = run_sgs(impl, src, splits, idx, w, mean)
            assert got.shape == (len(LENS), d)
            np.testing.assert_allclose(np.asarray(got), np_segment_gather_sum(src, splits, idx, w, mean),
                                       rtol=RTOL, atol=ATOL)

    def test_contiguous_rows(self, impl):
        # idx None: pooling already gathered occurrence rows (the engine's `pool`).
        rng = np.random.default_rng(5)
        splits, c = make_bags(rng, LENS, extra=3)
        occ = rng.standard_normal((c, 4)).astype(np.float32)
        w = rng.random(c).astype(np.float32)
        got = run_sgs(impl, occ, splits, None, w)
        np.testing.assert_allclose(np.asarray(got), np_segment_gather_sum(occ, splits, None, w),
                                   rtol=RTOL, atol=ATOL)

    def test_splits_offset_and_boundary_values(self, impl):
        # Items before splits[0] and after splits[-1] are ignored; huge and tiny values.
        rng = np.random.default_rng(6)
        splits = np.array([4, 4, 10, 50, 51], np.int32)
        src = np.array([[1e30, -1e30], [1e-30, 3.0], [-0.0, 0.0], [7.0, 1.0]], np.float32)
        idx = rng.integers(0, 4, 60).astype(np.int32)
        idx[:4] = 0
        idx[51:] = 0
        idx[10:50] = np.where(np.arange(40) % 2, 1, 3)
        got = run_sgs(impl, src, splits, idx)
        np.testing.assert_allclose(np.asarray(got), np_segment_gather_sum(src, splits, idx),
                                   rtol=RTOL, atol=0)

    def test_empty_inputs(self, impl):
        src = np.ones((5, 4), np.float32)
        assert run_sgs(impl, src, np.zeros(1, np.int32), np.zeros(3, np.int32)).shape == (0, 4)
        out = run_sgs(impl, src, np.zeros(4, np.int32), np.zeros(0, np.int32), mean=True)
        np.testing.assert_array_equal(np.asarray(out), np.zeros((3, 4)))
        out = run_sgs(impl, src, np.array([0, 0, 0], np.int32), np.array([1, 2], np.int32))
        np.testing.assert_array_equal(np.asarray(out), np.zeros((2, 4)))

    def test_bfloat16_rows(self, impl):
        rng = np.random.default_rng(8)
        splits, c = make_bags(rng, [5, 0, 40])
        src = jnp.asarray(rng.standard_normal((9, 8)), jnp.bfloat16)
        idx = rng.integers(0, 9, c).astype(np.int32)
        got = run_sgs(impl, src, splits, idx)
        assert got.dtype == jnp.bfloat16
        want = np_segment_gather_sum(np.asarray(src.astype(jnp.float32)), splits, idx)
        np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=1e-2, atol=1e-2)

    def test_default_config_long_bag(self, impl):
        # The dispatcher's config (pieces of 512): one 3000-item bag among short ones.
        rng = np.random.default_rng(9)
        lens = list(rng.integers(0, 40, 50))
        lens[17] = 3000
        splits, c = make_bags(rng, lens)
        src = rng.standard_normal((300, 16)).astype(np.float32)
        idx = rng.integers(0, 300, c).astype(np.int32)
        cfg = eb.default_config(16)
        assert cfg.piece < 3000
        got = run_sgs(impl, src, splits, idx, config=cfg)
        np.testing.assert_allclose(np.asarray(got), np_segment_gather_sum(src, splits, idx),
                                   rtol=1e-4, atol=1e-4)

    @pytest.mark.parametrize("combiner", ["sum", "mean", "tile"])
    def test_embedding_bag_forward_and_grads(self, impl, combiner):
        rng = np.random.default_rng({"sum": 1, "mean": 2, "tile": 3}[combiner])
        splits, c = make_bags(rng, [3, 0, 40, 1, 6, 2, 0], extra=2)
        u, d = 11, 8
        rows = jnp.asarray(rng.standard_normal((u, d)), jnp.float32)
        idx = rng.integers(0, u, c).astype(np.int32)
        w = jnp.asarray(rng.random(c) + 0.5, jnp.float32)
        length = 4

        def f(which, rows, w):
            if which == "reference":
                return eb.embedding_bag(rows, idx, splits, w, combiner, length, impl="reference")
            return eb._bag(rows, jnp.asarray(idx), jnp.asarray(splits), w, combiner, length,
                           which == "interpret")

        got = f(impl, rows, w)
        want = eb.embedding_bag_reference(rows, idx, splits, w, combiner, length)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=ATOL)
        if combiner != "tile":
            np.testing.assert_allclose(
                np.asarray(got), np_segment_gather_sum(rows, splits, idx, w, combiner == "mean"),
                rtol=RTOL, atol=ATOL)
        if impl == "reference":
            return  # the gradients below compare against the reference's autodiff
        cot = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
        g_got = jax.jit(jax.grad(lambda r, w: jnp.sum(f(impl, r, w) * cot), argnums=(0, 1)))(rows, w)
        g_ref = jax.jit(jax.grad(lambda r, w: jnp.sum(f("reference", r, w) * cot), argnums=(0, 1)))(rows, w)
        for a, b in zip(g_got, g_ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_sort_helpers():
    rng = np.random.default_rng(11)
    idx = rng.integers(-1, 6, 40).astype(np.int32)
    order, splits = eb.sort_by_row(jnp.asarray(idx), 6)
    order, splits = np.asarray(order), np.asarray(splits)
    for u in range(6):
        lanes = order[splits[u]:splits[u + 1]]
        np.testing.assert_array_equal(lanes, np.flatnonzero(idx == u))  # stable
    assert splits[-1] == np.sum(idx >= 0)
    # From a dedup-style sorted_segment: segments 0..3 live, padding = N.
    seg = np.array([0, 0, 1, 2, 2, 2, 3, 9, 9], np.int32)
    np.testing.assert_array_equal(np.asarray(eb.splits_from_sorted_segment(jnp.asarray(seg), 9)),
                                  [0, 2, 3, 6, 7, 7, 7, 7, 7, 7])


@pytest.mark.parametrize("c", [0, 1, 7, 300])
def test_search_free_helpers_match_searchsorted(c):
    """segment_of_positions / count_below are searchsorted without the search: splits
    with repeats (empty segments), before 0, at and past c; keys of any order, out of range."""
    rng = np.random.default_rng(c)
    splits = np.sort(np.concatenate([rng.integers(-3, c + 5, 40), [0, 0, c, c]])).astype(np.int32)
    want = np.searchsorted(splits, np.arange(c), side="right") - 1
    np.testing.assert_array_equal(np.asarray(eb.segment_of_positions(jnp.asarray(splits), c)), want)
    keys = rng.integers(-2, 12, c).astype(np.int32)
    for n in (0, 5, 10, 14):
        want = np.searchsorted(np.sort(keys), np.arange(n + 1), side="left")
        np.testing.assert_array_equal(np.asarray(eb.count_below(jnp.asarray(keys), n)), want)


def test_engine_pooling_kernel_path_matches_xla(monkeypatch):
    """recis_jax.embedding.pooling with the kernel (interpret) vs its XLA path: forward and
    gradients of expand + pool (sum, mean), incl. the expand backward's segment sum."""
    from recis_jax.embedding import dedup, pooling

    rng = np.random.default_rng(12)
    splits, c = make_bags(rng, [3, 0, 9, 1, 5], extra=2)
    keys = rng.integers(0, 7, c).astype(np.int64)
    valid = np.arange(c) < splits[-1]
    u = dedup.unique_keys(jnp.zeros(c, jnp.int32), jnp.asarray(keys), jnp.asarray(valid))
    rowids = np.searchsorted(splits[1:], np.arange(c), side="right").astype(np.int32)
    rows = jnp.asarray(rng.standard_normal((c, 4)), jnp.float32)
    w = jnp.asarray(rng.random(c), jnp.float32)

    def loss(rows, combiner):
        occ = pooling.expand(rows, u.inverse, u.order, u.sorted_segment)
        out = pooling.pool(occ, jnp.asarray(splits), jnp.asarray(rowids), w, combiner)
        return jnp.sum(out * jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))

    for combiner in ("sum", "mean"):
        # A fresh jit per setting: dispatch reads the variable at trace time.
        monkeypatch.setenv(dispatch.ENV_VAR, "reference")
        want = jax.jit(jax.value_and_grad(lambda r: loss(r, combiner)))(rows)
        monkeypatch.setenv(dispatch.ENV_VAR, "interpret")
        got = jax.jit(jax.value_and_grad(lambda r: loss(r, combiner)))(rows)
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "interpret", "pallas"])
@pytest.mark.parametrize("same_b", [False, True])
def test_pool_unique_matches_expand_then_pool(monkeypatch, impl, same_b):
    """pool_unique (bags straight from unique rows) == pool(expand(...)) per feature:
    pooled sums and the gradients w.r.t. the unique rows and the weights, for three
    features sharing one lookup (duplicates across them, empty bags, padding lanes,
    invalid lanes, with and without weights). The kernel pools features 0 and 2 (long
    bags) in one call and feature 1 (short bags) in another; with the same number of
    bags per feature both calls fill one sample-major array."""
    from recis_jax.embedding import dedup, pooling

    if impl == "pallas" and not ON_GPU:
        pytest.skip("compiled kernel: GPU only")
    monkeypatch.setenv(dispatch.ENV_VAR, impl)
    rng = np.random.default_rng(5)
    feats = [make_bags(rng, [33, 0, 17, 40] if same_b else LENS, extra=3), make_bags(rng, [2, 0, 5, 1], extra=1),
             make_bags(rng, [30, 0, 17, 40], extra=0)]
    if impl != "reference":
        starts = np.cumsum([0] + [c for _, c in feats])
        offsets = np.cumsum([0] + [len(sp) - 1 for sp, _ in feats])
        groups = pooling._config_groups(8, tuple(starts), tuple(offsets), impl)
        assert [g for _, g in groups] == [(0, 2), (1,)]
    caps = [c for _, c in feats]
    n = sum(caps)
    keys = rng.integers(0, 9, n).astype(np.int64)
    valid = np.concatenate([np.arange(c) < sp[-1] for sp, c in feats])
    u = dedup.unique_keys(jnp.zeros(n, jnp.int32), jnp.asarray(keys), jnp.asarray(valid))
    rid = [jnp.asarray(np.searchsorted(sp[1:], np.arange(c), side="right").astype(np.int32)) for sp, c in feats]
    rows = jnp.asarray(rng.standard_normal((n, 8)), jnp.float32)
    w0 = jnp.asarray(rng.random(caps[0]), jnp.float32)
    w2 = jnp.asarray(rng.random(caps[2]), jnp.float32)
    splits = [jnp.asarray(sp) for sp, _ in feats]

    def scale(out):
        return jnp.sum(out * jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape))

    def fused(rows, w0, w2):
        outs = pooling.pool_unique(rows, u.inverse, u.order, u.splits,
                                   list(zip(splits, rid, [w0, None, w2])))
        return sum(scale(o) for o in outs), outs

    def unfused(rows, w0, w2):
        occ = jax.lax.split(pooling.expand(rows, u.inverse, u.order, u.sorted_segment), caps)
        outs = [pooling.pool(o, sp, r, w, "sum") for o, sp, r, w in zip(occ, splits, rid, [w0, None, w2])]
        return sum(scale(o) for o in outs), outs

    got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2), has_aux=True))(rows, w0, w2)
    want = jax.jit(jax.value_and_grad(unfused, argnums=(0, 1, 2), has_aux=True))(rows, w0, w2)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert all(float(jnp.abs(o).sum()) > 0 for o in got[0][1])


def test_dispatch_defaults_to_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    if ON_GPU:
        pytest.skip("CPU-only check")
    assert dispatch.resolve(None) == "reference"
    with pytest.raises(ValueError, match="needs a GPU"):
        eb.segment_gather_sum(jnp.ones((2, 4)), jnp.array([0, 1]), jnp.array([0]), impl="pallas")


def test_default_config_shapes():
    for d in (1, 3, 4, 9, 16, 24, 64, 128, 256, 1024):
        cfg = eb.default_config(d)
        assert all(eb._is_pow2(v) for v in (cfg.rows, cfg.lanes, cfg.combine_rows))
        assert cfg.piece % cfg.rows == 0


@pytest.mark.skipif(not ON_GPU, reason="compiled kernel on a > 2**31-element source: GPU only")
def test_compiled_gather_past_int32_element_offsets():
    """Rows of a > 2**31-element source (17M x 128) past row 16,777,216 are gathered
    right (the same calls passed as a script on an H200, 2026-11-28)."""
    r, d = 17_000_000, 128
    src = jnp.arange(r, dtype=jnp.float32)[:, None] + jnp.zeros((1, d), jnp.float32)
    splits = jnp.asarray([0, 2, 4], jnp.int32)
    idx = jnp.asarray([16_999_999, 16_777_300, 3, 10_000_000], jnp.int32)
    got = eb.segment_gather_sum(src, splits, idx, impl="pallas")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(eb.segment_gather_sum(src, splits, idx,
                                                                                   impl="reference")))
