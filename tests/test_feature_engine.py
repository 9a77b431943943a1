"""FeatureEngine end to end: host + device stages, pass-through, fusion modes agree,
overflow reporting, errors, and no float64 in the jitted stage."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import recis_jax  # noqa: F401  (x64)
from recis_jax.features import (
    HOST_PREFIX,
    OVERFLOW_KEY,
    Bucketize,
    Feature,
    FeatureCross,
    FeatureEngine,
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
from recis_jax.features import functional as F
from recis_jax.features import string_hash as S
from recis_jax.ragged import Ragged
from tests.test_features_functional import (
    np_bucketize,
    np_feature_cross,
    np_mod,
    np_multi_hash,
    np_truncate,
    random_ragged,
)


def features():
    return [
        Feature("uid").add_op(SelectField("uid")).add_op(Mod(1000)),
        Feature("iid", [SelectField("iid"), Mod(77)]),
        Feature("age", [SelectField("age"), FillMissing(0.0), Log1p(), Bucketize([0.5, 1.0, 2.0, 3.0])]),
        Feature("age_raw", [SelectField("age"), FillMissing(1.0), Bucketize([0.5, 1.5, 2.0, 3.0, 9.0])]),
        Feature("age_std", [SelectField("age"), FillMissing(2.0), Standardize(1.0, 2.0)]),
        Feature("u_x_i", [SelectFields(["uid", "iid"]), FeatureCross(capacity=3), Mod(1000)]),
        Feature("cross_all", [SelectFields(["uid", "iid"]), FeatureCross()]),
        Feature("iid_mh", [SelectField("iid"), IDMultiHash([10, 20])]),
        Feature("name", [SelectField("name"), Hash("murmur"), Mod(100)]),
        Feature("seq", [SelectField("seq"), SequenceTruncate(2)]),
    ]


def batch():
    return {
        "uid": Ragged.from_lists([[1, 2, 1], [3], []], capacity=4, weights=[[0.5, 2.0, 9.0], [1.0], []]),
        "iid": np.array([[5], [6], [-7]], np.int64),
        "age": np.array([1.0, np.nan, 5.0], np.float32),
        "name": Ragged(np.array([b"hello world", b"a", b"b", b""], object), np.array([0, 1, 3, 3], np.int32)),
        "seq": Ragged.from_lists([[1, 2, 3], [4], [5, 6, 7, 8]]),
        "label": np.array([1.0, 0.0, 1.0], np.float32),  # no feature reads it: passes through
    }


def umod(v, m):
    """RecIS Mod on one ID: the int64 taken as unsigned."""
    return (int(v) % 2**64) % m


def cross(a, b):
    return int(S.murmurhash64a_u64x2(np.int64(a), np.int64(b)))


@pytest.fixture(scope="module")
def outputs():
    """The same batch through every fuse mode (one jit each)."""
    outs = {}
    for fuse in (None, False, True):
        eng = FeatureEngine(features(), fuse=fuse)
        outs[fuse] = jax.jit(eng)(eng.host_transform(batch()))
    return outs


def test_engine_end_to_end(outputs):
    out = outputs[None]
    b = batch()
    assert set(out) == {"uid", "iid", "age", "age_raw", "age_std", "u_x_i", "cross_all", "iid_mh_multi_hash_0",
                        "iid_mh_multi_hash_1", "name", "seq", "label", OVERFLOW_KEY}
    np.testing.assert_array_equal(out["label"], b["label"])  # pass-through, untouched
    assert out["uid"].to_lists() == [[1, 2, 1], [3], []]
    np.testing.assert_array_equal(out["uid"].weights, b["uid"].weights)
    np.testing.assert_array_equal(out["iid"], F.mod(b["iid"], 77))
    np.testing.assert_array_equal(out["iid"], [[5], [6], [umod(-7, 77)]])
    # age = [1, nan, 5]: fill 0 -> log1p -> [0.69, 0, 1.79] -> bucketize
    np.testing.assert_array_equal(out["age"], [1, 0, 2])
    assert out["age"].dtype == jnp.int64
    np.testing.assert_array_equal(out["age_raw"], [1, 1, 4])  # fill 1.0; 1.0 -> 1, 5.0 -> 4
    np.testing.assert_allclose(out["age_std"], [0.0, 0.5, 2.0])
    # cross: distinct uid (first weight kept) x iid; row 2 has no uid -> empty
    full = [[cross(1, 5), cross(2, 5)], [cross(3, 6)], []]
    assert out["cross_all"].to_lists() == full
    np.testing.assert_array_equal(out["cross_all"].weights[:3], [0.5, 2.0, 1.0])
    assert out["u_x_i"].to_lists() == [[umod(v, 1000) for v in r] for r in full]
    assert int(out[OVERFLOW_KEY]["u_x_i"]) == 3  # needed 3 == capacity 3: no overflow
    assert set(out[OVERFLOW_KEY]) == {"u_x_i"}
    want_mh = F.multi_hash(b["iid"], [10, 20])
    np.testing.assert_array_equal(out["iid_mh_multi_hash_0"], want_mh[0])
    np.testing.assert_array_equal(out["iid_mh_multi_hash_1"], want_mh[1])
    h = S.hash_strings([b"hello world", b"a", b"b"], "murmur")
    assert out["name"].to_lists() == [[umod(h[0], 100)], [umod(h[1], 100), umod(h[2], 100)], []]
    assert out["seq"].to_lists() == [[2, 3], [4], [7, 8]]


def test_fuse_modes_agree(outputs):
    for fuse in (False, True):
        a, b = jax.tree.leaves(outputs[None]), jax.tree.leaves(outputs[fuse])
        assert len(a) == len(b)
        for u, v in zip(a, b):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_engine_random_against_numpy():
    """Criteo-like random batch (full-range and negative IDs, empty rows, duplicates,
    NaN, boundary-equal values) through the default engine under jit."""
    rng = np.random.default_rng(7)
    b, bounds = 16, (-1.0, 0.0, 0.0, 2.5, 10.0)
    ids = rng.integers(-(2**63), 2**63 - 1, size=b, dtype=np.int64, endpoint=True)
    rows2, _, r2 = random_ragged(rng, b, 4, 64, lo=-3, hi=3)
    rows3, w3, r3 = random_ragged(rng, b, 3, 48, weights=True)
    seq_rows, _, seq = random_ragged(rng, b, 9, 160, empty_p=0.1)
    dense = rng.normal(0, 5, b).astype(np.float32)
    dense[:6] = [np.nan, -1.0, 0.0, 2.5, 10.0, np.nan]
    eng = FeatureEngine([
        Feature("c1", [SelectField("c1"), Mod(999_983)]),
        Feature("c2", [SelectField("c2"), Mod(7)]),
        Feature("d", [SelectField("d"), FillMissing(0.5), Bucketize(bounds)]),
        Feature("d2", [SelectField("d"), Bucketize(bounds[1:])]),
        Feature("x", [SelectFields(["c2", "c3"]), FeatureCross(), Mod(1000)]),
        Feature("mh", [SelectField("c1"), IDMultiHash([100, 1000, 7, 1])]),
        Feature("s", [SelectField("s"), SequenceTruncate(3, truncate_side="right")]),
    ])
    out = jax.jit(eng)({"c1": ids, "c2": r2, "c3": r3, "d": dense, "s": seq})
    np.testing.assert_array_equal(out["c1"], np_mod(ids, 999_983))
    assert out["c2"].to_lists() == [np_mod(np.asarray(r, np.int64), 7).tolist() for r in rows2]
    np.testing.assert_array_equal(out["d"], np_bucketize(np.where(np.isnan(dense), 0.5, dense), bounds))
    np.testing.assert_array_equal(out["d2"], np_bucketize(dense, bounds[1:]))
    want_ids, want_w = np_feature_cross(rows2, rows3, None, w3)
    assert out["x"].to_lists() == [np_mod(np.asarray(r, np.int64), 1000).tolist() for r in want_ids]
    n = int(out["x"].row_splits[-1])
    np.testing.assert_array_equal(out["x"].weights[:n], np.asarray([w for r in want_w for w in r], np.float32))
    for j, want in enumerate(np_multi_hash(ids, [100, 1000, 7, 1])):
        np.testing.assert_array_equal(out[f"mh_multi_hash_{j}"], want)
    assert out["s"].to_lists() == np_truncate(seq_rows, 3, "right")


def test_overflow_is_reported():
    eng = FeatureEngine([Feature("c", [SelectFields(["a", "b"]), FeatureCross(capacity=2)])])
    x = {"a": Ragged.from_lists([[1, 2, 3], [4]]), "b": Ragged.from_lists([[7], [8, 9]])}
    out = jax.jit(eng)(x)
    assert int(out[OVERFLOW_KEY]["c"]) == 5 > out["c"].capacity  # caller sees needed > capacity
    assert out["c"].to_lists() == [[cross(1, 7), cross(2, 7)], []]


def test_transform_and_host_stage():
    eng = FeatureEngine(features())
    hb = eng.host_transform(batch())
    assert "name" not in hb and HOST_PREFIX + "name" in hb  # strings never reach jit
    assert eng.host_transform(hb).keys() == hb.keys()  # idempotent
    out = eng.transform(batch())
    assert out["seq"].to_lists() == [[2, 3], [4], [7, 8]] and HOST_PREFIX + "name" not in out
    with pytest.raises(TypeError, match="feature 'name'.*host_transform"):
        eng(batch())


def test_shared_string_column_kept_for_device_feature():
    feats = [Feature("h", [SelectField("s"), Hash("farm")]), Feature("h2", [SelectField("s"), Hash("murmur")])]
    eng = FeatureEngine(feats)
    hb = eng.host_transform({"s": np.array([b"a", b"b"], object)})
    assert set(hb) == {HOST_PREFIX + "h", HOST_PREFIX + "h2"}
    out = eng(hb)
    np.testing.assert_array_equal(out["h"], S.hash_strings([b"a", b"b"], "farm"))
    np.testing.assert_array_equal(out["h2"], S.hash_strings([b"a", b"b"], "murmur"))


def test_engine_errors():
    with pytest.raises(ValueError, match="output name 'a' is already produced by feature 'a'"):
        FeatureEngine([Feature("a", [SelectField("x")]), Feature("a", [SelectField("y")])])
    with pytest.raises(ValueError, match="'m_multi_hash_0' is already produced"):
        FeatureEngine([Feature("m", [SelectField("x"), IDMultiHash([3])]),
                       Feature("m_multi_hash_0", [SelectField("y")])])
    with pytest.raises(ValueError, match="feature 'e': no ops"):
        FeatureEngine([Feature("e")])
    with pytest.raises(ValueError, match="feature 'p': SelectFields must be followed"):
        FeatureEngine([Feature("p", [SelectFields(["a", "b"])])])
    eng = FeatureEngine([Feature("c", [SelectFields(["a", "b"]), FeatureCross()])])
    bad = {"a": Ragged.from_lists([[1], [2]]), "b": Ragged.from_lists([[1], [2], [3]])}
    with pytest.raises(ValueError, match=r"feature 'c': FeatureCross inputs 'a' \(2 rows\) and 'b' \(3 rows\)"):
        jax.jit(eng)(bad)
    with pytest.raises(KeyError, match="feature 'c'.*column 'b' is not in the batch"):
        eng({"a": bad["a"]})
    with pytest.raises(TypeError, match="feature 'u'.*holds strings"):
        FeatureEngine([Feature("u", [SelectField("s"), Mod(3)])])({"s": np.array([b"x"], object)})
    with pytest.raises(TypeError, match=r"feature 'u' \(input 's'\): Mod expects integer IDs, got dtype float32"):
        jax.jit(FeatureEngine([Feature("u", [SelectField("s"), Mod(3)])]))({"s": np.ones(2, np.float32)})


def test_from_config():
    cfg = ml_collections.ConfigDict()
    cfg.fuse = False
    cfg.features = [
        {"name": "uid", "ops": [{"op": "SelectField", "name": "uid"}, {"op": "Mod", "mod_value": 10}]},
        {"name": "b", "ops": [{"op": "SelectField", "name": "x"}, {"op": "Bucketize", "boundary": [0.0, 1.0]}]},
    ]
    eng = FeatureEngine.from_config(cfg)
    assert eng.fuse is False and eng.output_names == ("uid", "b")
    out = eng({"uid": np.array([13, -1]), "x": np.array([0.5, 1.0], np.float32)})
    np.testing.assert_array_equal(out["uid"], [3, 5])
    np.testing.assert_array_equal(out["b"], [1, 2])
    with pytest.raises(ValueError, match="feature 'uid'.*mod_value"):
        FeatureEngine.from_config([{"name": "uid", "ops": [{"op": "SelectField", "name": "u"},
                                                           {"op": "Mod", "mod_value": 0}]}])


def test_no_float64_in_device_stage():
    eng = FeatureEngine(features())
    hb = eng.host_transform(batch())
    jaxpr = str(jax.make_jaxpr(eng)(hb))
    assert "f64" not in jaxpr
