"""Sparse (touched-rows-only) optimizers against a dense NumPy reference."""

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import recis_jax  # noqa: F401  (x64 on)
from recis_jax import optim
from recis_jax.optim import nonfinite_rows

R, DIM, U = 97, 4, 12  # distinct sizes, so a shape [R, ...] is recognisable in a jaxpr

# name -> (factory kwargs). Non-default hyperparameters so each one is exercised.
CASES = {
    "adam": dict(lr=0.05, b1=0.8, b2=0.99, eps=1e-6),
    "adamw": dict(lr=0.05, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1),
    "adamw_tf": dict(lr=0.05, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.02),
    "adagrad": dict(lr=0.1, initial_accumulator_value=0.2, eps=1e-8),
    "rowwise_adagrad": dict(lr=0.1, initial_accumulator_value=0.05, eps=1e-8),
    "sgd": dict(lr=0.3),
}


def reference_step(name, hp, emb, slots, rows, grads, mask, t, lr, clip_norm=None):
    """The documented formulas in float64 NumPy, applied to the live, finite, in-range rows."""
    emb = emb.astype(np.float64).copy()
    slots = {k: v.astype(np.float64).copy() for k, v in slots.items()}
    for lane in range(len(rows)):
        r, g = int(rows[lane]), grads[lane].astype(np.float64)
        if not mask[lane] or not np.all(np.isfinite(g)) or not 0 <= r < len(emb):
            continue
        if clip_norm is not None:
            g = g * min(1.0, clip_norm / np.linalg.norm(g))
        p = emb[r]
        if name.startswith("adam"):
            b1, b2, eps = hp["b1"], hp["b2"], hp["eps"]
            wd = hp.get("weight_decay", 0.0)
            p = p * {"adam": 1.0, "adamw": 1 - lr * wd, "adamw_tf": 1 - wd}[name]  # before the step
            m = b1 * slots["m"][r] + (1 - b1) * g
            v = b2 * slots["v"][r] + (1 - b2) * g * g
            p = p - lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
            slots["m"][r], slots["v"][r] = m, v
        elif name == "adagrad":
            acc = slots["acc"][r] + g * g
            p = p - lr * g / (np.sqrt(acc) + hp["eps"])
            slots["acc"][r] = acc
        elif name == "rowwise_adagrad":
            acc = slots["acc"][r] + np.mean(g * g)
            p = p - lr * g / (np.sqrt(acc) + hp["eps"])
            slots["acc"][r] = acc
        else:
            p = p - lr * g
        emb[r] = p
    return emb, slots


def random_step(rng, num_live=9):
    """U lanes: num_live unique live rows, padding lanes colliding with live rows or out of range."""
    rows = np.empty(U, np.int32)
    rows[:num_live] = rng.choice(R, num_live, replace=False)
    rows[num_live:] = rng.choice([int(rows[0]), R + 3, -1, 0], U - num_live)
    grads = rng.normal(0.0, 1.0, (U, DIM)).astype(np.float32)
    grads[num_live:] = 1e6  # garbage in padding must not leak
    mask = np.arange(U) < num_live
    perm = rng.permutation(U)  # live lanes need not come first
    return rows[perm], grads[perm], mask[perm]


def walk_eqns(jaxpr, into_kernels: bool = True):
    """Every equation of a jaxpr, descending into sub-jaxprs (jit, cond, ...); a
    pallas_call is yielded whole when `into_kernels` is False."""
    for eqn in jaxpr.eqns:
        subs = list(jex.jaxprs_in_params(eqn.params))
        if subs and (into_kernels or eqn.primitive.name != "pallas_call"):
            for sub in subs:
                yield from walk_eqns(sub, into_kernels)
        else:
            yield eqn


def test_pinned_adamw_example():
    opt = optim.sparse_adamw(0.01, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    emb = jnp.array([[0.5, -0.25], [1.0, 2.0]], jnp.float32)
    slots = opt.init(2, 2, jnp.float32)
    emb, slots = opt.apply(
        emb, slots, jnp.array([0, 1], jnp.int32), jnp.array([[0.1, -0.2], [0.0, 0.4]], jnp.float32),
        jnp.array([True, True]), jnp.int32(1),
    )
    emb, slots = opt.apply(
        emb, slots, jnp.array([0, 1], jnp.int32), jnp.array([[0.3, 0.05], [5.0, 5.0]], jnp.float32),
        jnp.array([True, False]), jnp.int32(2),
    )  # B is not touched at step 2
    np.testing.assert_allclose(emb[0], [0.48072323461, -0.23525634380], atol=1e-6, rtol=0)
    np.testing.assert_allclose(emb[1], [0.9999, 1.98980000791], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_and_leaves_untouched_rows(name):
    hp = CASES[name]
    opt = optim.make(name, **hp)
    assert set(opt.slot_names) == set(opt.init(R, DIM))
    rng = np.random.default_rng(len(name))
    emb = jnp.asarray(rng.normal(0.0, 1.0, (R, DIM)), jnp.float32)
    slots = opt.init(R, DIM, jnp.float32)
    ref_emb, ref_slots = np.asarray(emb, np.float64), {k: np.asarray(v, np.float64) for k, v in slots.items()}
    apply = jax.jit(opt.apply)
    for t in (1, 2, 3):
        rows, grads, mask = random_step(rng)
        new_emb, new_slots = apply(emb, slots, rows, grads, mask, jnp.int32(t))
        ref_emb, ref_slots = reference_step(name, hp, ref_emb, ref_slots, rows, grads, mask, t, hp["lr"])
        np.testing.assert_allclose(new_emb, ref_emb, rtol=2e-5, atol=2e-6)
        for k in opt.slot_names:
            assert new_slots[k].dtype == jnp.float32
            np.testing.assert_allclose(new_slots[k], ref_slots[k], rtol=2e-5, atol=1e-7)
        # Rows not touched this step: bit-identical, embedding and every slot.
        untouched = np.setdiff1d(np.arange(R), rows[mask])
        np.testing.assert_array_equal(new_emb[untouched], emb[untouched])
        for k in opt.slot_names:
            np.testing.assert_array_equal(new_slots[k][untouched], slots[k][untouched])
        emb, slots = new_emb, new_slots


@pytest.mark.parametrize("name", ["adamw", "rowwise_adagrad"])
def test_masked_lanes_are_ignored(name):
    """Padding lanes that collide with a live row, or lie out of range, change nothing."""
    opt = optim.make(name, **CASES[name])
    rng = np.random.default_rng(1)
    emb = jnp.asarray(rng.normal(0.0, 1.0, (R, DIM)), jnp.float32)
    slots = opt.init(R, DIM)
    live_rows = np.array([5, 0, R - 1], np.int32)
    live_grads = rng.normal(0.0, 1.0, (3, DIM)).astype(np.float32)
    clean = opt.apply(emb, slots, live_rows, live_grads, np.ones(3, bool), jnp.int32(1))
    rows = np.concatenate([live_rows, [5, 0, R - 1, R, R + 100, -1, -R]]).astype(np.int32)
    grads = np.concatenate([live_grads, np.full((7, DIM), 1e3, np.float32)])
    grads[-1] = np.nan
    mask = np.arange(10) < 3
    padded = opt.apply(emb, slots, rows, grads, mask, jnp.int32(1))
    jax.tree.map(np.testing.assert_array_equal, padded, clean)
    # A live lane with an out-of-range id is dropped, never wrapped to another row.
    out = opt.apply(emb, slots, np.array([-1, R], np.int32), live_grads[:2], np.ones(2, bool), jnp.int32(1))
    jax.tree.map(np.testing.assert_array_equal, out, (emb, slots))


@pytest.mark.parametrize("name", ["adam", "adagrad"])
def test_bfloat16_storage_uses_float32_math(name):
    opt = optim.make(name, **CASES[name])
    rng = np.random.default_rng(2)
    emb16 = jnp.asarray(rng.normal(0.0, 1.0, (R, DIM)), jnp.bfloat16)
    emb32 = emb16.astype(jnp.float32)
    s16, s32 = opt.init(R, DIM, jnp.bfloat16), opt.init(R, DIM, jnp.float32)
    for t in (1, 2):
        rows, grads, mask = random_step(rng)
        emb16, s16 = opt.apply(emb16, s16, rows, grads, mask, jnp.int32(t))
        emb32, s32 = opt.apply(emb32, s32, rows, grads, mask, jnp.int32(t))
    assert emb16.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in s16.values())
    # Slots never pass through bf16; rows differ by bf16 rounding only.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), s16, s32)
    np.testing.assert_allclose(emb16.astype(jnp.float32), emb32, rtol=2**-7, atol=1e-2)


def test_per_row_clipping():
    opt = optim.sparse_sgd(1.0, clip_norm=1.0)
    emb = jnp.zeros((3, 2), jnp.float32)
    rows = np.array([0, 1, 2], np.int32)
    grads = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], np.float32)
    emb, _ = opt.apply(emb, {}, rows, grads, np.ones(3, bool), jnp.int32(1))
    np.testing.assert_allclose(emb, [[-0.6, -0.8], [-0.3, -0.4], [0.0, 0.0]], rtol=1e-6)
    # And against the reference for an adaptive optimizer.
    hp = CASES["adamw"]
    opt = optim.sparse_adamw(**hp, clip_norm=0.5)
    rng = np.random.default_rng(3)
    emb = jnp.asarray(rng.normal(0.0, 1.0, (R, DIM)), jnp.float32)
    slots = opt.init(R, DIM)
    rows, grads, mask = random_step(rng)
    got, _ = opt.apply(emb, slots, rows, grads, mask, jnp.int32(1))
    ref, _ = reference_step("adamw", hp, np.asarray(emb), {k: np.asarray(v) for k, v in slots.items()},
                            rows, grads, mask, 1, hp["lr"], clip_norm=0.5)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)


def test_schedule_is_evaluated_at_lr_step():
    schedule = optax.linear_schedule(0.1, 0.0, transition_steps=10)
    opt = optim.sparse_sgd(schedule)
    emb = jnp.zeros((4, 2), jnp.float32)
    rows, grads, mask = np.array([1], np.int32), np.ones((1, 2), np.float32), np.ones(1, bool)
    apply = jax.jit(opt.apply)
    got, _ = apply(emb, {}, rows, grads, mask, jnp.int32(3), lr_step=jnp.int32(7))
    np.testing.assert_allclose(got[1], [-0.03, -0.03], rtol=1e-6)
    got, _ = apply(emb, {}, rows, grads, mask, jnp.int32(3))  # no lr_step: the table step
    np.testing.assert_allclose(got[1], [-0.07, -0.07], rtol=1e-6)
    got, _ = apply(emb, {}, rows, grads, mask, jnp.int32(3), lr=jnp.float32(0.5))  # override
    np.testing.assert_allclose(got[1], [-0.5, -0.5], rtol=1e-6)
    # AdamW's decay D = 1 - lr * wd uses the scheduled lr; the bias correction uses step.
    hp = dict(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.5)
    opt = optim.sparse_adamw(schedule, **hp)
    emb = jnp.ones((4, 2), jnp.float32)
    got, _ = opt.apply(emb, opt.init(4, 2), rows, grads, mask, jnp.int32(2), lr_step=jnp.int32(5))
    ref, _ = reference_step("adamw", hp, np.ones((4, 2)), {"m": np.zeros((4, 2)), "v": np.zeros((4, 2))},
                            rows, grads, mask, 2, 0.05)
    np.testing.assert_allclose(got, ref, rtol=1e-6)


@pytest.mark.parametrize("name", ["adam", "rowwise_adagrad"])
def test_nonfinite_grads_leave_rows_unchanged_and_are_counted(name):
    opt = optim.make(name, **CASES[name])
    rng = np.random.default_rng(4)
    emb = jnp.asarray(rng.normal(0.0, 1.0, (R, DIM)), jnp.float32)
    slots = opt.init(R, DIM)
    rows = np.array([3, 4, 5, 6], np.int32)
    grads = np.ones((4, DIM), np.float32)
    grads[0, 1] = np.nan
    grads[1, 0] = np.inf
    grads[3, 2] = np.nan  # a masked lane: not counted
    mask = np.array([True, True, True, False])
    assert int(nonfinite_rows(grads, mask)) == 2
    assert nonfinite_rows(grads, mask).dtype == jnp.int32
    new_emb, new_slots = opt.apply(emb, slots, rows, grads, mask, jnp.int32(1))
    assert np.all(np.isfinite(new_emb)) and all(np.all(np.isfinite(v)) for v in new_slots.values())
    keep = np.array([3, 4, 6])
    np.testing.assert_array_equal(new_emb[keep], emb[keep])
    for k in opt.slot_names:
        np.testing.assert_array_equal(new_slots[k][keep], slots[k][keep])
    assert not np.array_equal(new_emb[5], emb[5])  # the finite row is still updated


def test_jit_with_donation():
    opt = optim.sparse_adamw(**CASES["adamw"])
    rng = np.random.default_rng(5)
    emb = jnp.asarray(rng.normal(0.0, 1.0, (R, DIM)), jnp.float32)
    slots = opt.init(R, DIM)
    rows, grads, mask = random_step(rng)
    # The same program without donation: bit-identical (eager op-by-op may differ by an ulp).
    expect = jax.jit(opt.apply)(emb, slots, rows, grads, mask, jnp.int32(1))
    apply = jax.jit(opt.apply, donate_argnums=(0, 1))
    got = apply(emb, slots, rows, grads, mask, jnp.int32(1))
    jax.tree.map(np.testing.assert_array_equal, got, expect)
    assert emb.is_deleted() and all(v.is_deleted() for v in slots.values())


@pytest.mark.parametrize("name", sorted(CASES))
def test_jaxpr_has_no_f64_and_touches_only_gathered_rows(name):
    """No float64 anywhere; arrays of R rows only enter gathers and leave scatters."""
    hp = dict(CASES[name], lr=optax.cosine_decay_schedule(0.1, 100))  # int counts make this f64
    opt = optim.make(name, **hp, clip_norm=1.0)
    emb = jnp.zeros((R, DIM), jnp.bfloat16)
    closed = jax.make_jaxpr(opt.apply)(
        emb, opt.init(R, DIM, jnp.bfloat16), jnp.zeros(U, jnp.int32), jnp.zeros((U, DIM), jnp.float32),
        jnp.ones(U, bool), jnp.int32(1), lr_step=jnp.int64(5),
    )
    eqns = list(walk_eqns(closed.jaxpr))
    avals = [v.aval for e in eqns for v in (*e.invars, *e.outvars) if hasattr(v, "aval")]
    assert not [a for a in avals if a.dtype == jnp.float64]
    for e in walk_eqns(closed.jaxpr, into_kernels=False):
        if e.primitive.name == "pallas_call":
            # The fused update (GPU default): whole slabs go in and come back aliased,
            # the kernel reads and writes the U touched rows only (its own tests).
            assert set(e.params["input_output_aliases"]), "the fused update must work in place"
            continue
        big_in = [v for v in e.invars if getattr(v.aval, "shape", ())[:1] == (R,)]
        big_out = [v for v in e.outvars if v.aval.shape[:1] == (R,)]
        if e.primitive.name == "gather":
            assert not big_out and e.outvars[0].aval.shape[0] == U
        elif e.primitive.name == "scatter":
            assert e.invars[2].aval.shape[0] == U  # the updates: U rows
        else:
            assert not big_in and not big_out, f"{e.primitive} works on all {R} rows"


def test_init_reset_and_make():
    opt = optim.make("rowwise_adagrad", lr=0.1, initial_accumulator_value=0.5)
    slots = opt.init(R, DIM, jnp.bfloat16)
    assert slots["acc"].shape == (R,) and slots["acc"].dtype == jnp.float32
    opt = optim.make("adagrad", lr=0.1, initial_accumulator_value=0.5)
    slots = opt.init(R, DIM)
    assert slots["acc"].shape == (R, DIM) and np.all(slots["acc"] == 0.5)
    slots = {"acc": slots["acc"].at[2].set(9.0).at[3].set(9.0)}
    slots = opt.reset(slots, np.array([2, 3], np.int32), np.array([True, False]))
    assert np.all(slots["acc"][2] == 0.5) and np.all(slots["acc"][3] == 9.0)
    assert optim.make("sgd", lr=0.1).init(R, DIM) == {}
    assert set(optim.OPTIMIZERS) == set(CASES)
    with pytest.raises(ValueError, match="unknown sparse optimizer"):
        optim.make("lamb", lr=0.1)
    with pytest.raises(ValueError, match="b2"):
        optim.sparse_adam(0.1, b2=1.0)
