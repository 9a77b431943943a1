"""Trainer: the config main job end to end, exact resume, accumulation, overflow
reruns, NaN stops, online windows, export/predict. Small shapes: the CPU compiles
each step once per test (a few seconds)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recis_jax.embedding import hashtable as ht
from recis_jax.train import main as train_main
from recis_jax.train import recipes
from recis_jax.train.step import xla_options
from recis_jax.train.trainer import Trainer, TrainingError

SMALL = ["--config.features.num_categorical=4", "--config.features.num_dense=2", "--config.model.num_dense=2",
         "--config.data.generate.rows_per_file=600", "--config.data.generate.vocab_size=500",
         "--config.train.batch_size=64", "--config.train.log_every=4", "--config.train.checkpoint_every=4",
         "--config.data.num_threads=2", "--config.train.sparse_lr=0.05", "--config.train.dense_lr=0.01"]


def small_config(*extra):
    return train_main.load_config("configs/deepfm.py:smoke", SMALL + list(extra))


def rows_by_id(trainer):
    out = {}
    for pname, ts in trainer.state.tables.items():
        ex = ht.export(ts.table)
        for t, i, e in zip(ex["tables"], ex["ids"], ex["embedding"]):
            out[(pname, int(t), int(i))] = np.asarray(e)
    return out


def assert_adam_close(got, want, rtol=2e-4, atol=2e-6, err_msg=""):
    """got ~ want for two runs of the same training whose sums ran in another order (an
    all-reduce vs one device's sum, micro-batches vs one batch).

    Adam moves an element by about lr per step whatever the size of its gradient, so
    where a gradient is near zero the rounding of another summation order can move that
    element by up to 2 lr: such elements exceed a float tolerance, but they are rare and
    isolated. Allowed: at most 1 in 1000 elements outside rtol / atol (at least 2), and
    never two in one row (last axis). A lost, misplaced or wrongly summed row or layer is
    off in most of its elements.
    """
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert g.shape == w.shape, (g.shape, w.shape, err_msg)
    off = ~np.isclose(g, w, rtol=rtol, atol=atol)
    n_off = int(off.sum())
    if n_off == 0:
        return
    where = np.argwhere(off)[:5].tolist()
    assert n_off <= max(2, off.size // 1000), f"{err_msg}: {n_off} of {off.size} elements differ, e.g. at {where}"
    if g.ndim >= 2:
        per_row = off.reshape(-1, g.shape[-1]).sum(axis=1)
        assert per_row.max() <= 1, f"{err_msg}: a row differs in {per_row.max()} elements, e.g. at {where}"


def assert_rows_adam_close(ra: dict, rb: dict):
    """`assert_adam_close` over two `rows_by_id` results, table by table (widths differ)."""
    assert ra.keys() == rb.keys()
    for pname in sorted({k[0] for k in ra}):
        keys = [k for k in ra if k[0] == pname]
        assert_adam_close(np.stack([ra[k] for k in keys]), np.stack([rb[k] for k in keys]), err_msg=pname)


def assert_same_model(a: Trainer, b: Trainer):
    assert int(a.state.step) == int(b.state.step)
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ra, rb = rows_by_id(a), rows_by_id(b)
    assert ra.keys() == rb.keys()
    for k in ra:
        np.testing.assert_array_equal(ra[k], rb[k], err_msg=str(k))


def fit(cfg, workdir, num_steps=None):
    recipe = recipes.build(cfg)
    trainer = train_main.make_trainer(cfg, str(workdir), recipe)
    tr, ev, _ = train_main.data_paths(cfg, str(workdir))
    train, evr = train_main.make_readers(cfg, recipe, tr, ev)
    summary = trainer.fit(train, eval_reader=evr, num_steps=num_steps)
    return trainer, summary


def test_main_job_trains_logs_and_checkpoints(tmp_path):
    cfg = small_config()
    s = train_main.train_and_evaluate(cfg, str(tmp_path))
    assert s["steps"] == 19 and s["examples"] == 1200  # ceil(600 / 64) per file x 2 files
    assert 0.5 < s["eval"]["auc"] <= 1 and abs(s["eval"]["auc"] - s["eval"]["auc_hist"]) < 1e-3
    assert 0 < s["bayes_auc"] < 1
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    train = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in train] == [4, 8, 12, 16, 19]
    assert all(np.isfinite(x["loss"]) and x["samples_per_sec"] > 0 for x in train)
    assert set(train[-1]["table_sizes"]) == set(s["table_sizes"]) and train[-1]["new"] > 0
    assert [x["kind"] for x in lines].count("eval") == 1
    saved = json.load(open(tmp_path / "summary.json"))
    assert saved["eval"]["auc"] == s["eval"]["auc"]
    ckpts = sorted(os.listdir(tmp_path / "checkpoints"))
    assert len(ckpts) == 3 and ckpts[-1].endswith("19")  # keep_last 3: 12, 16, 19


def test_rerun_of_a_finished_job_changes_nothing(tmp_path):
    cfg = small_config()
    a = train_main.train_and_evaluate(cfg, str(tmp_path))
    b = train_main.train_and_evaluate(cfg, str(tmp_path))
    assert b["steps"] == a["steps"] and b["eval"]["auc"] == a["eval"]["auc"]


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    cfg = small_config("--config.train.num_epochs=2")
    ref, _ = fit(cfg, tmp_path / "ref")
    # Stop after 6 steps (checkpoints at 4 and 6), then resume in a fresh trainer.
    part, _ = fit(cfg, tmp_path / "run", num_steps=6)
    assert int(part.state.step) == 6
    resumed, _ = fit(cfg, tmp_path / "run")
    assert_same_model(ref, resumed)


def test_accumulation_matches_one_big_batch(tmp_path):
    big, _ = fit(small_config("--config.train.batch_size=128", "--config.model.dtype=float32"), tmp_path / "big", num_steps=3)
    acc, _ = fit(small_config("--config.train.batch_size=64", "--config.train.accum_steps=2",
                              "--config.model.dtype=float32"), tmp_path / "acc", num_steps=3)
    for x, y in zip(jax.tree.leaves(big.state.params), jax.tree.leaves(acc.state.params)):
        assert_adam_close(x, y)
    assert_rows_adam_close(rows_by_id(big), rows_by_id(acc))


def test_adam_close_allows_isolated_elements_only():
    rng = np.random.default_rng(0)
    want = rng.standard_normal((2000, 8)).astype(np.float32)
    got = want.copy()
    got[17, 3] += 0.05                      # one element moved by ~lr: summation order
    assert_adam_close(got, want)
    moved = want.copy()
    moved[17] = want[18]                    # a misplaced row
    with pytest.raises(AssertionError, match="a row differs"):
        assert_adam_close(moved, want)
    scattered = want.copy()
    scattered[np.arange(0, 2000, 50), 0] += 0.05   # 40 rows, one element each: too many
    with pytest.raises(AssertionError, match="elements differ"):
        assert_adam_close(scattered, want)


def test_fused_bias_is_the_last_column_of_one_table(tmp_path):
    cfg = small_config("--config.features.fuse_bias=True")
    r = recipes.build(cfg)
    assert not any(name.endswith(recipes.BIAS_SUFFIX) for name in r.engine.options)
    assert {o.dim for o in r.engine.options.values()} == {9}
    rows = jax.random.normal(jax.random.key(0), (5, 9))
    kw = r.task.inputs({f"c{i + 1}": rows + i for i in range(4)}, {"i1": rows[:, :1], "i2": rows[:, 1:2]})
    np.testing.assert_array_equal(kw["sparse_emb"][:, 2], rows[:, :8] + 2)
    np.testing.assert_array_equal(kw["sparse_bias"][:, 3], rows[:, 8:] + 3)
    trainer, summary = fit(cfg, tmp_path, num_steps=6)
    assert list(trainer.state.tables) == ["merged_0_dim9"] and summary["steps"] == 6
    assert np.isfinite(summary["eval"]["logloss"])
    # Both parts of the row train: Adam moves each by ~lr (0.05) from |init| < 0.002.
    emb = np.stack(list(rows_by_id(trainer).values()))
    assert np.abs(emb[:, 8]).max() > 0.02 and np.abs(emb[:, :8]).max() > 0.02


def test_bad_initializer_kind_names_the_config_key():
    with pytest.raises(ValueError, match=r"embedding.init must be one of .*'gaussian'"):
        recipes.build(small_config("--config.embedding.init=gaussian"))


def test_tiny_tables_grow_and_train_like_big_ones(tmp_path):
    big, _ = fit(small_config("--config.embedding.num_rows=4096"), tmp_path / "big")
    small, _ = fit(small_config("--config.embedding.num_rows=2"), tmp_path / "small")  # grows many times
    assert_same_model(big, small)
    assert small.state.tables["merged_0_dim8"].table.capacity < big.state.tables["merged_0_dim8"].table.capacity


def test_nan_stops_with_step_and_table(tmp_path):
    cfg = small_config("--config.train.dense_lr=1e30", "--config.train.sparse_lr=1e30")
    with pytest.raises(TrainingError, match=r"step \d+: loss is (nan|inf)"):
        fit(cfg, tmp_path)
    ckpt = tmp_path / "checkpoints"
    # nothing non-finite was checkpointed
    if ckpt.exists():
        for d in os.listdir(ckpt):
            assert not d.startswith("step_") or int(d.split("_")[1]) < 4


def test_windows_evaluate_ahead_and_resume(tmp_path):
    from recis_jax.io import synthetic

    cfg = small_config()
    windows = []
    for w in range(3):
        p = tmp_path / f"window{w}"
        synthetic.generate(p, num_files=1, rows_per_file=300, seed=w, model_seed=0, num_dense=2, num_sparse=4,
                           vocab_size=500)
        windows.append(str(p))
    cfg.data.windows = tuple(windows)
    ref = train_main.train_and_evaluate(cfg, str(tmp_path / "ref"))
    assert [w["window"] for w in ref["windows"]] == [1, 2]
    assert all(0 <= w["auc"] <= 1 for w in ref["windows"])
    cfg2 = small_config()
    cfg2.data.windows = tuple(windows[:2])
    train_main.train_and_evaluate(cfg2, str(tmp_path / "run"))
    cfg2.data.windows = tuple(windows)
    res = train_main.train_and_evaluate(cfg2, str(tmp_path / "run"))
    assert [w["window"] for w in res["windows"]] == [2]
    assert res["windows"][0]["auc"] == ref["windows"][1]["auc"]
    assert res["steps"] == ref["steps"]


def test_export_then_predict_matches_eval(tmp_path):
    from recis_jax.train import export as export_lib

    cfg = small_config()
    train_main.train_and_evaluate(cfg, str(tmp_path / "run"))
    recipe = recipes.build(cfg)
    trainer = train_main.make_trainer(cfg, str(tmp_path / "run"), recipe)
    _, ev, _ = train_main.data_paths(cfg, str(tmp_path / "run"))
    _, evr = train_main.make_readers(cfg, recipe, ev, ev)
    trainer._init_from(evr)
    want = []
    from recis_jax.metrics import streaming
    stats = streaming.init(1)
    for b in evr.batches():
        stats, out = trainer._eval_step(trainer.state, stats, trainer.device_batch(b))
        want.append(1 / (1 + np.exp(-np.asarray(out["logits"])[np.asarray(b.mask)])))
    want = np.concatenate(want)

    export_lib.export(cfg, str(tmp_path / "run"), str(tmp_path / "export"))
    pred = export_lib.Predictor(str(tmp_path / "export"))
    probs, labels = pred.predict(pred.reader(ev, batch_size=100))  # another batch size
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-7)
    import safetensors.numpy as stnp

    files = list((tmp_path / "export" / "sparse").rglob("*.safetensors"))
    assert files and not any(k.startswith("slot") for f in files for k in stnp.load_file(str(f)))  # serving: no slots

    # A flipped byte in the dense file is caught by name.
    path = tmp_path / "export" / "dense.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match="dense.safetensors"):
        export_lib.Predictor(str(tmp_path / "export"))


def _launch(workdir, extra):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "recis_jax.cli", "train", "--config", "configs/deepfm.py:smoke",
           "--workdir", str(workdir)] + SMALL + extra
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _kill_when(proc, predicate, timeout=300):
    import signal
    import time

    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if predicate():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait()
    return False  # finished before the moment came


def test_sigkill_anywhere_then_restart_equals_uninterrupted(tmp_path):
    """SIGKILL mid-checkpoint, mid-step and mid-epoch (shuffle + prefetch on), restart
    with the same command each time: the final model equals an uninterrupted run's."""
    import glob
    import time

    extra = ["--config.train.num_epochs=2", "--config.train.checkpoint_every=2", "--config.train.keep_last=2"]
    ref = _launch(tmp_path / "ref", extra)
    assert ref.wait(timeout=600) == 0, ref.stdout.read()[-3000:]
    work = tmp_path / "run"
    ckpt = work / "checkpoints"
    metrics = work / "metrics.jsonl"

    def steps_logged():
        return sum(1 for _ in open(metrics)) if metrics.exists() else 0

    def mid_checkpoint():  # a checkpoint being written: its temp dir exists
        return bool(glob.glob(str(ckpt / "tmp.*"))) and steps_logged() >= 1

    start = time.time()
    kills = [mid_checkpoint,                                             # inside a save
             lambda: steps_logged() >= 3 and time.time() - start > 0,    # between logs: mid-step / mid-read
             lambda: steps_logged() >= 6]
    killed = 0
    for i, when in enumerate(kills):
        start = time.time()
        killed += _kill_when(_launch(work, extra), when)
        if i == 0:  # the kill left a half-written checkpoint behind
            assert glob.glob(str(ckpt / "tmp.*"))
    assert killed == 3
    final = _launch(work, extra)
    assert final.wait(timeout=600) == 0, final.stdout.read()[-3000:]

    cfg = small_config(*extra)
    a, b = [], []
    for wd, out in ((tmp_path / "ref", a), (work, b)):
        recipe = recipes.build(cfg)
        t = train_main.make_trainer(cfg, str(wd), recipe)
        tr, _, _ = train_main.data_paths(cfg, str(wd))
        t._init_from(train_main.make_readers(cfg, recipe, tr, None)[0])
        out.append(t)
    assert_same_model(a[0], b[0])
    sa, sb = (json.load(open(d / "summary.json")) for d in (tmp_path / "ref", work))
    assert sa["eval"] == sb["eval"] and sa["steps"] == sb["steps"]


@pytest.mark.parametrize("config", ["configs/dcnv2.py:smoke", "configs/seq_transformer.py:smoke"])
def test_other_configs_train(tmp_path, config):
    cfg = train_main.load_config(config, ["--config.data.generate.rows_per_file=300",
                                          "--config.train.checkpoint_every=0", "--config.train.log_every=0"])
    s = train_main.train_and_evaluate(cfg, str(tmp_path))
    assert s["steps"] > 0 and 0 <= s["eval"]["auc"] <= 1 and np.isfinite(s["eval"]["logloss"])


def test_dcnv2_recipe_pools_in_its_compute_dtype_without_command_buffers():
    """configs/dcnv2.py: the bfloat16 model gets bfloat16 pooled embeddings (it casts them
    first anyway) and its step compiles without CUDA graphs; the float32 smoke model
    keeps float32 embeddings."""
    cfg = train_main.load_config("configs/dcnv2.py")
    assert recipes.task(cfg).embedding_dtype == jnp.bfloat16 and cfg.train.command_buffers is False
    assert recipes.task(train_main.load_config("configs/dcnv2.py:smoke")).embedding_dtype is None
    assert recipes.task(small_config()).embedding_dtype is None
    assert xla_options(True) is None and xla_options(False) == {"xla_gpu_enable_command_buffer": ""}


def test_gauc_eviction_profile_and_eval_cli(tmp_path):
    cfg = small_config("--config.eval.gauc_group=c1", "--config.embedding.evict_after_steps=3",
                       "--config.train.profile_steps=(2, 3)", "--config.train.checkpoint_every=0")
    s = train_main.train_and_evaluate(cfg, str(tmp_path))
    ev = s["eval"]
    assert 0 <= ev["gauc"] <= 1 and ev["gauc_groups"] > 0
    assert s["counts"]["evicted"] > 0           # rows unseen for 3 steps went away
    assert any((tmp_path / "profile").rglob("*.xplane.pb"))
    # `recis-jax eval` on the final checkpoint gives the same numbers.
    from recis_jax import cli

    assert cli.main(["eval", "--config", "configs/deepfm.py:smoke", "--workdir", str(tmp_path)] + SMALL +
                    ["--config.eval.gauc_group=c1", "--config.embedding.evict_after_steps=3"]) == 0


def test_multitask_with_weights(tmp_path):
    import jax.numpy as jnp

    from recis_jax.models import MMoE
    from recis_jax.train import Task

    cfg = small_config()
    r = recipes.build(cfg)
    cats, nums = r.categorical, r.numeric

    def inputs(emb, batch):
        x = [emb[c] for c in cats] + [batch[n] for n in nums]
        return dict(x=jnp.concatenate(x, axis=1))

    task = Task(MMoE(num_tasks=2, num_experts=2, expert=(8,), tower=(4,), dtype=jnp.float32),
                inputs, labels=("label", "label"), task_weights=(1.0, 0.5), sample_weight="i2")
    t = Trainer(task, r.engine, r.dense_tx, r.sparse_opt, features=r.features, workdir=None, log_every=None)
    tr, ev, _ = train_main.data_paths(cfg, str(tmp_path))
    train, evr = train_main.make_readers(cfg, r, tr, ev)
    s = t.fit(train, eval_reader=evr, num_steps=3)
    assert set(s["eval"]) >= {"auc", "auc/label", "logloss/label"}
    bad = Task(r.task.module, r.task.inputs, labels=("label", "label"))   # DeepFM has one logit
    with pytest.raises(ValueError, match="2 label"):
        Trainer(bad, r.engine, r.dense_tx, r.sparse_opt, features=r.features).fit(train, num_steps=1)


def _count_calls(trainer):
    """Wraps the trainer's multi-step function; returns the list of its calls' sizes."""
    calls, inner = [], trainer._train_steps

    def counted(state, batches):
        calls.append(int(np.shape(jax.tree.leaves(batches)[0])[0]))  # the leading (steps) axis
        return inner(state, batches)

    trainer._train_steps = counted
    return calls


def test_steps_per_call_trains_like_single_steps(tmp_path):
    cfg = small_config("--config.train.log_every=5", "--config.train.checkpoint_every=10")
    single, _ = fit(cfg, tmp_path / "single")
    cfg = small_config("--config.train.log_every=5", "--config.train.checkpoint_every=10",
                       "--config.train.steps_per_call=3")
    recipe = recipes.build(cfg)
    multi = train_main.make_trainer(cfg, str(tmp_path / "multi"), recipe)
    calls = _count_calls(multi)
    tr, ev, _ = train_main.data_paths(cfg, str(tmp_path / "multi"))
    summary = multi.fit(*train_main.make_readers(cfg, recipe, tr, ev)[:1], num_steps=None)
    # 19 steps; hooks after 5, 10, 15: calls of 3 where none falls inside, the rest alone
    assert calls == [3, 3, 3, 3] and summary["steps"] == 19
    assert_same_model(single, multi)
    logs = lambda d: [x["step"] for x in map(json.loads, open(d / "metrics.jsonl")) if x["kind"] == "train"]  # noqa: E731
    assert logs(tmp_path / "multi") == logs(tmp_path / "single") == [5, 10, 15, 19]
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == sorted(
        os.listdir(tmp_path / "single" / "checkpoints"))


def test_steps_per_call_reruns_an_overflowed_step(tmp_path, monkeypatch):
    """No headroom check: tiny tables overflow inside calls; every overflowed step is
    rerun after growing, so no batch is lost and every ID gets its row."""
    big, _ = fit(small_config("--config.embedding.num_rows=4096"), tmp_path / "big")
    monkeypatch.setattr(Trainer, "_ensure_room", lambda self, lanes, force=False: None)
    cfg = small_config("--config.embedding.num_rows=2", "--config.train.steps_per_call=4",
                       "--config.train.log_every=0", "--config.train.checkpoint_every=0")
    recipe = recipes.build(cfg)
    small = train_main.make_trainer(cfg, str(tmp_path / "small"), recipe)
    calls = _count_calls(small)
    tr, ev, _ = train_main.data_paths(cfg, str(tmp_path / "small"))
    summary = small.fit(train_main.make_readers(cfg, recipe, tr, ev)[0])
    assert calls and summary["steps"] == 19 and summary["counts"]["overflow"] > 0
    assert summary["examples"] == 1200
    assert rows_by_id(small).keys() == rows_by_id(big).keys()


def test_steps_per_call_with_accumulation(tmp_path):
    """Calls of S steps whose steps are each K accumulated micro-batches: the same model."""
    extra = ["--config.train.accum_steps=2", "--config.train.log_every=0", "--config.train.checkpoint_every=0"]
    single, _ = fit(small_config(*extra), tmp_path / "single")
    cfg = small_config(*extra, "--config.train.steps_per_call=3")
    recipe = recipes.build(cfg)
    multi = train_main.make_trainer(cfg, str(tmp_path / "multi"), recipe)
    calls = _count_calls(multi)
    tr, ev, _ = train_main.data_paths(cfg, str(tmp_path / "multi"))
    summary = multi.fit(train_main.make_readers(cfg, recipe, tr, ev)[0])
    assert calls == [3, 3, 3] and summary["steps"] == 10  # 19 batches -> 10 updates, the last padded
    assert_same_model(single, multi)
