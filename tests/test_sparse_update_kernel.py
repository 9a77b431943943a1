"""Fused sparse optimizer update: the Pallas kernel (interpret on CPU, compiled on GPU) vs
the XLA reference (recis_jax.optim.sparse's formulation) for every sparse optimizer.

GPU: `JAX_PLATFORMS=cuda python3 -m pytest -q tests/test_sparse_update_kernel.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recis_jax  # noqa: F401  (x64 on)
from pallas_kernels import dispatch
from pallas_kernels import sparse_update as su
from recis_jax import optim

# The 1e20 gradient row squares to inf in float32 on purpose (eager NumPy ops warn).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

ON_GPU = jax.default_backend() == "gpu"
KERNEL_IMPLS = ["interpret"] + (["pallas"] if ON_GPU else [])
R, DIM, U = 97, 8, 37  # U: not a multiple of the lanes per program

CASES = {
    "adam": dict(lr=0.05, b1=0.8, b2=0.99, eps=1e-6),
    "adamw": dict(lr=0.05, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1),
    "adamw_tf": dict(lr=0.05, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.02),
    "adagrad": dict(lr=0.1, initial_accumulator_value=0.2, eps=1e-8),
    "rowwise_adagrad": dict(lr=0.1, initial_accumulator_value=0.05, eps=1e-8),
    "sgd": dict(lr=0.3),
}


def random_state(rng, opt, dtype=jnp.float32, dim=DIM):
    emb = jnp.asarray(rng.normal(0.0, 1.0, (R, dim)), dtype)
    slots = {k: v + jnp.asarray(np.abs(rng.normal(0.0, 0.1, v.shape)), jnp.float32)
             for k, v in opt.init(R, dim, dtype).items()}
    return emb, slots


def random_step(rng, dim=DIM, num_live=30):
    """Unique live rows; padding lanes that collide with live rows, are negative or out of
    range; a NaN and an inf gradient row; boundary-sized gradients."""
    rows = np.empty(U, np.int32)
    rows[:num_live] = rng.choice(R, num_live, replace=False)
    rows[num_live:] = rng.choice([int(rows[0]), R + 3, -1, 0], U - num_live)
    rows[1], rows[2] = -5, R          # masked-True but out of range: dropped
    grads = rng.normal(0.0, 1.0, (U, dim)).astype(np.float32)
    grads[3, 0] = np.nan
    grads[4, dim - 1] = -np.inf
    grads[5] *= 1e20                  # huge (clipping / v overflow region)
    grads[6] = 0.0
    grads[num_live:] = 1e6            # garbage in padding must not leak
    mask = np.arange(U) < num_live
    perm = rng.permutation(U)
    return rows[perm], grads[perm], mask[perm]


def assert_close(got, want, rtol=2e-6, atol=2e-6):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=rtol, atol=atol), got, want)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
class TestFusedUpdate:

    @pytest.mark.parametrize("name", sorted(CASES))
    def test_matches_reference(self, impl, name):
        rng = np.random.default_rng(len(name))
        opt = optim.make(name, **CASES[name])
        emb, slots = random_state(rng, opt)
        rows, grads, mask = random_step(rng)
        for t in (1, 7):
            want = opt.apply(emb, slots, rows, grads, mask, jnp.int32(t), impl="reference")
            got = opt.apply(emb, slots, rows, grads, mask, jnp.int32(t), impl=impl)
            assert_close(got, want)
            # Rows not touched by a live finite lane are bitwise unchanged.
            live = set(int(r) for r, m, g in zip(rows, mask, grads)
                       if m and 0 <= r < R and np.all(np.isfinite(g)))
            untouched = np.array(sorted(set(range(R)) - live))
            np.testing.assert_array_equal(np.asarray(got[0])[untouched], np.asarray(emb)[untouched])
            emb, slots = got

    @pytest.mark.parametrize("name", ["adamw", "rowwise_adagrad"])
    def test_bfloat16_storage_and_clipping(self, impl, name):
        rng = np.random.default_rng(3)
        opt = optim.make(name, **CASES[name], clip_norm=0.5)
        emb, slots = random_state(rng, opt, jnp.bfloat16)
        rows, grads, mask = random_step(rng)
        want = opt.apply(emb, slots, rows, grads, mask, jnp.int32(2), impl="reference")
        got = opt.apply(emb, slots, rows, grads, mask, jnp.int32(2), impl=impl)
        assert got[0].dtype == jnp.bfloat16
        # bf16 rounding of a value within an ulp of a tie may go either way.
        assert_close(got, want, rtol=1e-2, atol=1e-2)
        assert_close(got[1], want[1])

    def test_donated_under_jit(self, impl):
        rng = np.random.default_rng(4)
        opt = optim.make("adam", **CASES["adam"])
        emb, slots = random_state(rng, opt)
        rows, grads, mask = random_step(rng)
        want = opt.apply(emb, slots, rows, grads, mask, jnp.int32(1), impl="reference")
        step = jax.jit(lambda e, s: opt.apply(e, s, rows, grads, mask, jnp.int32(1), impl=impl),
                       donate_argnums=(0, 1))
        got = step(emb, slots)
        assert_close(got, want)
        assert emb.is_deleted()

    def test_lr_schedule_and_override(self, impl):
        rng = np.random.default_rng(5)
        opt = optim.sparse_adamw(lambda c: 0.1 / (1.0 + c), weight_decay=0.05)
        emb, slots = random_state(rng, opt)
        rows, grads, mask = random_step(rng)
        for kw in (dict(lr_step=jnp.int32(9)), dict(lr=jnp.float32(0.003))):
            want = opt.apply(emb, slots, rows, grads, mask, jnp.int32(3), impl="reference", **kw)
            got = opt.apply(emb, slots, rows, grads, mask, jnp.int32(3), impl=impl, **kw)
            assert_close(got, want)

    def test_nonfinite_count(self, impl):
        # Counted where the update reads the gradients: live lanes only (a NaN in a
        # padding lane is not counted), and the same rows as `nonfinite_rows`.
        rng = np.random.default_rng(8)
        opt = optim.make("rowwise_adagrad", **CASES["rowwise_adagrad"])
        emb, slots = random_state(rng, opt)
        rows, grads, mask = random_step(rng)
        grads[np.flatnonzero(~mask)[0], 1] = np.nan
        want = optim.nonfinite_rows(grads, mask)
        assert int(want) == 2
        for i in ("reference", impl):
            got = opt.apply(emb, slots, rows, grads, mask, jnp.int32(1), impl=i, count_nonfinite=True)
            assert int(got[2]) == int(want)
            assert_close(got[:2], opt.apply(emb, slots, rows, grads, mask, jnp.int32(1), impl="reference"))

    def test_wide_rows_and_single_lane(self, impl):
        rng = np.random.default_rng(6)
        opt = optim.make("adagrad", **CASES["adagrad"])
        emb, slots = random_state(rng, opt, dim=128)
        rows, grads, mask = random_step(rng, dim=128)
        want = opt.apply(emb, slots, rows[:1], grads[:1], mask[:1] | True, jnp.int32(1), impl="reference")
        got = opt.apply(emb, slots, rows[:1], grads[:1], mask[:1] | True, jnp.int32(1), impl=impl)
        assert_close(got, want)


def random_segments(rng, dim, src_dtype, weighted, num_live=30, live_first=False):
    """SegmentGrads over U lanes (rows, mask as random_step's): segment lengths 0, 1, 2,
    a few tens, and long ones spread over several pieces (65, 300, and 2500 items: more
    than 32 partial rows); items pointing nowhere (-1); a NaN source row used by exactly
    one live segment, an inf one by one padding segment. With live_first, the dedup's
    layout: the live lanes first (the kernels skip programs past the last one), and a
    long segment on the last padding lane."""
    rows, _, mask = random_step(rng, dim, num_live)
    if live_first:
        order = np.argsort(~mask, kind="stable")
        rows, mask = rows[order], mask[order]
    lengths = rng.choice([0, 1, 1, 2, 3, 17], U)
    live = np.flatnonzero(mask)
    lengths[live[:3]] = (65, 300, 2500)
    lengths[live[3]] = 0                          # a live row without items: a zero gradient
    lengths[np.flatnonzero(~mask)[:2]] = 0        # padding
    if live_first:
        lengths[-1] = 300
    splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    c = int(splits[-1])
    n_src = 50
    idx = rng.integers(0, n_src, c).astype(np.int32)
    idx[rng.random(c) < 0.1] = -1
    src = rng.normal(0.0, 1.0, (n_src, dim)).astype(np.float32)
    src[n_src - 1] = np.nan
    src[n_src - 2] = np.inf
    idx[idx >= n_src - 2] = 0
    seg_of = np.repeat(np.arange(U), lengths)
    nan_lane = live[4] if lengths[live[4]] else live[5]
    idx[splits[nan_lane]] = n_src - 1
    pad = np.flatnonzero(~mask & (lengths > 0))
    if len(pad):
        idx[splits[pad[0]]] = n_src - 2
    w = rng.normal(1.0, 0.5, c).astype(np.float32) if weighted else None
    assert len(seg_of) == c
    sg = su.SegmentGrads(jnp.asarray(src, src_dtype), jnp.asarray(splits), jnp.asarray(idx),
                         None if w is None else jnp.asarray(w))
    return rows, sg, mask


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
class TestSegmentGradsUpdate:
    """sparse_update with SegmentGrads (the fused backward-and-update) == the update on
    the materialised gradients."""

    @pytest.mark.parametrize("name,dim,src_dtype,weighted,live_first", [
        ("rowwise_adagrad", 128, jnp.bfloat16, False, False), ("rowwise_adagrad", 8, jnp.float32, True, False),
        ("adam", 16, jnp.float32, False, False), ("adagrad", 8, jnp.bfloat16, True, False),
        ("sgd", 4, jnp.float32, False, False), ("rowwise_adagrad", 128, jnp.bfloat16, False, True),
        ("adam", 16, jnp.float32, True, True)])
    def test_matches_materialized(self, impl, name, dim, src_dtype, weighted, live_first):
        rng = np.random.default_rng(dim + len(name))
        opt = optim.make(name, **CASES[name])
        emb, slots = random_state(rng, opt, dim=dim)
        rows, sg, mask = random_segments(rng, dim, src_dtype, weighted, live_first=live_first)
        dense = sg.materialize("reference")
        want = opt.apply(emb, slots, rows, dense, mask, jnp.int32(3), impl="reference", count_nonfinite=True)
        got = opt.apply(emb, slots, rows, sg, mask, jnp.int32(3), impl=impl, count_nonfinite=True)
        assert int(got[2]) == int(want[2]) == 1
        assert_close(got[:2], want[:2], rtol=1e-5, atol=1e-5)
        # The same sums in the same order as the two-pass kernel path (the row math may
        # round differently in another kernel: XLA / Triton contract and vectorise it).
        two_pass = opt.apply(emb, slots, rows, sg.materialize(impl), mask, jnp.int32(3), impl=impl)
        assert_close(got[:2], two_pass, rtol=1e-6, atol=1e-6)
        # Rows of dead lanes, skipped lanes and other rows are bitwise unchanged.
        g = np.asarray(dense)
        live = {int(r) for r, m, gr in zip(rows, mask, g) if m and 0 <= r < R and np.all(np.isfinite(gr))}
        untouched = np.array(sorted(set(range(R)) - live))
        np.testing.assert_array_equal(np.asarray(got[0])[untouched], np.asarray(emb)[untouched])

    def test_clip_and_bfloat16_storage_donated(self, impl):
        rng = np.random.default_rng(11)
        opt = optim.make("rowwise_adagrad", **CASES["rowwise_adagrad"], clip_norm=0.5)
        emb, slots = random_state(rng, opt, jnp.bfloat16, dim=32)
        rows, sg, mask = random_segments(rng, 32, jnp.bfloat16, True)
        want = opt.apply(emb, slots, rows, sg.materialize("reference"), mask, jnp.int32(2), impl="reference")
        step = jax.jit(lambda e, s: opt.apply(e, s, rows, sg, mask, jnp.int32(2), impl=impl), donate_argnums=(0, 1))
        got = step(emb, slots)
        assert got[0].dtype == jnp.bfloat16 and emb.is_deleted()
        assert_close(got, want, rtol=1e-2, atol=1e-2)
        assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)

    def test_non_pow2_dim_sums_then_updates(self, impl):
        rng = np.random.default_rng(12)
        opt = optim.make("adam", **CASES["adam"])
        emb, slots = random_state(rng, opt, dim=9)
        rows, sg, mask = random_segments(rng, 9, jnp.float32, False)
        want = opt.apply(emb, slots, rows, sg.materialize("reference"), mask, jnp.int32(1), impl="reference")
        assert_close(opt.apply(emb, slots, rows, sg, mask, jnp.int32(1), impl=impl), want, rtol=1e-5, atol=1e-5)

    def test_bad_shapes_name_the_arrays(self, impl):
        opt = optim.make("sgd", **CASES["sgd"])
        emb, slots = random_state(np.random.default_rng(0), opt)
        sg = su.SegmentGrads(jnp.zeros((4, DIM)), jnp.zeros(U, jnp.int32), jnp.zeros(3, jnp.int32))
        for i in ("reference", impl):
            with pytest.raises(ValueError, match="splits must be"):
                opt.apply(emb, slots, jnp.zeros(U, jnp.int32), sg, jnp.ones(U, bool), jnp.int32(1), impl=i)


def test_non_pow2_dim_and_empty_fall_back():
    rng = np.random.default_rng(7)
    opt = optim.make("adam", **CASES["adam"])
    emb, slots = random_state(rng, opt, dim=3)
    rows, grads, mask = random_step(rng, dim=3)
    want = opt.apply(emb, slots, rows, grads, mask, jnp.int32(1), impl="reference")
    got = opt.apply(emb, slots, rows, grads, mask, jnp.int32(1), impl="interpret")
    jax.tree.map(np.testing.assert_array_equal, got, want)  # the same XLA code
    got = opt.apply(emb, slots, rows[:0], grads[:0], mask[:0], jnp.int32(1), impl="interpret")
    jax.tree.map(np.testing.assert_array_equal, got, (emb, slots))


def test_dispatch_default_is_reference_on_cpu(monkeypatch):
    if ON_GPU:
        pytest.skip("CPU-only check")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve(None) == "reference"
    with pytest.raises(ValueError, match="needs a GPU"):
        su.sparse_update(lambda p, s, g, lr, t: (p, s), jnp.zeros((4, 2)), {}, jnp.zeros(1, jnp.int32),
                         jnp.zeros((1, 2)), jnp.ones(1, bool), 0.1, 1, impl="pallas")


def test_default_config():
    for d in (1, 16, 64, 128, 4096):
        c = su.default_config(d)
        assert c.lanes >= 1 and c.lanes & (c.lanes - 1) == 0


def _sgd(p, slots, g, lr, t):
    return p - lr * g, slots


@pytest.mark.skipif(not ON_GPU, reason="compiled kernel on a > 2**31-element table: GPU only")
def test_compiled_update_past_int32_element_offsets():
    """A DLRM-sized merged table has more than 2**31 elements (17M rows x 128): rows past
    row 16,777,216 must be updated in place, nothing else touched (the same calls passed
    as a script on an H200,
    2026-11-28)."""
    r, d = 17_000_000, 128
    rows = jnp.asarray([5, 10_000_000, 16_777_300, 16_999_999], jnp.int32)
    out, _ = su.sparse_update(_sgd, jnp.zeros((r, d), jnp.float32), {}, rows, jnp.ones((4, d), jnp.float32),
                              jnp.ones(4, bool), jnp.float32(0.5), jnp.int32(1), impl="pallas")
    np.testing.assert_array_equal(np.asarray(out[rows]), -0.5)
    assert float(jnp.sum(out)) == -0.5 * 4 * d


@pytest.mark.skipif(not ON_GPU, reason="compiled kernel on a > 2**31-element table: GPU only")
def test_compiled_segment_update_past_int32_element_offsets():
    """The fused backward-and-update on a DLRM-sized merged table (17M rows x 128): rows
    past row 16,777,216 get their segment sums, nothing else is touched."""
    r, d = 17_000_000, 128
    rows = jnp.asarray([5, 10_000_000, 16_777_300, 16_999_999], jnp.int32)
    # Row i's segment: items 0..i (1, 2, 3, 4 items), each src row 0 (ones).
    sg = su.SegmentGrads(jnp.ones((1, d), jnp.bfloat16), jnp.asarray([0, 1, 3, 6, 10], jnp.int32),
                         jnp.zeros(10, jnp.int32))
    out, _ = su.sparse_update(_sgd, jnp.zeros((r, d), jnp.float32), {}, rows, sg, jnp.ones(4, bool),
                              jnp.float32(0.5), jnp.int32(1), impl="pallas")
    np.testing.assert_array_equal(np.asarray(out[rows][:, 0]), [-0.5, -1.0, -1.5, -2.0])
    assert float(jnp.sum(out)) == -0.5 * 10 * d
