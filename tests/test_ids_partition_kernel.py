"""ids_partition: reference and Pallas kernel (interpret on CPU, compiled on GPU) vs NumPy
and vs recis_jax.sharding (mesh.owner_of, exchange.plan).

GPU: `JAX_PLATFORMS=cuda python3 -m pytest -q tests/test_ids_partition_kernel.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recis_jax  # noqa: F401  (x64 on)
from pallas_kernels import dispatch
from pallas_kernels import ids_partition as ip
from recis_jax.sharding import exchange, mesh

ON_GPU = jax.default_backend() == "gpu"
IMPLS = ["reference", "interpret"] + (["pallas"] if ON_GPU else [])
SMALL = ip.Config(block=256)


def run(impl, tables, keys, valid, n, config=None):
    args = (jnp.asarray(tables), jnp.asarray(keys), jnp.asarray(valid))
    if impl == "reference":
        return ip.ids_partition(*args, n, impl="reference")
    return ip.ids_partition_pallas(*args, n, interpret=impl == "interpret", config=config or SMALL)


def make_ids(rng, size):
    """int64 IDs over the whole range, with duplicates and boundary values."""
    keys = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size, dtype=np.int64)
    special = np.array([0, -1, 1, np.iinfo(np.int64).min, np.iinfo(np.int64).max], np.int64)
    keys[:min(size, 5)] = special[:min(size, 5)]
    if size > 10:
        keys[rng.integers(0, size, size // 4)] = keys[rng.integers(0, size, size // 4)]
    tables = rng.integers(0, 5, size).astype(np.int32)
    return tables, keys


def check(p, tables, keys, valid, n):
    owner = np.where(valid, np.asarray(mesh.owner_of(tables, keys, n)), n)
    np.testing.assert_array_equal(np.asarray(p.owner), owner)
    np.testing.assert_array_equal(np.asarray(p.counts), np.bincount(owner, minlength=n + 1)[:n])
    want_perm = np.argsort(owner, kind="stable")
    np.testing.assert_array_equal(np.asarray(p.perm), want_perm)
    starts = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n + 1))])
    np.testing.assert_array_equal(np.asarray(p.starts), starts)
    rank = np.empty(len(keys), np.int64)
    rank[want_perm] = np.arange(len(keys)) - starts[owner[want_perm]]
    np.testing.assert_array_equal(np.asarray(p.rank), rank)
    for arr in p:
        assert arr.dtype == jnp.int32


@pytest.mark.parametrize("impl", IMPLS)
class TestIdsPartition:

    @pytest.mark.parametrize("size,n", [(1000, 8), (1024, 3), (777, 64), (300, 1), (513, 16)])
    def test_random(self, impl, size, n):
        rng = np.random.default_rng(size + n)
        tables, keys = make_ids(rng, size)
        valid = rng.random(size) < 0.85
        check(run(impl, tables, keys, valid, n), tables, keys, valid, n)

    def test_all_invalid_and_tiny(self, impl):
        rng = np.random.default_rng(1)
        tables, keys = make_ids(rng, 5)
        for valid in (np.zeros(5, bool), np.ones(5, bool)):
            check(run(impl, tables, keys, valid, 4), tables, keys, valid, 4)
        check(run(impl, tables[:0], keys[:0], np.zeros(0, bool), 4), tables[:0], keys[:0],
              np.zeros(0, bool), 4)

    def test_matches_exchange_plan(self, impl):
        # rank is the bucket position exchange.plan assigns (its slot = owner * cap + rank).
        rng = np.random.default_rng(2)
        tables, keys = make_ids(rng, 600)
        valid = rng.random(600) < 0.9
        n, cap = 4, 200
        p = run(impl, tables, keys, valid, n)
        route = exchange.plan(mesh.owner_of(tables, keys, n), jnp.asarray(valid), n, cap)
        fits = valid & (np.asarray(p.rank) < cap)
        slot = np.where(fits, np.asarray(p.owner) * cap + np.asarray(p.rank), n * cap + np.arange(600))
        np.testing.assert_array_equal(slot, np.asarray(route.slot))

    def test_default_block(self, impl):
        rng = np.random.default_rng(3)
        tables, keys = make_ids(rng, 3000)
        valid = np.ones(3000, bool)
        check(run(impl, tables, keys, valid, 8, config=ip.Config()), tables, keys, valid, 8)


def test_many_shards_reference_fallback_and_dispatch(monkeypatch):
    rng = np.random.default_rng(4)
    tables, keys = make_ids(rng, 50)
    valid = np.ones(50, bool)
    check(ip.ids_partition_pallas(tables, keys, valid, 5000, interpret=True), tables, keys, valid, 5000)
    if not ON_GPU:
        monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
        check(ip.ids_partition(tables, keys, valid, 3), tables, keys, valid, 3)
        with pytest.raises(ValueError, match="needs a GPU"):
            ip.ids_partition(tables, keys, valid, 3, impl="pallas")
