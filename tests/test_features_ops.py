"""recis_jax.features.ops: validation naming the feature, dtype checks at trace, the
host Hash op, structure handling, and fused == per-feature for every elementwise op."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pyarrow as pa
import pytest

import recis_jax  # noqa: F401  (x64)
from recis_jax.features import functional as F
from recis_jax.features import string_hash as S
from recis_jax.features.ops import (
    Bucketize,
    Clip,
    Context,
    Feature,
    FeatureCross,
    FillMissing,
    Hash,
    IDMultiHash,
    Log1p,
    Mod,
    SelectField,
    SelectFields,
    SequenceTruncate,
    Standardize,
)
from recis_jax.ragged import Ragged

CTX = Context("feat", ("col",))


# -- validation at spec construction ---------------------------------------------------------
@pytest.mark.parametrize("op, match", [
    (Bucketize([1.0, 3.0, 2.0]), "sorted"),
    (Bucketize([1.0, float("nan")]), "finite"),
    (Bucketize([float("-inf"), 1.0]), "finite"),
    (Bucketize([]), "non-empty"),
    (Mod(0), "mod_value"),
    (Mod(-3), "mod_value"),
    (Mod(2.5), "mod_value"),
    (IDMultiHash([10, 10, 10, 10, 10]), "1 to 4"),
    (IDMultiHash([]), "1 to 4"),
    (IDMultiHash([10, 0]), "positive"),
    (SequenceTruncate(seq_len=0), "seq_len"),
    (SequenceTruncate(seq_len=-2), "seq_len"),
    (SequenceTruncate(truncate_side="middle"), "truncate_side"),
    (SequenceTruncate(n_dims=4), "n_dims"),
    (SequenceTruncate(check_length=True), "check_length"),
    (Hash("sha1"), "hash_type"),
    (Standardize(0.0, 0.0), "std"),
    (Clip(2.0, 1.0), "min_value"),
    (FillMissing(float("nan")), "finite"),
    (FeatureCross(capacity=-1), "capacity"),
])
def test_bad_parameters_name_the_feature(op, match):
    sel = SelectFields(["a", "b"]) if isinstance(op, FeatureCross) else SelectField("x")
    with pytest.raises(ValueError, match=rf"feature 'my_feat'.*{match}"):
        Feature("my_feat", [sel, op])
    with pytest.raises(ValueError, match="'my_feat'"):
        Feature("my_feat").add_op(sel).add_op(op)


@pytest.mark.parametrize("ops, match", [
    ([Mod(3)], "first op must be SelectField"),
    ([SelectField("a"), SelectField("b")], "only be the first"),
    ([SelectField("a"), Mod(3), Hash("farm")], "Hash runs on the host"),
    ([SelectField("a"), FeatureCross()], "FeatureCross must come right after SelectFields"),
    ([SelectFields(["a", "b", "c"]), FeatureCross()], "exactly two"),
    ([SelectFields(["a", "b"]), Mod(3)], "followed by FeatureCross"),
    ([SelectField("a"), IDMultiHash([4]), Mod(3)], "IDMultiHash must be the last"),
    ([SelectField("")], "non-empty"),
    ([SelectField("a", dim=5)], "dim"),
])
def test_bad_chains(ops, match):
    with pytest.raises(ValueError, match=rf"feature 'f'.*{match}"):
        Feature("f", ops)


def test_feature_chaining_and_config():
    f = Feature("u").add_op(SelectField("uid")).add_op(Mod(mod_value=10))
    assert f.inputs == ("uid",) and f.ops == [SelectField("uid"), Mod(10)]
    cfg = ml_collections.ConfigDict({"name": "c", "ops": [
        {"op": "SelectFields", "input_list": ["a", "b"]}, {"op": "FeatureCross"}, {"op": "Mod", "mod_value": 7}]})
    g = Feature.from_config(cfg)
    assert g.inputs == ("a", "b") and isinstance(g.ops[1], FeatureCross) and g.ops[2] == Mod(7)
    with pytest.raises(ValueError, match="unknown op 'Nope'"):
        Feature.from_config({"name": "c", "ops": [{"op": "SelectField", "name": "a"}, {"op": "Nope"}]})
    with pytest.raises(ValueError, match=r"feature 'c'.*ops\[1\] \(Mod\)"):
        Feature.from_config({"name": "c", "ops": [{"op": "SelectField", "name": "a"}, {"op": "Mod", "m": 3}]})
    # RecIS keyword names port one to one.
    Feature("s", [SelectField("s", dim=2), SequenceTruncate(seq_len=20, truncate=True, truncate_side="right",
                                                             check_length=False, n_dims=2, dtype=np.int64)])
    Feature("m", [SelectField("m"), IDMultiHash(num_buckets=[20000, 20000, 10000, 500], prefix="mh")])
    Feature("b", [SelectField("b"), Bucketize(boundary=[18, 25, 35])])
    Feature("h", [SelectField("h"), Hash(hash_type="murmur")])


# -- dtype checks at trace ---------------------------------------------------------------------
def test_wrong_dtypes_raise_type_error_naming_feature_and_input():
    f32, i64 = jnp.ones(4, jnp.float32), jnp.arange(4, dtype=jnp.int64)
    cases = [
        (Mod(5), f32, "Mod expects integer IDs, got dtype float32"),
        (IDMultiHash([5]), f32, "IDMultiHash expects integer IDs"),
        (Bucketize([1.0]), jnp.ones(4, bool), "Bucketize expects a real numeric input, got dtype bool"),
        (FillMissing(), jnp.ones(4, bool), "FillMissing expects a real numeric"),
        (Mod(5), np.array([b"a"], object), r"Mod expects integer IDs, got dtype object \(strings need Hash first"),
        (Mod(5), [i64, i64], "Mod takes one input"),
    ]
    for op, x, match in cases:
        with pytest.raises(TypeError, match=rf"feature 'feat' \(input 'col'\): {match}"):
            op.apply(x, CTX)
    with pytest.raises(TypeError, match="feature 'feat'.*Mod expects integer IDs"):  # at first trace
        jax.jit(lambda v: Mod(5).apply(v, CTX))(f32)
    with pytest.raises(TypeError, match="SequenceTruncate\\(n_dims=3\\) expects a Ragged of ragged_rank 2"):
        SequenceTruncate(2, n_dims=3).apply(Ragged.from_lists([[1]]), CTX)
    with pytest.raises(TypeError, match="expects a Ragged of ragged_rank 1, got Array"):
        SequenceTruncate(2).apply(i64, CTX)
    with pytest.raises(TypeError, match="expects dtype int32"):
        SequenceTruncate(2, dtype=np.int32).apply(Ragged.from_lists([[1]]), CTX)
    with pytest.raises(TypeError, match="SelectField expects dtype int32, got int64"):
        SelectField("col", dtype=np.int32).check(i64, CTX)
    with pytest.raises(TypeError, match="ragged_rank 2, got ragged_rank 1"):
        SelectField("col", dim=3).check(Ragged.from_lists([[1]]), CTX)
    ctx2 = Context("x", ("a", "b"))
    with pytest.raises(TypeError, match="FeatureCross input 'b' must"):
        FeatureCross().apply([Ragged.from_lists([[1]]), jnp.ones((1, 1), jnp.float32)], ctx2)
    with pytest.raises(ValueError, match=r"feature 'x': FeatureCross inputs 'a' \(1 rows\) and 'b' \(2 rows\)"):
        FeatureCross().apply([Ragged.from_lists([[1]]), Ragged.from_lists([[1], [2]])], ctx2)
    with pytest.raises(TypeError, match="Hash expects strings"):
        Hash("farm").host_apply(np.arange(3), CTX)


# -- ops on each structure ----------------------------------------------------------------------
def test_value_ops_keep_structure_and_zero_padding():
    r = Ragged.from_lists([[5, -7], [], [1]], capacity=5, weights=[[1.0, 2.0], [], [3.0]])
    out = Mod(4).apply(r, CTX)
    assert out.to_lists() == [[1, 1], [], [1]] and out.weights is r.weights
    fr = Ragged.from_lists([[0.5, 2.0], [], [9.0]], dtype=np.float32, capacity=5)
    b = Bucketize([-1.0, 1.0]).apply(fr, CTX)  # padding (0.0) would bucketize to 1
    np.testing.assert_array_equal(b.values, [1, 2, 2, 0, 0])
    assert b.values.dtype == jnp.int64
    r2 = Ragged.from_lists([[[1, 2], [3]], [[-4]]], ragged_rank=2, inner_capacity=6)
    assert Mod(3).apply(r2, CTX).to_lists() == [[[1, 2], [0]], [[F.mod(jnp.int64(-4), 3).item()]]]
    mh = IDMultiHash([1000, 1000]).apply(jnp.array([[1001], [1002]]), CTX)
    assert set(mh) == {"multi_hash_0", "multi_hash_1"}
    np.testing.assert_array_equal(mh["multi_hash_1"], [[3], [6]])


def test_feature_cross_op_dense_inputs_and_capacity():
    x = jnp.array([1, 2, 3])  # [B] IDs count as one ID per row
    y = jnp.array([[1], [2], [3]])
    out, needed = FeatureCross().apply([x, y], Context("c", ("x", "y")))
    assert needed is None
    np.testing.assert_array_equal(F.mod(out.values[:3], 1000), [216, 2, 783])
    out, needed = FeatureCross(capacity=2).apply([x, y], Context("c", ("x", "y")))
    assert int(needed) == 3 and out.capacity == 2 and out.to_lists()[2] == []


def test_sequence_truncate_op():
    r = Ragged(np.arange(1, 11, dtype=np.int64), np.array([0, 4, 7, 10], np.int32))
    assert SequenceTruncate(2).apply(r, CTX).to_lists() == [[3, 4], [6, 7], [9, 10]]
    assert SequenceTruncate(2, truncate_side="right").apply(r, CTX).to_lists() == [[1, 2], [5, 6], [8, 9]]
    assert SequenceTruncate(2, truncate=False).apply(r, CTX) is r


# -- host Hash ------------------------------------------------------------------------------------
def test_hash_host_inputs():
    words = [b"a", b"hello world", "caf\u00e9", b""]
    want = S.hash_strings(words, "murmur")
    op = Hash("murmur")
    r = Ragged(np.array(words + [None, None], object), np.array([0, 1, 1, 4], np.int32),
               np.arange(6, dtype=np.float32))
    out = op.host_apply(r, CTX)
    np.testing.assert_array_equal(out.values, np.concatenate([want, [0, 0]]))
    assert out.values.dtype == np.int64 and out.weights is r.weights
    np.testing.assert_array_equal(out.row_splits, r.row_splits)
    np.testing.assert_array_equal(op.host_apply(np.array(words, object).reshape(2, 2), CTX), want.reshape(2, 2))
    np.testing.assert_array_equal(op.host_apply(pa.array(["a", "hello world"]), CTX), want[:2])
    lists = op.host_apply(pa.array([["a"], [], ["hello world", "a"]]), CTX)
    assert lists.to_lists() == [[want[0]], [], [want[1], want[0]]]
    assert Hash("farm").host_apply([b"a"], CTX)[0] == -5528939962900187677


# -- fused == per-feature -----------------------------------------------------------------------------
def _per_feature_vs_fused(ops, values):
    ctxs = [Context(f"f{i}", (f"c{i}",)) for i in range(len(ops))]
    per = [op.apply(v, c) for op, v, c in zip(ops, values, ctxs)]
    fused = jax.jit(lambda vs: type(ops[0]).apply_fused(ops, vs, ctxs))(values)
    for a, b in zip(per, fused):
        la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
        assert len(la) == len(lb)
        for u, v in zip(la, lb):
            assert u.dtype == v.dtype
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    return per


def test_fused_matches_per_feature_for_every_value_op():
    rng = np.random.default_rng(0)
    ids = [rng.integers(-(2**63), 2**63 - 1, size=s, dtype=np.int64, endpoint=True) for s in (16, 8)]
    id_values = [jnp.asarray(ids[0]), jnp.asarray(ids[1].reshape(4, 2)),
                 Ragged.from_lists([[-1, 5], [], [2**62, -(2**63)]], capacity=6)]
    _per_feature_vs_fused([Mod(1), Mod(1000), Mod(2**63 - 1)], id_values)
    _per_feature_vs_fused([IDMultiHash([7, 100]), IDMultiHash([1, 2**40]), IDMultiHash([3, 5])], id_values)
    b1, b2, b3 = [0.5], [-2.0, -1.0, -1.0, 0.0, 3.5], list(np.sort(rng.normal(size=33)))
    xs = rng.normal(0, 2, 20).astype(np.float32)
    xs[:5] = [-2.0, -1.0, 0.0, 3.5, 0.5]  # boundary-equal
    xs[5:8] = [np.nan, np.inf, -np.inf]
    fl = [jnp.asarray(xs), jnp.asarray(xs[:12].reshape(3, 4)),
          Ragged.from_lists([[np.nan, -1.0], [], [3.5]], dtype=np.float32, capacity=5)]
    per = _per_feature_vs_fused([Bucketize(b1), Bucketize(b2), Bucketize(b3)], fl)
    np.testing.assert_array_equal(per[0], np.where(np.isnan(xs), 1, np.searchsorted(np.float32(b1), xs, "right")))
    _per_feature_vs_fused([FillMissing(1.0), FillMissing(-2.0), FillMissing(0.0)], fl)
    _per_feature_vs_fused([Clip(-1.0, 1.0), Clip(0.0, 2.0), Clip(-3.0, 0.5)], fl)
    _per_feature_vs_fused([Log1p(), Log1p(-0.5), Log1p(0.0)], fl)
    _per_feature_vs_fused([Standardize(1.0, 2.0), Standardize(-1.0, 0.5), Standardize(0.0, 3.0)], fl)
