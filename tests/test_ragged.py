import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pytest

from recis_jax.ragged import Ragged, capacity_bucket, concat_rows, slice_rows

ROWS = [[5, -1], [], [7], [2**63 - 1, -(2**63), 0]]


def test_from_lists_round_trip_and_padding():
    r = Ragged.from_lists(ROWS, capacity=8).validate()
    assert r.nrows == 4 and r.capacity == 8
    assert r.row_splits.dtype == np.int32 and r.values.dtype == np.int64
    assert r.to_lists() == ROWS
    assert r.values[6:].tolist() == [0, 0]
    assert r.row_lengths().tolist() == [2, 0, 1, 3]
    assert r.value_mask().tolist() == [True] * 6 + [False] * 2
    with pytest.raises(ValueError, match="exceed capacity"):
        Ragged.from_lists(ROWS, capacity=5)


def test_value_rowids_numpy_and_jit_agree():
    r = Ragged.from_lists(ROWS, capacity=9)
    expect = [0, 0, 2, 3, 3, 3, 4, 4, 4]  # padding -> nrows
    assert r.value_rowids().tolist() == expect
    got = jax.jit(lambda x: x.value_rowids())(jax.device_put(r))
    assert got.tolist() == expect
    # Empty rows at the end and a full capacity.
    r2 = Ragged.from_lists([[1], [], []], capacity=1)
    assert r2.value_rowids().tolist() == [0]
    assert jax.jit(lambda x: x.value_rowids())(r2).tolist() == [0]


def test_dense_round_trip_in_jit():
    rng = np.random.default_rng(0)
    dense = rng.integers(-100, 100, (6, 5))
    mask = rng.random((6, 5)) < 0.5
    mask[2] = False  # an empty row

    @jax.jit
    def f(d, m):
        r = Ragged.from_dense(d, m, capacity=32)
        return r, r.to_dense(5, pad_value=-7)

    r, (back, m2) = f(dense, mask)
    assert r.capacity == 32 and int(r.num_values()) == mask.sum()
    expect_rows = [dense[i][mask[i]].tolist() for i in range(6)]
    assert r.to_lists() == expect_rows
    for i, row in enumerate(expect_rows):
        assert back[i, : len(row)].tolist() == row
        assert (np.asarray(back[i, len(row):]) == -7).all()
        assert np.asarray(m2[i]).sum() == len(row)


def test_to_dense_truncates_and_weights():
    r = Ragged.from_lists([[1, 2, 3], [4]], weights=[[0.5, 1, 2], [3]], capacity=6)
    d, m, w = r.to_dense(2)
    assert d.tolist() == [[1, 2], [4, 0]] and m.tolist() == [[True, True], [True, False]]
    assert w.dtype == np.float32 and w.tolist() == [[0.5, 1.0], [3.0, 0.0]]


def test_pytree_leaves_and_jit_shapes():
    r = Ragged.from_lists(ROWS, capacity=8, weights=[[1, 2], [], [3], [4, 5, 6]])
    leaves = jax.tree_util.tree_leaves(r)
    assert len(leaves) == 3
    out = jax.jit(lambda x: jax.tree_util.tree_map(lambda a: a * 2, x))(r)
    assert isinstance(out, Ragged) and out.values.shape == (8,)
    nested = Ragged.from_lists([[[1], [2, 3]], [], [[4]]], ragged_rank=2)
    assert len(jax.tree_util.tree_leaves(nested)) == 3
    assert jax.jit(lambda x: x)(nested).to_lists() == [[[1], [2, 3]], [], [[4]]]


def test_from_arrow_zero_copy_sliced_null_and_nested():
    arr = pa.array([[1, 2], [3], [], [4, 5, 6]], pa.list_(pa.int64()))
    r = Ragged.from_arrow(arr)
    assert r.to_lists() == [[1, 2], [3], [], [4, 5, 6]]
    buf = arr.values.buffers()[1]
    assert np.shares_memory(r.values, np.frombuffer(buf, np.int64))  # zero-copy values
    sliced = Ragged.from_arrow(arr.slice(1, 3))
    assert sliced.to_lists() == [[3], [], [4, 5, 6]] and sliced.row_splits[0] == 0
    with_null = Ragged.from_arrow(pa.array([[1], None, [2, 3]]), capacity=16)
    assert with_null.to_lists() == [[1], [], [2, 3]] and with_null.capacity == 16
    with pytest.raises(ValueError, match="null values"):
        Ragged.from_arrow(pa.array([[1, None]]))
    nested = Ragged.from_arrow(pa.array([[[1], [2, 3]], None, [[]]]))
    assert nested.ragged_rank == 2 and nested.to_lists() == [[[1], [2, 3]], [], [[]]]
    large = Ragged.from_arrow(pa.array([[1.5], [2.5]], pa.large_list(pa.float64())), value_dtype=np.float32)
    assert large.values.dtype == np.float32
    chunked = Ragged.from_arrow(pa.chunked_array([pa.array([[1]]), pa.array([[2, 3]])]))
    assert chunked.to_lists() == [[1], [2, 3]]
    with pytest.raises(TypeError, match="expected a list array"):
        Ragged.from_arrow(pa.array([1, 2]))


def test_slice_and_concat_rows():
    a = Ragged.from_lists(ROWS, capacity=10)
    b = Ragged.from_lists([[9], [8, 8]])
    assert slice_rows(a, 1, 4).to_lists() == ROWS[1:4]
    assert concat_rows([slice_rows(a, 2, 4), b]).to_lists() == ROWS[2:4] + [[9], [8, 8]]
    n1 = Ragged.from_lists([[[1], [2]], [[3]]], ragged_rank=2)
    n2 = Ragged.from_lists([[], [[4, 5]]], ragged_rank=2)
    assert concat_rows([slice_rows(n1, 1, 2), n2]).to_lists() == [[[3]], [], [[4, 5]]]


def test_capacity_bucket_few_shapes():
    assert capacity_bucket(0) == 16 and capacity_bucket(17) == 32 and capacity_bucket(1024, 16) == 1024
    caps = {capacity_bucket(n, 64) for n in range(0, 100_000, 7)}
    assert len(caps) <= 12
    with pytest.raises(ValueError):
        capacity_bucket(-1)


def test_validate_catches_bad_splits():
    with pytest.raises(ValueError, match="non-decreasing"):
        Ragged(np.zeros(4), np.array([0, 3, 2])).validate("f")
    with pytest.raises(ValueError, match="exceed capacity"):
        Ragged(np.zeros(2), np.array([0, 3])).validate("f")
    with pytest.raises(ValueError, match=r"row_splits\[0\]"):
        Ragged(np.zeros(2), np.array([1, 2])).validate("f")


def test_int64_splits_when_capacity_needs_it():
    from recis_jax.ragged import splits_dtype

    assert splits_dtype(2**31 - 1) == np.int32 and splits_dtype(2**31) == np.int64


def test_from_dense_jit_no_f64():
    jaxpr = jax.make_jaxpr(lambda d, m: Ragged.from_dense(d, m, weights=d.astype(jnp.float32)))(
        jnp.zeros((2, 3), jnp.int64), jnp.ones((2, 3), bool))
    assert "f64" not in str(jaxpr)
