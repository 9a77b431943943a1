"""Row-sharded embedding tables: the sharded step on 2/4/8 fake CPU devices against the
1-device EmbeddingEngine step on the same global batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recis_jax.embedding import hashtable as ht
from recis_jax.embedding.engine import EmbeddingEngine, EmbeddingOption
from recis_jax.optim import sparse_adam, sparse_sgd
from recis_jax.optim.combined import apply_gradients
from recis_jax.ragged import Ragged
from recis_jax.sharding import ShardedEmbeddingEngine, make_mesh, make_train_step, owner_of, put, split_features

B, MAX_LEN, CAP = 16, 5, 80  # global batch rows, IDs per row, values capacity per feature
OPTIONS = {"f1": EmbeddingOption(4, combiner="sum", num_rows=256),
           "f2": EmbeddingOption(4, combiner="sum", num_rows=256)}  # merged: one table, indices 0, 1


def model_loss(params, pooled, labels):
    logits = pooled["f1"] @ params["w1"] + pooled["f2"] @ params["w2"] + params["b"]
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))


def init_params():
    return {"w1": jnp.linspace(-1.0, 1.0, 4, dtype=jnp.float32), "w2": jnp.linspace(0.5, -0.5, 4, dtype=jnp.float32),
            "b": jnp.float32(0.1)}


def make_batches(num, seed, draw):
    """num global batches: {"features": {f: Ragged}, "labels": float32 [B]} (numpy)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        feats = {f: Ragged.from_lists([list(draw(rng, rng.integers(0, MAX_LEN + 1))) for _ in range(B)],
                                      capacity=CAP) for f in OPTIONS}
        out.append({"features": feats, "labels": rng.integers(0, 2, B).astype(np.float32)})
    return out


def uniform_ids(rng, k):
    return rng.integers(-50, 50, k) * 1_000_003


def zipf_ids(rng, k):
    return np.minimum(rng.zipf(1.3, k), 10_000) * 7919 - 3


@functools.cache
def adversarial_vocab(n, table=0, size=64):
    """IDs that all hash to shard 0 of n (searched with the owner function)."""
    cand = np.arange(1, 100_000, dtype=np.int64) * 104729
    own = np.asarray(owner_of(np.full(cand.shape, table, np.int32), cand, n))
    return cand[own == 0][:size]


# Optimizer pairs (sparse, dense), module-level so compiled steps are shared by tests.
OPTS = {"sgd": (sparse_sgd(0.5), optax.sgd(0.1)), "adam": (sparse_adam(0.05), optax.sgd(0.1)),
        "zero": (sparse_sgd(0.0), optax.sgd(0.0))}


@functools.cache
def reference_step(opt_name, merge=True):
    engine = EmbeddingEngine(OPTIONS, merge=merge)
    sparse_opt, dense_tx = OPTS[opt_name]

    @jax.jit
    def step(params, opt_state, tables, batch, gstep):
        feats = batch["features"]
        tables, lk = engine.lookup(tables, feats)

        def loss(p, rows):
            return model_loss(p, engine.pool(rows, lk, feats), batch["labels"])

        l, (gp, gr) = jax.value_and_grad(loss, argnums=(0, 1))(params, lk.rows)
        params, opt_state, tables, _ = apply_gradients(engine, sparse_opt, dense_tx, params, opt_state, gp, tables,
                                                       lk, gr, gstep)
        return params, opt_state, tables, l

    return engine, step


def reference_run(batches, opt_name, merge=True):
    """The 1-device EmbeddingEngine step over the global batches: (losses, table export,
    params); the export is {table: export} when merge=False (several tables)."""
    engine, step = reference_step(opt_name, merge)
    sparse_opt, dense_tx = OPTS[opt_name]
    params = init_params()
    opt_state, tables = dense_tx.init(params), engine.init(sparse_opt)
    losses = []
    for t, b in enumerate(batches):
        params, opt_state, tables, l = step(params, opt_state, tables, jax.device_put(b), jnp.int32(t))
        losses.append(float(l))
    exports = {p: ht.export(ts.table) for p, ts in tables.items()}
    return np.array(losses, np.float32), next(iter(exports.values())) if merge else exports, params


@functools.cache
def sharded_step(n, opt_name, rows_per_shard=None, bucket_capacity=None, merge=True):
    sharded = ShardedEmbeddingEngine(EmbeddingEngine(OPTIONS, merge=merge), make_mesh(n), rows_per_shard=rows_per_shard,
                                     bucket_capacity=bucket_capacity)
    step = make_train_step(sharded, lambda p, pooled, b: model_loss(p, pooled, b["labels"]), *OPTS[opt_name])
    return sharded, step


def put_batch(mesh, b):
    n = mesh.size
    per_dev = split_features(b["features"], n, capacity=CAP)
    return put(mesh, [{"features": f, "labels": y} for f, y in zip(per_dev, np.split(b["labels"], n))])


def sharded_run(n, batches, opt_name, **kw):
    """The sharded step on n devices: (losses, merged export, params, sharded, tables, metrics list)."""
    sharded, step = sharded_step(n, opt_name, **kw)
    sparse_opt, dense_tx = OPTS[opt_name]
    params = init_params()
    opt_state, tables = dense_tx.init(params), sharded.init(sparse_opt)
    losses, metrics = [], []
    for t, b in enumerate(batches):
        params, opt_state, tables, m = step(params, opt_state, tables, put_batch(sharded.mesh, b), jnp.int32(t))
        losses.append(float(m["loss"]))
        metrics.append(jax.tree_util.tree_map(np.asarray, m))
    exports = sharded.export(tables)
    merge = kw.get("merge", True)
    return (np.array(losses, np.float32), next(iter(exports.values())) if merge else exports, params, sharded,
            tables, metrics)


def assert_same_rows(ref, got, rtol, atol, slots=()):
    np.testing.assert_array_equal(got["tables"], ref["tables"])
    np.testing.assert_array_equal(got["ids"], ref["ids"])  # nothing dropped, nothing extra
    np.testing.assert_allclose(got["embedding"], ref["embedding"], rtol=rtol, atol=atol)
    for s in slots:
        np.testing.assert_allclose(got[f"slot_{s}"], ref[f"slot_{s}"], rtol=rtol, atol=atol)
    np.testing.assert_array_equal(got["count"], ref["count"])
    np.testing.assert_array_equal(got["last_seen"], ref["last_seen"])


def test_owner_is_deterministic_balanced_and_independent_of_slots():
    keys = np.arange(20_000, dtype=np.int64) * 31 - 7
    tables = (keys % 3).astype(np.int32)
    own = np.asarray(owner_of(tables, keys, 8))
    np.testing.assert_array_equal(own, np.asarray(owner_of(tables, keys, 8)))
    counts = np.bincount(own, minlength=8)
    assert counts.max() / counts.mean() < 1.1
    # Keys of one owner still spread over the slots of that owner's index.
    slot = np.asarray(ht.home_slot(jnp.asarray(tables), jnp.asarray(keys), 64))
    per_slot = np.bincount(slot[own == 3], minlength=64)
    assert per_slot.min() > 0 and per_slot.max() / per_slot.mean() < 1.6
    # The exact (table, id) pair is hashed: same id, other table -> mostly other owner.
    assert np.mean(own != np.asarray(owner_of(tables + 1, keys, 8))) > 0.8


def test_initial_rows_bitwise_identical_on_any_device_count():
    batches = make_batches(1, 0, uniform_ids)
    _, ref, _ = reference_run(batches, "zero")
    for n in (8,):  # (2 and 4 devices: the equality tests below start from these rows too)
        _, got, *_ = sharded_run(n, batches, "zero")
        np.testing.assert_array_equal(got["ids"], ref["ids"])
        np.testing.assert_array_equal(got["embedding"], ref["embedding"])


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_sharded_step_matches_one_device_engine(opt_name):
    batches = make_batches(3, 1, uniform_ids)
    ref_losses, ref, ref_params = reference_run(batches, opt_name)
    slots = () if opt_name == "sgd" else ("m", "v")
    for n in (2, 4, 8):
        losses, got, params, sharded, tables, metrics = sharded_run(n, batches, opt_name)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
        assert_same_rows(ref, got, rtol=1e-5, atol=1e-6, slots=slots)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params,
                               ref_params)
        assert not any(m["skipped"] for m in metrics)
        # Every shard advanced its step counter with the 1-device table.
        (pname,) = tables
        assert set(np.asarray(tables[pname].table.step).tolist()) == {3}
        sizes = sharded.shard_sizes(tables)[pname]
        assert sum(sizes.values()) == len(ref["ids"]) and len(sizes) == n


def test_unmerged_tables_each_sharded():
    """Two physical tables (merge=False): each is sharded and trained on its own."""
    batches = make_batches(2, 9, zipf_ids)
    ref_losses, ref, _ = reference_run(batches, "adam", merge=False)
    losses, got, *_ = sharded_run(2, batches, "adam", merge=False)
    assert len(ref) == 2 and ref.keys() == got.keys()
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for p in ref:
        assert_same_rows(ref[p], got[p], rtol=1e-5, atol=1e-6, slots=("m", "v"))


def test_same_device_count_is_bitwise_deterministic():
    batches = make_batches(2, 2, zipf_ids)
    runs = [sharded_run(4, batches, "adam") for _ in range(2)]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    jax.tree_util.tree_map(np.testing.assert_array_equal, runs[0][1], runs[1][1])
    jax.tree_util.tree_map(np.testing.assert_array_equal, runs[0][2], runs[1][2])


def test_zipf_ids_neither_dropped_nor_corrupted():
    batches = make_batches(3, 3, zipf_ids)
    ref_losses, ref, _ = reference_run(batches, "adam")
    losses, got, _, sharded, tables, metrics = sharded_run(8, batches, "adam")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    assert_same_rows(ref, got, rtol=1e-5, atol=1e-6, slots=("m", "v"))
    # Rows land on their owners only.
    np.testing.assert_array_equal(got["shard"], np.asarray(owner_of(got["tables"], got["ids"], 8)))


def adversarial_ids(n):
    vocab = adversarial_vocab(n)
    return lambda rng, k: rng.choice(vocab, k)


def test_all_ids_on_one_shard_with_large_buckets():
    n = 4
    batches = make_batches(2, 4, adversarial_ids(n))
    ref_losses, ref, _ = reference_run(batches, "sgd")
    losses, got, _, sharded, tables, metrics = sharded_run(n, batches, "sgd", rows_per_shard=256,
                                                           bucket_capacity=2 * CAP)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    assert_same_rows(ref, got, rtol=1e-5, atol=1e-6)
    # Table index 0 (f1) was searched to be all on shard 0; f2 (index 1) spreads.
    assert set(got["shard"][got["tables"] == 0].tolist()) == {0}
    (pname,) = tables
    # The fullest bucket held at least every distinct f1 ID of some device's slice.
    per_dev_f1 = max(len(np.unique(part["f1"].values[:int(part["f1"].row_splits[-1])]))
                     for b in batches for part in split_features(b["features"], n, capacity=CAP))
    assert max(int(m["tables"][pname]["bucket_fill"]) for m in metrics) >= per_dev_f1


@pytest.mark.parametrize("kind", ["bucket", "rows"])
def test_overflow_is_reported_and_changes_nothing(kind):
    n = 4
    batches = make_batches(2, 5, adversarial_ids(n))
    kw = {"bucket_capacity": 2} if kind == "bucket" else {"rows_per_shard": 8, "bucket_capacity": 2 * CAP}
    sharded, step = sharded_step(n, "sgd", **kw)
    opt, dense = OPTS["sgd"]
    params = init_params()
    opt_state, tables = dense.init(params), sharded.init(opt)
    batch = put_batch(sharded.mesh, batches[0])
    before = jax.tree_util.tree_map(np.asarray, tables)
    params2, _, tables, m = step(params, opt_state, tables, batch, jnp.int32(0))
    assert bool(m["skipped"])
    (pname,) = tables
    stats = m["tables"][pname]
    assert bool(stats["bucket_overflow"]) == (kind == "bucket")
    assert bool(stats["insert_overflow"]) == (kind == "rows")
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.asarray, tables))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)


def test_sharded_step_has_no_f64():
    sharded, step = sharded_step(2, "adam")  # dense: optax.sgd (optax.adam has an f64 literal under x64)
    opt, dense = OPTS["adam"]
    batch = put_batch(sharded.mesh, make_batches(1, 6, uniform_ids)[0])
    params = init_params()
    jaxpr = str(jax.make_jaxpr(step)(params, dense.init(params), sharded.init(opt), batch, jnp.int32(0)))
    assert "f64" not in jaxpr


def test_bad_mesh_and_policies():
    mesh = jax.make_mesh((2,), ("model",))
    with pytest.raises(ValueError, match="single axis"):
        ShardedEmbeddingEngine(EmbeddingEngine(OPTIONS), mesh)
    from recis_jax.embedding.engine import Admission
    eng = EmbeddingEngine({"f": EmbeddingOption(4, admission=Admission())})
    with pytest.raises(ValueError, match="not supported"):
        ShardedEmbeddingEngine(eng, make_mesh(2))


def test_plan_buckets_in_lane_order_and_flags_overflow():
    from recis_jax.sharding.exchange import plan, receive, send

    owner = jnp.array([1, 0, 1, 1, 0, 2], jnp.int32)
    valid = jnp.array([True, True, True, True, False, True])
    r = plan(owner, valid, 3, 2)
    # shard 1 gets lanes 0, 2 (lane 3 does not fit); lane 4 is invalid.
    np.testing.assert_array_equal(np.asarray(r.slot)[[0, 1, 2, 5]], [2, 0, 3, 4])
    assert np.all(np.asarray(r.slot)[[3, 4]] >= 6) and bool(r.overflow) and int(r.max_fill) == 3
    x = jnp.arange(6, dtype=jnp.int64) + 10
    buf = send(r, x, 3, 2)
    np.testing.assert_array_equal(np.asarray(buf), [[11, 0], [10, 12], [15, 0]])
    np.testing.assert_array_equal(np.asarray(receive(r, buf)), [10, 11, 12, 0, 0, 15])
    assert not bool(plan(owner, valid, 3, 3).overflow)


def test_eval_lookup_finds_only_and_matches_engine():
    from jax.sharding import PartitionSpec as P

    from recis_jax.sharding import AXIS, squeeze, unsqueeze

    n = 4
    batches = make_batches(3, 8, uniform_ids)
    _, _, _, sharded, tables, _ = sharded_run(n, batches[:2], "sgd")
    engine, _ = reference_step("sgd")
    ref_tables = engine.init(OPTS["sgd"][0])
    _, ref_step = reference_step("sgd")
    params, opt_state = init_params(), OPTS["sgd"][1].init(init_params())
    for t, b in enumerate(batches[:2]):
        params, opt_state, ref_tables, _ = ref_step(params, opt_state, ref_tables, jax.device_put(b), jnp.int32(t))

    def per_device(hts, batch):
        hts, feats = squeeze(hts), squeeze(batch)["features"]
        state = {p: tables[p]._replace(table=t, sketch=jnp.zeros((0, 0), jnp.int32)) for p, t in hts.items()}
        new, lk = sharded.lookup(state, feats, train=False)
        changed = [jnp.any(a != b) for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(state))]
        return unsqueeze(sharded.pool(lk.local.rows, lk, feats)), jnp.any(jnp.stack(changed))[None]

    fn = jax.jit(jax.shard_map(per_device, mesh=sharded.mesh, in_specs=(P(AXIS), P(AXIS)),
                               out_specs=(P(AXIS), P(AXIS)), check_vma=False))
    new_batch = batches[2]  # some IDs seen in training, some not
    pooled, changed = fn({p: ts.table for p, ts in tables.items()}, put_batch(sharded.mesh, new_batch))
    assert not np.any(np.asarray(changed))
    _, lk = jax.jit(engine.lookup, static_argnames="train")(ref_tables, jax.device_put(new_batch["features"]),
                                                           train=False)
    ref = engine.pool(lk.rows, lk, jax.device_put(new_batch["features"]))
    (pname,) = lk.tables
    assert int(lk.tables[pname].missing) > 0  # the batch does hold unseen IDs
    for f in OPTIONS:
        np.testing.assert_allclose(np.asarray(pooled[f]).reshape(B, -1), ref[f], rtol=1e-5, atol=1e-6)


def test_plan_from_the_partition_kernel_equals_plan():
    """The GPU route (pallas_kernels.ids_partition, here interpreted) buckets lanes
    exactly as the sort-based `exchange.plan`, overflow and fill included."""
    from pallas_kernels.ids_partition import ids_partition
    from recis_jax.sharding import exchange as ex
    from recis_jax.sharding.mesh import owner_of

    rng = np.random.default_rng(0)
    for n, cap in ((2, 64), (8, 16), (8, 4), (16, 32)):
        keys = jnp.asarray(rng.integers(-2**62, 2**62, 300), jnp.int64)
        tables = jnp.asarray(rng.integers(0, 3, 300), jnp.int32)
        valid = jnp.asarray(rng.random(300) < 0.9)
        want = ex.plan(owner_of(tables, keys, n), valid, n, cap)
        p = ids_partition(tables, keys, valid, n, impl="interpret")
        got = ex.plan_from_partition(p.owner, p.rank, p.counts, valid, n, cap)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
