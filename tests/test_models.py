"""Dense models: shapes, training on synthetic data, gradients vs finite differences,
bf16 vs f32, no float64 in the jaxpr, attention masks, loss numerics, multi-task."""

import importlib.util
import pathlib

import flax.linen
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import recis_jax  # noqa: F401  (x64 on, as in production)
from recis_jax.models import (DIN, stack_fields, MMoE, DCNv2, DeepFM, SequenceTransformer, SharedBottom,
                              TargetAttention, attention_implementation, dot_product_attention,
                              from_config, multitask_loss, multitask_metrics,
                              sigmoid_bce_with_logits, softmax_ce, transformer_flops)

ROOT = pathlib.Path(__file__).resolve().parent.parent
B = 32


# ----------------------------------------------------------------------------- cases
# Each case: (model constructor taking dtype, inputs(rng) -> tuple, labels(inputs) -> [B]).
# Labels depend on the inputs so a model can learn them.

def _deepfm(dtype):
    return DeepFM(num_dense=3, embed_dim=4, hidden=(16, 8), dtype=dtype)


def _deepfm_inputs(rng):
    e = rng.standard_normal((B, 5, 4)).astype(np.float32)
    b = rng.standard_normal((B, 5)).astype(np.float32)
    d = rng.standard_normal((B, 3)).astype(np.float32)
    v = rng.standard_normal((B, 6)).astype(np.float32)   # a multimodal vector
    return e, b, d, (v,)


def _dcn(dtype):
    return DCNv2(bottom=(16, 8), num_cross=2, low_rank=4, top=(16, 1), dtype=dtype)


def _dcn_inputs(rng):
    return (rng.standard_normal((B, 4, 8)).astype(np.float32),
            rng.standard_normal((B, 3)).astype(np.float32),
            (rng.standard_normal((B, 5)).astype(np.float32),))   # a multimodal vector


def _din(dtype):
    return DIN(mlp=(16, 8), attention_hidden=(8,), dtype=dtype)


def _din_inputs(rng):
    lengths = rng.integers(1, 7, B)
    mask = np.arange(6)[None] < lengths[:, None]
    seq = rng.standard_normal((B, 6, 4)).astype(np.float32) * mask[..., None]
    return (rng.standard_normal((B, 4)).astype(np.float32), seq, mask,
            rng.standard_normal((B, 2)).astype(np.float32))


def _tr(dtype):
    return SequenceTransformer(num_layers=2, hidden=16, num_heads=2, ffn=32, out_dim=1,
                               dtype=dtype)


def _tr_inputs(rng):
    lengths = rng.integers(2, 9, B)
    mask = np.arange(8)[None] < lengths[:, None]
    return rng.standard_normal((B, 8, 4)).astype(np.float32), mask


def _mmoe(dtype):
    return MMoE(num_tasks=2, num_experts=3, expert=(16,), tower=(8,), dtype=dtype)


def _sb(dtype):
    return SharedBottom(num_tasks=2, bottom=(16,), tower=(8,), dtype=dtype)


def _mt_inputs(rng):
    return (rng.standard_normal((B, 6)).astype(np.float32),)


CASES = {
    "deepfm": (_deepfm, _deepfm_inputs, lambda x: x[0][:, 0, 0] + x[2][:, 0] > 0, (B,)),
    "dcnv2": (_dcn, _dcn_inputs, lambda x: x[0][:, 1, 2] * x[1][:, 0] > 0, (B,)),
    "din": (_din, _din_inputs, lambda x: np.sum(x[1][:, :, 0], 1) * x[0][:, 0] > 0, (B,)),
    "transformer": (_tr, _tr_inputs,
                    lambda x: np.broadcast_to(np.cumsum(x[0][:, :, 0], 1) > 0, (B, 8)), (B, 8, 1)),
    "mmoe": (_mmoe, _mt_inputs, lambda x: np.stack([x[0][:, 0] > 0, x[0][:, 1] > x[0][:, 2]], 1),
             (B, 2)),
    "shared_bottom": (_sb, _mt_inputs,
                      lambda x: np.stack([x[0][:, 0] > 0, x[0][:, 1] > x[0][:, 2]], 1), (B, 2)),
}


def _setup(name, dtype=jnp.bfloat16, seed=0):
    make, inputs, label_fn, shape = CASES[name]
    rng = np.random.default_rng(seed)
    x = inputs(rng)
    y = np.asarray(label_fn(x), np.float32)
    model = make(dtype)
    params = model.init(jax.random.key(seed), *x)
    return model, params, x, y, shape


def _loss_fn(name, model, x, y):
    def loss(params):
        out = model.apply(params, *x)
        if name == "transformer":  # causal: position t predicts sign of the prefix sum
            mask = x[1]
            return sigmoid_bce_with_logits(out[..., 0], y, weights=mask)
        return sigmoid_bce_with_logits(out, y) if out.ndim == 1 else multitask_loss(out, y)[0]
    return loss


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", sorted(CASES))
def test_shapes_and_dtype(name):
    model, params, x, _, shape = _setup(name)
    out = model.apply(params, *x)
    assert out.shape == shape and out.dtype == jnp.float32
    leaves = jax.tree.leaves(params)
    assert all(p.dtype == jnp.float32 for p in leaves)


@pytest.mark.parametrize("name", sorted(CASES))
def test_trains_and_no_f64(name):
    """A few adam steps in the default setting (f32 params, bf16 compute) reduce the loss,
    and the jaxpr of forward+backward holds no float64."""
    model, params, x, y, _ = _setup(name)
    loss = _loss_fn(name, model, x, y)
    jaxpr = str(jax.make_jaxpr(jax.value_and_grad(loss))(params))
    assert "f64" not in jaxpr
    opt = optax.adam(3e-2)

    @jax.jit
    def step(params, state):
        value, g = jax.value_and_grad(loss)(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, value

    state = opt.init(params)
    losses = []
    for _ in range(40):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0], losses


def _directional_check(loss, params, n_dirs=3, eps=3e-3, rtol=1e-2, seed=0):
    """Central differences along directions (random unit + the unit gradient, so each
    projection is O(|g|), well above float32 rounding) vs the gradient's projection."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    g = np.asarray(jax.flatten_util.ravel_pytree(jax.grad(loss)(params))[0])
    gnorm = float(np.linalg.norm(g))
    f = jax.jit(lambda v: loss(unravel(v)))
    rng = np.random.default_rng(seed)
    for _ in range(n_dirs):
        d = rng.standard_normal(flat.shape).astype(np.float32)
        d = d / np.linalg.norm(d) + g / gnorm
        fd = (float(f(flat + eps * d)) - float(f(flat - eps * d))) / (2 * eps)
        an = float(np.dot(g, d))
        assert abs(fd - an) <= rtol * gnorm, (fd, an, gnorm)


@pytest.mark.parametrize("name", sorted(CASES))
def test_grad_finite_differences(name):
    import jax.flatten_util  # noqa: F401, PLC0415

    model, params, x, y, _ = _setup(name, dtype=jnp.float32)
    _directional_check(_loss_fn(name, model, x, y), params)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_matches_f32(name):
    model32, params, x, _, _ = _setup(name, dtype=jnp.float32)
    model16 = CASES[name][0](jnp.bfloat16)
    a = np.asarray(model32.apply(params, *x))
    b = np.asarray(model16.apply(params, *x))
    scale = max(1.0, float(np.abs(a).max()))
    np.testing.assert_allclose(b, a, atol=0.05 * scale, rtol=0.05)


def test_deepfm_reference_math():
    """Logit = global bias + biases + FM second order + DNN, against numpy."""
    model, params, x, _, _ = _setup("deepfm", dtype=jnp.float32)
    e, b, d, (v,) = x
    p = params["params"]
    ef = np.concatenate([e, d[:, :, None] * np.asarray(p["dense_embedding"])[None],
                         (v @ np.asarray(p["vector_0"]["kernel"]) + np.asarray(p["vector_0"]["bias"]))[:, None]], 1)
    first = (np.asarray(p["global_bias"]) + b.sum(1) + (d * np.asarray(p["dense_bias"])[:, 0]).sum(1)
             + (v @ np.asarray(p["vector_bias_0"]["kernel"]))[:, 0] + np.asarray(p["vector_bias_0"]["bias"])[0])
    second = 0.5 * ((ef.sum(1) ** 2) - (ef ** 2).sum(1)).sum(1)
    h = ef.reshape(B, -1)
    dnn = p["dnn"]
    for i in range(3):
        h = h @ np.asarray(dnn[f"dense_{i}"]["kernel"]) + np.asarray(dnn[f"dense_{i}"]["bias"])
        if i < 2:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(np.asarray(model.apply(params, *x)), first + second + h[:, 0],
                               rtol=1e-4, atol=1e-4)


def test_full_size_param_counts():
    """DeepFM (312 -> 64 -> 16 -> 1) and DCNv2 (3456 cross/top) at the issue's sizes."""
    e8, b1, d = jnp.zeros((2, 26, 8), jnp.float32), jnp.zeros((2, 26), jnp.float32), jnp.zeros((2, 13), jnp.float32)
    p = jax.eval_shape(DeepFM().init, jax.random.key(0), e8, b1, d)["params"]
    assert p["dnn"]["dense_0"]["kernel"].shape == (312, 64)
    assert p["dense_embedding"].shape == (13, 8) and p["dense_bias"].shape == (13, 1)
    p = jax.eval_shape(DCNv2().init, jax.random.key(0), jnp.zeros((2, 26, 128), jnp.float32), d)["params"]
    assert p["cross_0"]["V"]["kernel"].shape == (3456, 512)
    assert p["cross_2"]["U"]["kernel"].shape == (512, 3456)
    assert p["top"]["dense_0"]["kernel"].shape == (3456, 1024)
    assert p["bottom"]["dense_0"]["kernel"].shape == (13, 512)


# ----------------------------------------------------------------------------- attention

def _tr_model(causal):
    return SequenceTransformer(num_layers=2, hidden=16, num_heads=2, ffn=32, causal=causal,
                               dtype=jnp.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_transformer_padding_is_ignored(causal):
    rng = np.random.default_rng(1)
    seq = rng.standard_normal((3, 10, 4)).astype(np.float32)
    mask = np.arange(10)[None] < np.array([[4], [10], [7]])
    model = _tr_model(causal)
    params = model.init(jax.random.key(0), seq, mask)
    out = np.asarray(model.apply(params, seq, mask))
    seq2 = np.where(mask[..., None], seq, 100.0 * rng.standard_normal(seq.shape)).astype(np.float32)
    out2 = np.asarray(model.apply(params, seq2, mask))
    np.testing.assert_allclose(out2, out, atol=1e-5)
    assert np.all(out[~mask] == 0)
    # a row of length 4 inside a padded batch = the same row alone, unpadded
    alone = np.asarray(model.apply(params, seq[:1, :4], None))
    np.testing.assert_allclose(out[0, :4], alone[0], atol=1e-5)


def test_transformer_causality():
    rng = np.random.default_rng(2)
    seq = rng.standard_normal((2, 12, 4)).astype(np.float32)
    seq2 = seq.copy()
    seq2[:, 7:] = rng.standard_normal((2, 5, 4))
    for causal in (True, False):
        model = _tr_model(causal)
        params = model.init(jax.random.key(0), seq)
        a, b = np.asarray(model.apply(params, seq)), np.asarray(model.apply(params, seq2))
        if causal:
            np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-5)
        else:
            assert np.abs(a[:, :7] - b[:, :7]).max() > 1e-3


def test_transformer_next_item_softmax_trains():
    """Next-item prediction over 16 items (item_{t+1} = item_t + 3 mod 16), scored by dot
    product with the item embeddings, softmax cross-entropy, bf16 compute."""
    items = 16
    rng = np.random.default_rng(3)
    start = rng.integers(0, items, (16, 1))
    ids = (start + 3 * np.arange(10)[None]) % items
    model = SequenceTransformer(num_layers=1, hidden=32, num_heads=2, ffn=64, out_dim=8)
    table = jnp.asarray(rng.standard_normal((items, 8)).astype(np.float32))
    params = {"model": model.init(jax.random.key(0), table[ids]), "table": table}

    def loss(p):
        h = model.apply(p["model"], p["table"][ids])[:, :-1]          # [B, L-1, 8]
        logits = jnp.einsum("bld,nd->bln", h, p["table"])
        return softmax_ce(logits, ids[:, 1:])

    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        v, g = jax.value_and_grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, v

    first = None
    for _ in range(60):
        params, state, v = step(params, state)
        first = float(v) if first is None else first
    assert float(v) < 0.5 * first


def test_transformer_remat_same_values_and_grads():
    rng = np.random.default_rng(8)
    seq = rng.standard_normal((2, 8, 4)).astype(np.float32)
    mask = np.arange(8)[None] < np.array([[5], [8]])
    kw = dict(num_layers=2, hidden=16, num_heads=2, ffn=32, dtype=jnp.float32)
    plain, rem = SequenceTransformer(**kw), SequenceTransformer(remat=True, **kw)
    params = plain.init(jax.random.key(0), seq, mask)

    def run(m):
        return jax.value_and_grad(lambda p: jnp.sum(m.apply(p, seq, mask) ** 2))(params)

    (va, ga), (vb, gb) = run(plain), run(rem)
    np.testing.assert_allclose(vb, va, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6), ga, gb)


def test_transformer_attention_dtype():
    """bfloat16 Dense layers with float32 attention and gelu: every dot but the
    attention's takes bfloat16 operands, exp / erf / tanh see float32 only, and the
    values stay close to the all-float32 model's."""
    rng = np.random.default_rng(9)
    seq = rng.standard_normal((2, 8, 4)).astype(np.float32)
    mask = np.arange(8)[None] < np.array([[5], [8]])
    kw = dict(num_layers=1, hidden=16, num_heads=2, ffn=32, attention_impl="xla")
    mixed = SequenceTransformer(dtype=jnp.bfloat16, attention_dtype=jnp.float32, **kw)
    params = mixed.init(jax.random.key(0), seq, mask)
    eqns = [e for e in jax.make_jaxpr(mixed.apply)(params, seq, mask).eqns]

    def walk(eqns):
        for e in eqns:
            yield e
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                yield from walk(sub.eqns)

    eqns = list(walk(eqns))
    dots = [tuple(str(v.aval.dtype) for v in e.invars) for e in eqns if e.primitive.name == "dot_general"]
    assert dots.count(("float32", "float32")) >= 2  # q.k and p.v (the f32 out_proj too)
    assert dots.count(("bfloat16", "bfloat16")) >= 4  # qkv, out, ffn_in, ffn_out
    math = [str(e.invars[0].aval.dtype) for e in eqns if e.primitive.name in ("exp", "erf", "tanh")]
    assert math and set(math) == {"float32"}, math
    f32 = SequenceTransformer(dtype=jnp.float32, **kw)
    np.testing.assert_allclose(mixed.apply(params, seq, mask), f32.apply(params, seq, mask), atol=0.05)


def test_stack_fields():
    pooled = {"a": jnp.ones((3, 4), jnp.float32), "b": jnp.zeros((3, 4), jnp.float32)}
    x = stack_fields(pooled, ["b", "a"], jnp.bfloat16)
    assert x.shape == (3, 2, 4) and x.dtype == jnp.bfloat16 and float(x[0, 1, 0]) == 1.0


def test_attention_impl_selection():
    assert attention_implementation(jnp.bfloat16, 64) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
    assert attention_implementation(jnp.float32, 64) == "xla"
    assert attention_implementation(jnp.bfloat16, 64, "xla") == "xla"
    with pytest.raises(ValueError):
        attention_implementation(jnp.bfloat16, 64, "flash")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_matches_xla(causal):
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 256, 4, 64)), jnp.bfloat16) for _ in range(3))
    lengths = jnp.array([256, 100], jnp.int32)

    def f(impl):
        def g(q, k, v):
            out = dot_product_attention(q, k, v, lengths=lengths, causal=causal, implementation=impl)
            return jnp.sum(out.astype(jnp.float32) ** 2), out
        (_, out), grads = jax.value_and_grad(g, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    out_c, g_c = f("cudnn")
    out_x, g_x = f("xla")
    np.testing.assert_allclose(np.asarray(out_c, np.float32), np.asarray(out_x, np.float32), atol=2e-2)
    for a, b in zip(g_c, g_x):  # bf16 gradients: compare relative norms, not elements
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_transformer_cudnn_matches_xla(causal):
    rng = np.random.default_rng(9)
    seq = jnp.asarray(rng.standard_normal((2, 128, 16)), jnp.float32)
    mask = jnp.arange(128)[None] < jnp.array([[128], [77]])
    outs = []
    for impl in ("cudnn", "xla"):
        m = SequenceTransformer(num_layers=2, hidden=128, num_heads=2, ffn=256, causal=causal,
                                attention_impl=impl)
        params = m.init(jax.random.key(0), seq, mask)
        outs.append(np.asarray(m.apply(params, seq, mask)))
        assert "f64" not in str(jax.make_jaxpr(
            jax.grad(lambda p: jnp.mean(m.apply(p, seq, mask) ** 2)))(params))
    np.testing.assert_allclose(outs[0], outs[1], atol=5e-2)


def test_target_attention_mask_and_weights():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    keys = rng.standard_normal((4, 5, 8)).astype(np.float32)
    mask = np.arange(5)[None] < np.array([[1], [3], [5], [0]])
    ta = TargetAttention(hidden=(8,), dtype=jnp.float32)
    params = ta.init(jax.random.key(0), q, keys, mask)
    pooled, w = ta.apply(params, q, keys, mask, return_weights=True)
    w = np.asarray(w)
    assert np.all(w[~mask] == 0)
    np.testing.assert_allclose(w[:3].sum(1), 1.0, rtol=1e-5)
    assert np.all(np.asarray(pooled)[3] == 0) and np.isfinite(np.asarray(pooled)).all()
    keys2 = np.where(mask[..., None], keys, 1e3).astype(np.float32)
    np.testing.assert_allclose(np.asarray(ta.apply(params, q, keys2, mask)), np.asarray(pooled), atol=1e-5)


# ----------------------------------------------------------------------------- losses / multi-task

def test_bce_extreme_logits_exact():
    x = jnp.array([100.0, 100.0, -100.0, -100.0, 0.0, 1e4], jnp.float32)
    y = jnp.array([1.0, 0.0, 1.0, 0.0, 1.0, 0.0], jnp.float32)
    got = np.asarray(sigmoid_bce_with_logits(x, y, reduction="none"))
    np.testing.assert_allclose(got, [0.0, 100.0, 100.0, 0.0, np.log(2.0), 1e4], rtol=1e-6, atol=1e-30)
    g = np.asarray(jax.grad(lambda x: sigmoid_bce_with_logits(x, y, reduction="sum"))(x))
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, [0, 1, -1, 0, -0.5, 1], atol=1e-6)
    # moderate logits: equal to the textbook formula in float64
    xs = np.linspace(-20, 20, 41)
    ys = (np.arange(41) % 2).astype(np.float64)
    ref = -(ys * np.log(1 / (1 + np.exp(-xs))) + (1 - ys) * np.log(1 - 1 / (1 + np.exp(-xs))))
    np.testing.assert_allclose(np.asarray(sigmoid_bce_with_logits(jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.float32), reduction="none")),
                               ref, rtol=1e-5, atol=1e-6)


def test_softmax_ce_extreme_and_soft_labels():
    x = jnp.array([[100.0, -100.0, 0.0], [-100.0, 100.0, 100.0]], jnp.float32)
    got = np.asarray(softmax_ce(x, jnp.array([1, 0]), reduction="none"))
    np.testing.assert_allclose(got, [200.0, 200.0 + np.log(2.0)], rtol=1e-6)
    soft = jax.nn.one_hot(jnp.array([1, 0]), 3, dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(softmax_ce(x, soft, reduction="none")), got, rtol=1e-6)
    assert np.isfinite(np.asarray(jax.grad(lambda x: softmax_ce(x, jnp.array([1, 0])))(x))).all()


def test_sample_weights_and_multitask():
    rng = np.random.default_rng(6)
    logits = jnp.asarray(rng.standard_normal((8, 2)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 2, (8, 2)), jnp.float32)
    w = jnp.array([1, 1, 1, 1, 0, 0, 0, 0], jnp.float32)
    # zero-weight rows drop out; scaling weights changes nothing
    full = sigmoid_bce_with_logits(logits[:4, 0], labels[:4, 0])
    np.testing.assert_allclose(sigmoid_bce_with_logits(logits[:, 0], labels[:, 0], w), full, rtol=1e-6)
    np.testing.assert_allclose(sigmoid_bce_with_logits(logits[:, 0], labels[:, 0], 3 * w), full, rtol=1e-6)
    total, per = multitask_loss(logits, labels, task_weights=(1.0, 0.5), sample_weights=w,
                                task_names=("click", "conversion"))
    np.testing.assert_allclose(per["click"], full, rtol=1e-6)
    np.testing.assert_allclose(total, per["click"] + 0.5 * per["conversion"], rtol=1e-6)
    # per-task sample weights [B, T]: conversion counted on clicked rows only
    wt = jnp.stack([jnp.ones(8, jnp.float32), labels[:, 0]], 1)
    _, per = multitask_loss(logits, labels, sample_weights=wt)
    clicked = np.asarray(labels[:, 0]) > 0
    np.testing.assert_allclose(per["task1"], sigmoid_bce_with_logits(logits[clicked, 1], labels[clicked, 1]), rtol=1e-6)
    m = multitask_metrics(logits, labels, w, task_names=("click", "conversion"))
    np.testing.assert_allclose(m["click"]["logloss"], full, rtol=1e-6)
    assert 0 <= float(m["conversion"]["accuracy"]) <= 1


def test_mmoe_gates_sum_to_one():
    x = jnp.asarray(np.random.default_rng(7).standard_normal((5, 6)), jnp.float32)
    model = MMoE(num_tasks=3, num_experts=4, expert=(8,), tower=(4,))
    params = model.init(jax.random.key(0), x)
    logits, gates = model.apply(params, x, return_gates=True)
    assert logits.shape == (5, 3) and gates.shape == (5, 3, 4) and gates.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(gates).sum(-1), 1.0, rtol=1e-6)
    # experts have distinct parameters (vmapped init split the rng)
    k = np.asarray(params["params"]["experts"]["dense_0"]["kernel"])
    assert k.shape[0] == 4 and not np.allclose(k[0], k[1])


# ----------------------------------------------------------------------------- configs

def _load_config(name):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config


def test_configs_build_models():
    get = _load_config("deepfm")
    assert isinstance(from_config(get().model), DeepFM)
    m = from_config(get("smoke").model)
    e, b, d = jnp.zeros((2, 26, 8), jnp.float32), jnp.zeros((2, 26), jnp.float32), jnp.zeros((2, 13), jnp.float32)
    assert m.apply(m.init(jax.random.key(0), e, b, d), e, b, d).shape == (2,)
    get = _load_config("transformer")
    full = from_config(get().model)
    assert isinstance(full, SequenceTransformer) and full.hidden == 1024
    gr = get("gr50m").model
    per_layer = 4 * gr.hidden ** 2 + 2 * gr.hidden * gr.ffn
    assert 45e6 < gr.num_layers * per_layer < 60e6
    sm = get("smoke")
    m = from_config(sm.model)
    seq = jnp.zeros((2, sm.data.seq_len, sm.data.item_dim), jnp.float32)
    assert m.apply(m.init(jax.random.key(0), seq), seq).shape == (2, sm.data.seq_len, 16)
    with pytest.raises(ValueError):
        get("nope")


def test_transformer_flops_formula():
    f = transformer_flops(8, 1024, 4096, batch=16, length=4096, causal=True)
    p = 8 * (4 * 1024 ** 2 + 2 * 1024 * 4096)
    assert f["dense"] == 6 * p * 16 * 4096
    assert f["attention_full"] == 12 * 8 * 4096 ** 2 * 1024 * 16
    assert f["attention"] * 2 == f["attention_full"] and f["total"] == f["dense"] + f["attention"]


def test_benchmark_quick_cpu(tmp_path):
    """benchmarks/models.py runs end to end on CPU and writes its json/md."""
    import json  # noqa: PLC0415
    import sys  # noqa: PLC0415

    sys.path.insert(0, str(ROOT))
    from benchmarks import models as bench  # noqa: PLC0415

    rc = bench.main(["--device", "cpu", "--quick", "--lengths", "32", "--max-length", "64",
                     "--repeats", "1", "--peak-size", "128", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "models_cpu.json").read_text())
    assert res["rows"][0]["status"] == "ok" and res["rows"][0]["mfu"] > 0
    assert res["largest_L"]["L"] == 64 and (tmp_path / "models_cpu.md").exists()


@pytest.mark.parametrize("shape", [(64, 48), (4, 16, 48)])
def test_dense_dot_general_matches_lax_and_its_gradients(shape):
    """recis_jax.models.dots: on the CPU bfloat16 Dense layers take a custom VJP (weight
    gradient on a transposed copy). Values are lax.dot_general's; gradients are the exact
    float32 products rounded once to bfloat16 (autodiff's own weight gradient of a 3-D
    bfloat16 input is further off: 0.40 vs 0.06 at magnitudes ~29)."""
    from recis_jax.models.dots import dense_dot_general

    rng = np.random.default_rng(len(shape))
    x = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((shape[-1], 24)) * 0.1, jnp.bfloat16)
    dn = (((x.ndim - 1,), (0,)), ((), ()))
    cot = jnp.asarray(rng.standard_normal(shape[:-1] + (24,)), jnp.bfloat16)

    def loss(dot):
        return lambda x, w: jnp.sum(dot(x, w, dn).astype(jnp.float32) * cot.astype(jnp.float32))

    np.testing.assert_array_equal(np.asarray(dense_dot_general(x, w, dn), np.float32),
                                  np.asarray(jax.lax.dot_general(x, w, dn), np.float32))
    dx, dw = jax.jit(jax.grad(loss(dense_dot_general), argnums=(0, 1)))(x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16 and dx.shape == x.shape and dw.shape == w.shape
    xf, wf, cf = (np.asarray(v, np.float32) for v in (x, w, cot))
    k = shape[-1]
    exact_dw = xf.reshape(-1, k).T @ cf.reshape(-1, 24)
    exact_dx = cf @ wf.T
    # one bfloat16 rounding of the exact result: relative 2^-8
    np.testing.assert_allclose(np.asarray(dw, np.float32), exact_dw, rtol=2 ** -8, atol=1e-3)
    np.testing.assert_allclose(np.asarray(dx, np.float32), exact_dx, rtol=2 ** -8, atol=1e-3)
    # The custom VJP is really taken on the CPU (and nowhere else, and not for float32).
    jaxpr = str(jax.make_jaxpr(loss(dense_dot_general))(x, w))
    assert ("custom_vjp" in jaxpr) == (jax.default_backend() == "cpu")
    assert "custom_vjp" not in str(jax.make_jaxpr(loss(dense_dot_general))(x.astype(jnp.float32),
                                                                          w.astype(jnp.float32)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_is_nn_dense_with_a_float32_bias_gradient(dtype):
    """layers.Dense: nn.Dense's parameters and forward; the bias gradient of 8192 rows of
    ones is exactly 8192 (autodiff of nn.Dense's bfloat16 add sums in bfloat16 on the
    CPU, which stalls at 2048)."""
    from recis_jax.models.layers import Dense

    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4096, 16)), jnp.float32)
    ours, ref = Dense(8, dtype=dtype), flax.linen.Dense(8, dtype=dtype)
    p_ours, p_ref = ours.init(jax.random.key(1), x), ref.init(jax.random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, p_ours, p_ref)
    np.testing.assert_array_equal(np.asarray(ours.apply(p_ours, x), np.float32),
                                  np.asarray(ref.apply(p_ref, x), np.float32))
    g = jax.jit(jax.grad(lambda p: jnp.sum(ours.apply(p, x).astype(jnp.float32))))(p_ours)
    np.testing.assert_array_equal(np.asarray(g["params"]["bias"]), np.full(8, 8192, np.float32))
    g_ref = jax.grad(lambda p: jnp.sum(ref.apply(p, x).astype(jnp.float32)))(p_ref)
    np.testing.assert_allclose(np.asarray(g["params"]["kernel"]), np.asarray(g_ref["params"]["kernel"]),
                               rtol=2e-2 if dtype == jnp.bfloat16 else 1e-5, atol=0.5)
