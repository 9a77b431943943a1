"""Checkpoints: exact round trips (plain and sharded, any device count), verification
and refusal of bad files, atomicity under SIGKILL, retention, incremental exports."""

import contextlib
import functools
import io
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from recis_jax.checkpoint import sparse
from recis_jax.checkpoint import (CheckpointError, CheckpointManager, IncrementalExporter, describe,
                                  export_incremental, materialize, read_export)
from recis_jax.embedding import hashtable as ht
from recis_jax.embedding.engine import Admission, EmbeddingEngine, EmbeddingOption, TableState
from recis_jax.embedding.eviction import EvictionPolicy
from recis_jax.optim import sparse_adamw
from recis_jax.ragged import Ragged
from recis_jax.sharding import (AXIS, ShardedEmbeddingEngine, make_mesh, owner_of, put,
                                split_features, squeeze, unsqueeze)

REPO = pathlib.Path(__file__).resolve().parents[1]
OPT = sparse_adamw(0.05, weight_decay=0.01)
EVICT = EvictionPolicy(max_age=2)
# c1 + c2: one merged physical table (table indices 0, 1); c3: bfloat16 with admission.
OPTIONS = {
    "c1": EmbeddingOption(4, combiner="sum", num_rows=128, eviction=EVICT),
    "c2": EmbeddingOption(4, combiner="mean", num_rows=128, eviction=EVICT),
    "c3": EmbeddingOption(8, combiner="sum", dtype="bfloat16", num_rows=64, eviction=EVICT,
                          admission=Admission(min_count=2, width=256, depth=2)),
}
VOCAB = np.array([5, -1, 0, 2**63 - 1, -(2**63), 77, 123456789012345] + list(range(1000, 1040)), np.int64)
B, CAP = 8, 64


def random_batch(rng, vocab=VOCAB, names=OPTIONS, b=B, max_len=5, cap=CAP):
    return {f: Ragged.from_lists([list(rng.choice(vocab, rng.integers(0, max_len + 1))) for _ in range(b)],
                                 capacity=cap) for f in names}


def loss_of(out):
    total = jnp.float32(0)
    for _, v in sorted(out.items()):
        total = total + jnp.sum(jnp.sin(v) * (1.0 + jnp.arange(v.size, dtype=jnp.float32).reshape(v.shape) / 7))
    return total


@functools.cache
def plain(which="main"):
    """(engine, train step, eval lookup + pool) for OPTIONS ("main") or SOPTIONS ("sharded")."""
    engine = EmbeddingEngine({"main": OPTIONS, "sharded": SOPTIONS}[which])

    @jax.jit
    def step(state, feats, gstep):
        state, lk = engine.lookup(state, feats, step=gstep)
        loss, g = jax.value_and_grad(lambda rows: loss_of(engine.pool(rows, lk, feats)))(lk.rows)
        state, _ = engine.apply_gradients(state, lk, g, OPT)
        return state, loss

    @jax.jit
    def pooled(state, feats):
        _, lk = engine.lookup(state, feats, train=False)
        return engine.pool(lk.rows, lk, feats)

    return engine, step, pooled


def train(state, batches, first_step=0):
    engine, step, _ = plain()
    for t, b in enumerate(batches):
        state, _ = step(state, b, jnp.int32(first_step + t))
    return state


@functools.cache
def trained():
    """A plain engine state after 4 training steps (global clock 0..3)."""
    engine, _, _ = plain()
    rng = np.random.default_rng(0)
    batches = [random_batch(rng) for _ in range(4)]
    return train(engine.init(OPT), batches)


def dense_state():
    params = {"w": jnp.linspace(-1, 1, 12, dtype=jnp.float32).reshape(3, 4), "b": jnp.float32(0.25)}
    return {"params": params, "opt": optax.adam(1e-3).init(params)}


def all_ids_batch(engine, state):
    """One bag per live (table, id), one feature per logical table: pooled sum = the row."""
    feats = {}
    for pname, ts in state.items():
        ex = ht.export(ts.table)
        for m in engine.members[pname]:
            ids = ex["ids"][ex["tables"] == m.table_index]
            feats[m.feature] = [[int(i)] for i in ids]
    b = max(len(v) for v in feats.values())
    b += -b % 8
    return {f: Ragged.from_lists(v + [[]] * (b - len(v)), capacity=b) for f, v in feats.items()}


def assert_same_table(a: TableState, b: TableState, sketch=True):
    ea, eb = ht.export(a.table), ht.export(b.table)
    assert ea.keys() == eb.keys()
    for k in ea:
        assert ea[k].dtype == eb[k].dtype, k
        np.testing.assert_array_equal(ea[k], eb[k], err_msg=k)
    assert int(a.table.step) == int(b.table.step)
    assert a.table.embedding.dtype == b.table.embedding.dtype
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.table.slot_defaults, b.table.slot_defaults)
    if sketch:
        np.testing.assert_array_equal(a.sketch, b.sketch)


# -- round trip -------------------------------------------------------------------------

def test_round_trip_is_exact_and_training_continues_identically(tmp_path):
    engine, step, pooled = plain()
    state = trained()
    assert {p: ts.table.embedding.dtype for p, ts in state.items()} == {"merged_0_dim4": jnp.float32,
                                                                         "c3": jnp.bfloat16}
    dense, meta = dense_state(), {"reader": {"file": 3, "offset": np.int64(17)}, "seed": 7}
    mgr = CheckpointManager(tmp_path / "ck", rows_per_file=7, threads=4)
    path = mgr.save(4, tables=state, engine=engine, dense=dense, meta=meta, config_hash="cafe")
    assert os.path.basename(path) == "step_000000004" and mgr.steps() == [4] and mgr.latest_step() == 4
    man = json.loads((pathlib.Path(path) / "manifest.json").read_text())
    assert man["config_hash"] == "cafe" and man["step"] == 4
    t = man["tables"]["merged_0_dim4"]
    assert t["members"] == {"c1": 0, "c2": 1} and set(t["slots"]) == {"m", "v"}
    assert t["rows"] == int(ht.size(state["merged_0_dim4"].table)) and len(t["files"]) > 1
    assert all(f["rows"] <= 7 for f in t["files"]) and t["optimizer_step"] == 4
    assert man["tables"]["c3"]["dtype"] == "bfloat16" and man["tables"]["c3"]["sketch"]

    r = mgr.restore(engine=engine, optimizer=OPT, dense_target=dense)
    assert r.step == 4 and r.meta == {"reader": {"file": 3, "offset": 17}, "seed": 7}
    jax.tree_util.tree_map(np.testing.assert_array_equal, r.dense, dense)
    assert r.tables.keys() == state.keys()
    for p in state:
        assert_same_table(state[p], r.tables[p])
    # Identical lookups of every live ID, and an identical next training step.
    feats = all_ids_batch(engine, state)
    jax.tree_util.tree_map(np.testing.assert_array_equal, pooled(state, feats), pooled(r.tables, feats))
    nxt = random_batch(np.random.default_rng(99))
    (s1, l1), (s2, l2) = step(state, nxt, jnp.int32(4)), step(r.tables, nxt, jnp.int32(4))
    assert float(l1) == float(l2)
    for p in s1:
        assert_same_table(s1[p], s2[p])
    # Without an optimizer the slots come back as saved; without a target, dense as saved.
    r2 = mgr.restore(4, engine=engine)
    for p in state:
        assert_same_table(state[p], r2.tables[p])
    np.testing.assert_array_equal(r2.dense["params"]["w"], dense["params"]["w"])


def test_subset_load_and_table_checks(tmp_path):
    engine, _, _ = plain()
    state = trained()
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, tables=state, engine=engine)
    r = mgr.restore(engine=engine, optimizer=OPT, tables=["c3"])
    assert list(r.tables) == ["c3"] and r.dense is None
    assert_same_table(state["c3"], r.tables["c3"])
    with pytest.raises(CheckpointError, match="nope"):
        mgr.restore(engine=engine, tables=["nope"])
    # A different dim for the same table name is refused, naming the table.
    other = EmbeddingEngine(dict(OPTIONS, c3=EmbeddingOption(16, dtype="bfloat16", eviction=EVICT,
                                                               admission=OPTIONS["c3"].admission)))
    with pytest.raises(CheckpointError, match="'c3'.*dim"):
        mgr.restore(engine=other, tables=["c3"])
    # A checkpoint with fewer tables than the engine: error, or fresh tables on request.
    mgr2 = CheckpointManager(tmp_path / "sub")
    mgr2.save(1, tables={"c3": state["c3"]}, engine=engine)
    with pytest.raises(CheckpointError, match="merged_0_dim4"):
        mgr2.restore(engine=engine, optimizer=OPT)
    r = mgr2.restore(engine=engine, optimizer=OPT, missing="init")
    assert int(ht.size(r.tables["merged_0_dim4"].table)) == 0
    # Optimizer slots must match unless told otherwise.
    from recis_jax.optim import rowwise_adagrad
    with pytest.raises(CheckpointError, match="slots"):
        mgr.restore(engine=engine, optimizer=rowwise_adagrad(0.1), tables=["c3"])
    r = mgr.restore(engine=engine, optimizer=rowwise_adagrad(0.1), tables=["c3"], strict_slots=False)
    assert set(r.tables["c3"].table.slots) == {"acc"}


def test_load_grows_a_too_small_slab_and_respects_a_budget(tmp_path):
    engine, _, _ = plain()
    state = trained()
    live = int(ht.size(state["merged_0_dim4"].table))
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, tables=state, engine=engine)
    r = mgr.restore(engine=engine, optimizer=OPT, num_rows=8)
    assert r.tables["merged_0_dim4"].table.capacity >= live > 8
    for p in state:
        assert_same_table(state[p], r.tables[p])
    with pytest.raises(CheckpointError, match="max_rows"):
        mgr.restore(engine=engine, optimizer=OPT, max_rows=4)


def test_host_built_index_is_what_find_expects():
    rng = np.random.default_rng(1)
    keys = np.concatenate([rng.integers(-2**63, 2**63 - 1, 3900, dtype=np.int64), [-(2**63), 2**63 - 1, -1, 0]])
    tables = rng.integers(0, 3, len(keys)).astype(np.int32)
    keys, idx = np.unique(keys, return_index=True)
    tables = tables[idx]
    np.testing.assert_array_equal(sparse.home_slots(tables, keys, 1 << 12),
                                  np.asarray(ht.home_slot(jnp.asarray(tables), jnp.asarray(keys), 1 << 12)))
    # A crowded index (load 0.95) so that the last run wraps around the end.
    pos = sparse.place_keys(tables, keys, 1 << 12, max_probes=4096)
    assert len(np.unique(pos)) == len(keys) and pos.max() < 1 << 12
    assert (pos < sparse.home_slots(tables, keys, 1 << 12)).any()  # some run wrapped around
    cfg = ht.TableConfig("t", 4, max_probes=4096)
    rows = {"ids": keys, "tables": tables, "embedding": np.zeros((len(keys), 4), np.float32),
            "last_seen": np.zeros(len(keys), np.int32), "count": np.ones(len(keys), np.int64)}
    state = jax.device_put(sparse._host_table(cfg, rows, 4096, {}, 0, 1 << 12))
    f = ht.find(state, jnp.asarray(tables), jnp.asarray(keys), jnp.ones(len(keys), bool), 4096)
    assert bool(f.found.all())
    np.testing.assert_array_equal(np.asarray(f.rows), np.arange(len(keys)))
    assert not bool(ht.find(state, jnp.asarray(tables + 3), jnp.asarray(keys), jnp.ones(len(keys), bool),
                            4096).found.any())
    assert sparse.place_keys(tables, keys, 1 << 12, max_probes=2) is None  # too long a chain: caller grows


# -- verification ------------------------------------------------------------------------

def _files(path, table="merged_0_dim4"):
    man = json.loads((pathlib.Path(path) / "manifest.json").read_text())
    return [pathlib.Path(path) / f["path"] for f in man["tables"][table]["files"]]


def _edit_manifest(path, fn):
    p = pathlib.Path(path) / "manifest.json"
    man = json.loads(p.read_text())
    fn(man)
    p.write_text(json.dumps(man))


def test_corrupt_files_are_refused_naming_the_file(tmp_path):
    engine, _, _ = plain()
    state = trained()
    mgr = CheckpointManager(tmp_path / "ck", keep_last=None, rows_per_file=5)
    good = mgr.save(1, tables=state, engine=engine, dense=dense_state())
    paths = {s: mgr.save(s, tables=state, engine=engine, dense=dense_state()) for s in range(2, 9)}

    def refused(step, pattern):
        with pytest.raises(CheckpointError, match=pattern):
            mgr.restore(step, engine=engine, optimizer=OPT)

    f = _files(paths[2])[1]  # flipped bytes
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    refused(2, f"{f.name}.*sha256")
    f = _files(paths[3])[0]  # truncated
    f.write_bytes(f.read_bytes()[:-9])
    refused(3, f"{f.name}.*sha256")
    f = _files(paths[4])[-1]  # a missing file
    f.unlink()
    refused(4, f"{f.name}.*missing")
    _edit_manifest(paths[5], lambda m: m["tables"]["c3"]["files"][0].update(path="../x"))  # escapes
    refused(5, r"refusing.*\.\./x")
    _edit_manifest(paths[6], lambda m: m["tables"]["c3"]["files"][0].update(path="/etc/passwd"))
    refused(6, "refusing absolute")
    outside = tmp_path / "outside.safetensors"  # a symlink out of the checkpoint
    shutil.copy(_files(paths[7], "c3")[0], outside)
    link = pathlib.Path(paths[7]) / "sparse" / "evil.safetensors"
    link.symlink_to(outside)
    _edit_manifest(paths[7], lambda m: m["tables"]["c3"]["files"][0].update(path="sparse/evil.safetensors"))
    refused(7, "resolves outside")
    dense_file = max((p for p in (pathlib.Path(paths[8]) / "dense").rglob("*") if p.is_file()),
                     key=lambda p: p.stat().st_size)
    dense_file.write_bytes(dense_file.read_bytes()[:-1] + b"\x00")
    refused(8, f"{dense_file.name}.*sha256")
    # The intact checkpoint still restores, and a fallback skips the broken latest one.
    assert mgr.restore(1, engine=engine, optimizer=OPT, dense_target=dense_state()).step == 1
    assert mgr.restore(engine=engine, optimizer=OPT, fallback=True).step == 1
    with pytest.raises(CheckpointError):
        mgr.restore(engine=engine, optimizer=OPT)
    assert good.endswith("step_000000001")


def test_retention_survives_restarts_and_ignores_leftovers(tmp_path):
    engine, _, _ = plain()
    state = {"c3": trained()["c3"]}
    root = tmp_path / "ck"
    mgr = CheckpointManager(root, keep_last=2, keep_every=4)
    for s in range(1, 6):
        mgr.save(s, tables=state, engine=engine)
    assert mgr.steps() == [4, 5]
    # Leftovers of a crash: a tmp dir and a step dir without a manifest.
    (root / "tmp.step_000000006.abcdef").mkdir()
    (root / "tmp.step_000000006.abcdef" / "junk").write_bytes(b"x")
    (root / "step_000000013").mkdir()
    mgr = CheckpointManager(root, keep_last=2, keep_every=4)  # a restart
    assert mgr.steps() == [4, 5] and mgr.latest_step() == 5
    assert "not checkpoints" in describe(str(root)) and "leftover" in describe(str(root))
    for s in range(6, 11):
        mgr.save(s, tables=state, engine=engine)
    assert mgr.steps() == [4, 8, 9, 10]
    assert not [n for n in os.listdir(root) if n.startswith("tmp.")]
    assert sorted(n for n in os.listdir(root) if n.startswith("step_")) == [
        "step_000000004", "step_000000008", "step_000000009", "step_000000010", "step_000000013"]
    # Re-saving an existing step replaces it atomically.
    mgr.save(10, tables=state, engine=engine, meta={"again": True})
    assert mgr.restore(engine=engine, tables=["c3"]).meta == {"again": True}


CHILD = r"""
import os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
from recis_jax.checkpoint import CheckpointManager
from recis_jax.embedding.engine import EmbeddingEngine, EmbeddingOption
root, step = sys.argv[1], int(sys.argv[2])
engine = EmbeddingEngine({"a": EmbeddingOption(4, num_rows=512)})
ids = np.arange(300, dtype=np.int64) * 7 - 100
ts = engine.init()["a"]
# Rows written directly (a save reads only the rows, not the index): no compile here.
live = np.arange(512) < 300
pad = lambda a: np.concatenate([a, np.zeros((512 - 300,) + a.shape[1:], a.dtype)])
ts = ts._replace(table=ts.table._replace(row_live=live, row_keys=pad(ids), num_free=np.int32(212)))
mgr = CheckpointManager(root, keep_last=2, rows_per_file=8, threads=2)
while True:
    emb = pad((ids[:, None] + step + np.arange(4)).astype(np.float32))
    ts = ts._replace(table=ts.table._replace(embedding=emb))
    mgr.save(step, tables={"a": ts}, engine=engine, dense={"x": np.full(64, step, np.int64)}, meta={"step": step})
    print(step, flush=True)
    step += 1
"""


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    root = tmp_path / "ck"
    engine = EmbeddingEngine({"a": EmbeddingOption(4, num_rows=512)})
    ids = np.arange(300, dtype=np.int64) * 7 - 100
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    rng = random.Random(0)
    interrupted = 0
    for _ in range(3):
        mgr = CheckpointManager(root, keep_last=2)
        start = (mgr.latest_step() or 0) + 1
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(start)], stdout=subprocess.PIPE,
                                env=env, cwd=REPO)
        try:
            for _ in range(2):  # at least two saves done, then kill at a random moment
                assert proc.stdout.readline(), "the saving child died"
            with contextlib.suppress(Exception):
                proc.wait(timeout=rng.uniform(0.0, 0.15))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        interrupted += any(n.startswith("tmp.") for n in os.listdir(root))
        s = mgr.latest_step()
        assert s is not None and s >= start + 1
        r = mgr.restore(engine=engine)  # verifies every sha256
        assert r.step == s and r.meta == {"step": s}
        np.testing.assert_array_equal(r.dense["x"], np.full(64, s))
        ex = ht.export(r.tables["a"].table)
        np.testing.assert_array_equal(ex["ids"], ids)
        np.testing.assert_array_equal(ex["embedding"], (ids[:, None] + s + np.arange(4)).astype(np.float32))
        assert len(mgr.steps()) <= 3
    # The child saves in a loop, so a kill almost always lands inside a save.
    assert interrupted >= 1


# -- sharded: save on 4 devices, load on 1 and 8 -------------------------------------------

SOPTIONS = {"f1": EmbeddingOption(4, num_rows=256), "f2": EmbeddingOption(4, num_rows=256),
            "b": EmbeddingOption(8, dtype="bfloat16", num_rows=128)}  # f1 + f2 merged; b bfloat16


def sharded_pool(sharded, tables, feats):
    """Eval lookup + pool of a global batch through the sharded engine: {feature: [B, dim]}."""
    batch = put(sharded.mesh, split_features(feats, sharded.n))

    def per_device(hts, b):
        hts, b = squeeze(hts), squeeze(b)
        ts = {p: TableState(t, jnp.zeros((0, 0), jnp.int32)) for p, t in hts.items()}
        _, lk = sharded.lookup(ts, b, train=False)
        return unsqueeze(sharded.pool(lk.local.rows, lk, b))

    fn = jax.jit(jax.shard_map(per_device, mesh=sharded.mesh, in_specs=(P(AXIS), P(AXIS)), out_specs=P(AXIS),
                               check_vma=False))
    out = fn({p: ts.table for p, ts in tables.items()}, batch)
    return {k: np.asarray(v).reshape(-1, v.shape[-1]) for k, v in out.items()}


def _no_shard(ex):
    return {k: v for k, v in ex.items() if k != "shard"}


def test_sharded_save_loads_on_one_and_eight_devices(tmp_path):
    # A trained state (plain engine, 3 steps) loaded onto 4 devices: the sharded state to save.
    engine1, step1, _ = plain("sharded")
    rng = np.random.default_rng(3)
    vocab = np.arange(-40, 40, dtype=np.int64) * 1_000_003
    state1 = engine1.init(OPT)
    for t in range(3):
        state1, _ = step1(state1, random_batch(rng, vocab, SOPTIONS, b=16), jnp.int32(t))
    ref = {p: ht.export(ts.table) for p, ts in state1.items()}
    mgr = CheckpointManager(tmp_path / "ck", rows_per_file=10)
    mgr.save(1, tables=state1, engine=engine1)
    sharded4 = ShardedEmbeddingEngine(EmbeddingEngine(SOPTIONS), make_mesh(4))
    tables = mgr.restore(1, engine=engine1, optimizer=OPT, sharded=sharded4).tables
    # Exactly the structure, shapes, dtypes and shardings `sharded.init` makes.
    fresh = sharded4.init(OPT)
    assert jax.tree_util.tree_structure(tables) == jax.tree_util.tree_structure(fresh)
    for x, y in zip(jax.tree_util.tree_leaves(tables), jax.tree_util.tree_leaves(fresh)):
        assert (x.shape, x.dtype) == (y.shape, y.dtype) and x.sharding.is_equivalent_to(y.sharding, x.ndim)
    assert np.asarray(tables["b"].table.step).tolist() == [3] * 4
    for p, ex in sharded4.export(tables).items():
        jax.tree_util.tree_map(np.testing.assert_array_equal, _no_shard(ex), ref[p])

    # Save from the 4-device engine: one or more files per shard.
    params = jax.device_put({"w": jnp.arange(4, dtype=jnp.float32)}, NamedSharding(sharded4.mesh, P()))
    path = mgr.save(3, tables=tables, engine=sharded4, dense={"params": params})
    man = json.loads((pathlib.Path(path) / "manifest.json").read_text())
    assert man["tables"]["b"]["num_shards"] == 4
    assert {f["shard"] for f in man["tables"]["b"]["files"]} == {0, 1, 2, 3}

    # One device: a plain EmbeddingEngine state.
    r1 = mgr.restore(engine=engine1, optimizer=OPT)
    for p in ref:
        assert_same_table(state1[p], r1.tables[p])
        assert int(r1.tables[p].table.step) == 3
    # Eight devices: rows re-routed to their new owners.
    sharded8 = ShardedEmbeddingEngine(EmbeddingEngine(SOPTIONS), make_mesh(8))
    r8 = mgr.restore(engine=sharded8.engine, optimizer=OPT, sharded=sharded8)
    got8 = sharded8.export(r8.tables)
    for p in ref:
        jax.tree_util.tree_map(np.testing.assert_array_equal, _no_shard(got8[p]), _no_shard(ref[p]))
        np.testing.assert_array_equal(got8[p]["shard"], np.asarray(owner_of(got8[p]["tables"], got8[p]["ids"], 8)))
        assert r8.tables[p].table.embedding.shape[0] == 8
    # Identical lookups of every ID on 8 devices and on 1.
    # (One ID per bag, sum pooling: a bag's output is its ID's row, as float32.)
    feats = all_ids_batch(engine1, r1.tables)
    want = {}
    for p, ex in ref.items():
        for m in engine1.members[p]:
            rows = ex["embedding"][ex["tables"] == m.table_index].astype(np.float32)
            want[m.feature] = np.concatenate([rows, np.zeros((feats[m.feature].nrows - len(rows), rows.shape[1]),
                                                             np.float32)])
    jax.tree_util.tree_map(np.testing.assert_array_equal, sharded_pool(sharded8, r8.tables, feats), want)
    jax.tree_util.tree_map(np.testing.assert_array_equal, plain("sharded")[2](r1.tables, feats), want)
    # Dense state onto another device placement: the target's sharding decides.
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), params)
    r_params = mgr.restore(engine=engine1, dense_target={"params": target}, tables=[]).dense["params"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, r_params, params)
    assert all(x.sharding == one for x in jax.tree_util.tree_leaves(r_params))
    # Incremental export from a sharded state: a full export holds every live row.
    export_incremental(str(tmp_path / "exp"), r8.tables, sharded8, step=3)
    ex = read_export(str(tmp_path / "exp"))
    for p in ref:
        jax.tree_util.tree_map(np.testing.assert_array_equal, ex[p]["rows"],
                               {k: v for k, v in _no_shard(ref[p]).items() if not k.startswith("slot_")})


# -- incremental export ----------------------------------------------------------------------

def _keys(ex):
    return set(zip(ex["tables"].tolist(), ex["ids"].tolist()))


def test_incremental_export_has_exactly_the_changed_rows_and_tombstones(tmp_path):
    engine, _, _ = plain()
    state = trained()  # trained at global steps 0..3
    exp = IncrementalExporter(tmp_path / "exp", rows_per_file=6)
    full = exp.export(3, tables=state, engine=engine)
    ex_full = read_export(full)
    assert ex_full["_info"]["kind"] == "full"
    before = {p: ht.export(ts.table) for p, ts in state.items()}
    for p in state:
        for k in ("ids", "tables", "embedding", "last_seen", "count"):
            np.testing.assert_array_equal(ex_full[p]["rows"][k], before[p][k])
        assert len(ex_full[p]["tombstones"]["ids"]) == 0

    # More training on a partly new vocabulary (global steps 4, 5), then an eviction.
    rng = np.random.default_rng(5)
    vocab = np.concatenate([VOCAB[::3], np.arange(5000, 5012, dtype=np.int64)])
    batches = [random_batch(rng, vocab) for _ in range(2)]
    state = train(state, batches, first_step=4)
    state, evicted = engine.evict(state, step=6, global_step=5)  # max_age 2: unseen since step 2
    assert sum(int(v) for v in evicted.values()) > 0
    after = {p: ht.export(ts.table) for p, ts in state.items()}
    delta = exp.export(5, tables=state, engine=engine)
    ex = read_export(delta)
    assert ex["_info"]["kind"] == "delta" and ex["_info"]["base"]["step"] == 3
    for p in state:
        # Changed = live now and looked up at steps 4-5 (what the batches hold, per logical table).
        looked = set()
        for m in engine.members[p]:
            for b in batches:
                r = b[m.feature]
                looked |= {(m.table_index, int(i)) for i in np.asarray(r.values)[:int(r.row_splits[-1])]}
        want = _keys(after[p]) & looked
        assert _keys(ex[p]["rows"]) == want and want
        # The rows left out are unchanged since the full export.
        same = _keys(after[p]) - want
        ib = {k: i for i, k in enumerate(zip(before[p]["tables"].tolist(), before[p]["ids"].tolist()))}
        for i, k in enumerate(zip(after[p]["tables"].tolist(), after[p]["ids"].tolist())):
            if k in same:
                np.testing.assert_array_equal(after[p]["embedding"][i], before[p]["embedding"][ib[k]])
        # Tombstones = live at the full export, not live now.
        tomb = set(zip(ex[p]["tombstones"]["tables"].tolist(), ex[p]["tombstones"]["ids"].tolist()))
        assert tomb == _keys(before[p]) - _keys(after[p])
    assert any(len(ex[p]["tombstones"]["ids"]) for p in state)
    # Full + delta replays to the current live rows exactly.
    replay = materialize([full, delta])
    for p in state:
        for k in ("ids", "tables", "embedding", "last_seen", "count"):
            np.testing.assert_array_equal(replay[p][k], after[p][k])
    # Nothing trained since: an empty delta.
    again = read_export(exp.export(6, tables=state, engine=engine))
    assert all(len(again[p]["rows"]["ids"]) == 0 and len(again[p]["tombstones"]["ids"]) == 0 for p in state)
    assert exp.chain() == [full, delta, str(tmp_path / "exp" / "export_000000006")]
    assert "kind delta" in describe(delta) and "export root" in describe(str(tmp_path / "exp"))


# -- describe / inspect ----------------------------------------------------------------------

def test_describe_and_cli_inspect(tmp_path):
    engine, _, _ = plain()
    state = trained()
    mgr = CheckpointManager(tmp_path / "ck")
    path = mgr.save(12, tables=state, engine=engine, dense=dense_state(), meta={"seed": 3}, config_hash="h1")
    text = describe(path)
    rows = {p: int(ht.size(ts.table)) for p, ts in state.items()}
    assert "step 12" in text and "config_hash h1" in text and '"seed": 3' in text
    for p, dim, dt in [("merged_0_dim4", 4, "float32"), ("c3", 8, "bfloat16")]:
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(p + " "))
        assert line.split()[:4] == [p, str(rows[p]), str(dim), dt]
    assert "steps [12]" in describe(str(tmp_path / "ck"))
    from recis_jax.cli import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["inspect", str(tmp_path / "ck")]) == 0
    assert "bfloat16" in buf.getvalue() and "step 12" in buf.getvalue()
    with pytest.raises(CheckpointError):
        describe(str(tmp_path))
