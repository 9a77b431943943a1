"""The Trainer on a mesh: 2 and 4 fake CPU devices match 1 device for the same global
batches; a checkpoint written on 4 devices resumes on 1; `recis-jax train` across 2
processes (jax.distributed, gloo) trains and agrees on metrics."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from recis_jax.sharding.mesh import make_mesh
from recis_jax.train import main as train_main
from recis_jax.train import recipes
from recis_jax.train.sharded import ShardedTrainer
from recis_jax.train.trainer import Trainer
from tests.test_train import SMALL, assert_adam_close, assert_rows_adam_close, rows_by_id, small_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
F32 = ["--config.model.dtype=float32"]


def run(cfg, workdir, n, num_steps, data_dir):
    r = recipes.build(cfg)
    tr, ev, _ = train_main.data_paths(cfg, str(data_dir))
    train, evr = train_main.make_readers(cfg, r, tr, ev)
    kw = dict(features=r.features, workdir=str(workdir) if workdir else None, log_every=4,
              checkpoint_every=None)
    if n == 1:
        t = Trainer(r.task, r.engine, r.dense_tx, r.sparse_opt, **kw)
    else:
        t = ShardedTrainer(r.task, r.engine, r.dense_tx, r.sparse_opt, mesh=make_mesh(n), **kw)
    return t, t.fit(train, eval_reader=evr, num_steps=num_steps)


def assert_close(a: Trainer, b: Trainer):
    assert int(a.state.step) == int(b.state.step)
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
        assert_adam_close(x, y)
    ra = rows_by_id(a)
    rb = {}
    for p, e in b.sharded.export(b.state.tables).items():
        for t, i, v in zip(e["tables"], e["ids"], e["embedding"]):
            rb[(p, int(t), int(i))] = v
    assert_rows_adam_close(ra, rb)


@pytest.mark.parametrize("n", [2, 4])
def test_mesh_matches_one_device(tmp_path, n):
    cfg = small_config(*F32)
    one, s1 = run(cfg, None, 1, 6, tmp_path)
    many, sn = run(cfg, None, n, 6, tmp_path)
    if n == 2:  # steps 5-6 ran with the measured bucket capacity (smaller than the safe default here)
        assert isinstance(many.sharded._bucket_capacity, dict), many.sharded._bucket_capacity
    assert_close(one, many)
    for k in ("auc", "logloss", "calibration"):
        assert abs(s1["eval"][k] - sn["eval"][k]) < 1e-5, k
    assert s1["table_sizes"] == sn["table_sizes"]


def test_checkpoint_from_four_devices_resumes_on_one(tmp_path):
    cfg = small_config(*F32)
    ref, _ = run(cfg, None, 1, 10, tmp_path)
    run(cfg, tmp_path / "work", 4, 6, tmp_path)          # saves step 6 at the end
    resumed, _ = run(cfg, tmp_path / "work", 1, 10, tmp_path)
    assert int(resumed.state.step) == 10
    for x, y in zip(jax.tree.leaves(ref.state.params), jax.tree.leaves(resumed.state.params)):
        assert_adam_close(x, y)
    ra, rb = rows_by_id(ref), rows_by_id(resumed)
    assert_rows_adam_close(ra, rb)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, extra):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_NUM_CPU_DEVICES="2", PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen(
        [sys.executable, "-m", "recis_jax.cli", "train", "--config", "configs/deepfm.py:smoke",
         "--workdir", str(workdir), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i)] + SMALL + extra,
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(o[-3000:] for o in outs)
    return outs


def test_cli_two_processes_checkpoint_and_resume(tmp_path):
    """2 processes x 2 CPU devices (jax.distributed over gloo), one shared workdir: they
    train, agree on metrics, write one checkpoint together; it loads on 1 device with the
    same evaluation, and the 2 processes resume from it."""
    work = tmp_path / "work"
    outs = _two_processes(work, [])
    s = json.load(open(work / "summary.json"))
    # Each process reads one of the 2 train files: 10 global steps of 2 x 64 rows.
    assert s["steps"] == 10 and s["eval"]["count"] == 600
    evals = [[x for x in o.splitlines() if x.startswith("eval AUC")] for o in outs]
    assert evals[0] and evals[0] == evals[1]  # all-reduced: the same line on both

    cfg = small_config()
    recipe = recipes.build(cfg)
    one = train_main.make_trainer(cfg, str(work), recipe)   # 1 device, restores the checkpoint
    _, ev, _ = train_main.data_paths(cfg, str(work))
    _, evr = train_main.make_readers(cfg, recipe, ev, ev)
    one._init_from(evr)
    assert int(one.state.step) == 10 and len(one.meta["reader"]) == 2
    assert one.table_sizes() == s["table_sizes"]
    res = one.evaluate(evr)
    for k in ("auc", "logloss"):
        assert abs(res[k] - s["eval"][k]) < 1e-5, (k, res[k], s["eval"][k])

    _two_processes(work, ["--config.train.num_epochs=2"])  # resumes at step 10, reads epoch 2
    assert json.load(open(work / "summary.json"))["steps"] == 20


def test_sharded_tables_grow_and_lose_nothing(tmp_path):
    """Rows per shard far too small: the tables grow after each overflow (nothing
    written, batch rerun); every ID ends up in the tables, and runs repeat bitwise."""
    cfg = small_config(*F32)
    big, _ = run(cfg, None, 2, 6, tmp_path)
    cfg.embedding.rows_per_shard = 8
    r = recipes.build(cfg)

    def tiny():
        tr, ev, _ = train_main.data_paths(cfg, str(tmp_path))
        train, _ = train_main.make_readers(cfg, r, tr, ev)
        t = ShardedTrainer(r.task, r.engine, r.dense_tx, r.sparse_opt, mesh=make_mesh(2), rows_per_shard=8,
                           features=r.features, log_every=None)
        t.fit(train, num_steps=6)
        return t

    a, b = tiny(), tiny()
    assert min(a.sharded.rows_per_shard.values()) > 8 and a._counts["overflow"] > 0
    assert a.table_sizes() == big.table_sizes()
    ea, eb, eg = (t.sharded.export(t.state.tables) for t in (a, b, big))
    for p in eg:
        np.testing.assert_array_equal(ea[p]["ids"], eg[p]["ids"])
        np.testing.assert_array_equal(ea[p]["embedding"], eb[p]["embedding"])   # deterministic
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_zero_matches_replicated_and_checkpoints_portably(tmp_path):
    cfg = small_config(*F32)
    rep_, s_rep = run(cfg, None, 4, 6, tmp_path)
    r = recipes.build(cfg)
    tr, ev, _ = train_main.data_paths(cfg, str(tmp_path))
    train, evr = train_main.make_readers(cfg, r, tr, ev)
    z = ShardedTrainer(r.task, r.engine, r.dense_tx, r.sparse_opt, mesh=make_mesh(4), zero=True,
                       features=r.features, workdir=str(tmp_path / "zero"), log_every=None)
    s_z = z.fit(train, eval_reader=evr, num_steps=6)
    leaves = jax.tree.leaves(z.state.params)
    assert len(leaves) == 1 and leaves[0].sharding.spec == jax.sharding.PartitionSpec("data")  # 1/4 each
    for x, y in zip(jax.tree.leaves(rep_.state.params), jax.tree.leaves(z.dense_params())):
        assert_adam_close(x, y, rtol=1e-5, atol=1e-7)
    assert abs(s_rep["eval"]["auc"] - s_z["eval"]["auc"]) < 1e-6
    # The ZeRO checkpoint holds plain trees: a 1-device Trainer resumes from it.
    one = train_main.make_trainer(cfg, str(tmp_path / "zero"), r)
    one._init_from(evr)
    assert int(one.state.step) == 6
    for x, y in zip(jax.tree.leaves(one.state.params), jax.tree.leaves(z.dense_params())):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_eviction_on_sharded_tables_matches_one_device(tmp_path):
    cfg = small_config(*F32, "--config.embedding.evict_after_steps=2")
    one, s1 = run(cfg, None, 1, 8, tmp_path)
    two, s2 = run(cfg, None, 2, 8, tmp_path)
    assert one._counts["evicted"] > 0 and one._counts["evicted"] == two._counts["evicted"]
    assert s1["table_sizes"] == s2["table_sizes"]
    assert_close(one, two)


@pytest.mark.parametrize("kw", [{"accum_steps": 2}, {"steps_per_call": 2}])
def test_unsupported_options_raise(kw):
    r = recipes.build(small_config())
    with pytest.raises(ValueError, match="not supported by the sharded trainer"):
        ShardedTrainer(r.task, r.engine, r.dense_tx, r.sparse_opt, mesh=make_mesh(2), features=r.features, **kw)
