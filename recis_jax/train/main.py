"""`recis-jax train|eval` and `train_and_evaluate(config, workdir)`: the main job.

    recis-jax train --config configs/deepfm.py --workdir /tmp/deepfm
    recis-jax train --config configs/deepfm.py:smoke --workdir /tmp/x --config.train.batch_size=64
    recis-jax eval  --config configs/deepfm.py --workdir /tmp/deepfm

With no data paths in the config (`data.train` empty) the built-in generated dataset is
made under WORKDIR/data (train/ and eval/, same planted model), and the summary shows
the model's AUC beside the dataset's Bayes-optimal AUC (the ceiling). Running the same
command again resumes from the latest checkpoint in WORKDIR/checkpoints.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
from typing import Any

import jax
import ml_collections

from recis_jax.io import synthetic
from recis_jax.io.reader import Reader
from recis_jax.train import recipes
from recis_jax.train.trainer import Trainer


# -- configs ---------------------------------------------------------------------------
def load_config(spec: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> `get_config(arg)`, then `--config.a.b=value`
    overrides (values parsed as Python literals, else kept as strings; the type must
    match the existing field, as ConfigDict enforces)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    mod_spec = importlib.util.spec_from_file_location("recis_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    cfg = module.get_config(arg or None)
    for item in overrides or []:
        if not item.startswith("--config."):
            raise ValueError(f"unknown argument {item!r} (overrides look like --config.train.batch_size=64)")
        key, eq, raw = item[len("--config."):].partition("=")
        if not eq:
            raise ValueError(f"override {item!r} needs a value: --config.{key}=VALUE")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in node:
                raise KeyError(f"override {item!r}: config has no group {p!r}")
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(f"override {item!r}: config has no key {key!r}")
        old = node[parts[-1]]
        if isinstance(old, float) and isinstance(value, int):
            value = float(value)
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        node[parts[-1]] = value
    return cfg


def config_hash(cfg: ml_collections.ConfigDict) -> str:
    return hashlib.sha256(cfg.to_json(sort_keys=True).encode()).hexdigest()[:16]


# -- data ------------------------------------------------------------------------------
def data_paths(cfg, workdir: str) -> tuple[Any, Any, dict]:
    """(train paths, eval paths, generated dataset meta or {}). Generates the built-in
    dataset under workdir/data when the config names no training data."""
    d = cfg.data
    if d.train:
        return d.train, d.get("eval") or None, {}
    g = d.generate
    kw = dict(rows_per_file=g.rows_per_file, format=g.format, model_seed=g.seed,
              num_dense=cfg.features.num_dense, num_sparse=cfg.features.num_categorical,
              vocab_size=g.vocab_size, zipf_a=g.zipf_a, multi_hot=tuple(g.get("multi_hot", (1, 1))),
              seq_len=cfg.features.get("seq_len", 0))
    splits = {"train": (g.num_files, g.seed), "eval": (g.eval_files, g.seed + 1000)}
    out = {split: os.path.join(workdir, "data", split) for split in splits}

    def generate_missing():
        for split, (files, seed) in splits.items():
            want = dict(kw, num_files=files, seed=seed)
            if _generated_args(out[split], want) != want:  # absent, or made by another config
                synthetic.generate(out[split], num_files=files, seed=seed, overwrite=True, **kw)

    if jax.process_count() > 1:  # a shared workdir gets one writer; separate disks, one each
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            generate_missing()
        multihost_utils.sync_global_devices("recis-jax generated data")
        if jax.process_index() != 0:
            generate_missing()
    else:
        generate_missing()
    with open(os.path.join(out["eval"], "meta.json")) as f:
        meta = json.load(f)
    return out["train"], out["eval"], meta


def _generated_args(path: str, like: dict) -> dict | None:
    try:
        with open(os.path.join(path, "meta.json")) as f:
            args = json.load(f)["args"]
    except (OSError, KeyError, ValueError):
        return None
    return {k: args.get(k) for k in like}


def make_readers(cfg, recipe, train_paths, eval_paths) -> tuple[Reader, Reader | None]:
    t, d = cfg.train, cfg.data
    train = Reader(train_paths, recipe.columns, t.batch_size, format=d.get("format") or None, shuffle=d.shuffle,
                   seed=cfg.seed, num_epochs=t.num_epochs, num_threads=d.num_threads)
    ev = (Reader(eval_paths, recipe.columns, cfg.eval.batch_size or t.batch_size, format=d.get("format") or None,
                 num_epochs=1, num_threads=d.num_threads) if eval_paths else None)
    return train, ev


def make_trainer(cfg, workdir: str, recipe: recipes.Recipe) -> Trainer:
    """The one-device Trainer, or the ShardedTrainer over `train.mesh` devices (all
    devices of all processes in a `jax.distributed` run)."""
    t = cfg.train
    profile = tuple(t.profile_steps) if t.get("profile_steps") else None
    kw = dict(features=recipe.features, workdir=workdir, seed=cfg.seed, log_every=t.log_every,
              eval_every=t.eval_every or None, checkpoint_every=t.checkpoint_every or None, keep_last=t.keep_last,
              keep_every=t.get("keep_every") or None, accum_steps=t.accum_steps,
              steps_per_call=t.get("steps_per_call", 1), command_buffers=t.get("command_buffers", True),
              profile=profile,
              config_hash=config_hash(cfg))
    n = t.get("mesh", 0) or (jax.device_count() if jax.process_count() > 1 else 0)
    if n > 1:
        from recis_jax.sharding.mesh import make_mesh
        from recis_jax.train.sharded import ShardedTrainer

        e = cfg.embedding
        return ShardedTrainer(recipe.task, recipe.engine, recipe.dense_tx, recipe.sparse_opt, mesh=make_mesh(n),
                              rows_per_shard=e.get("rows_per_shard") or None, zero=bool(t.get("zero", False)),
                              **kw)
    return Trainer(recipe.task, recipe.engine, recipe.dense_tx, recipe.sparse_opt,
                   max_rows=cfg.embedding.get("max_rows") or None, **kw)


# -- jobs ------------------------------------------------------------------------------
def train_and_evaluate(cfg, workdir: str) -> dict:
    """Trains (resuming from workdir's latest checkpoint), evaluates, writes
    workdir/summary.json and returns it. Online learning when `data.windows` is set."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json(indent=2))
    recipe = recipes.build(cfg)
    trainer = make_trainer(cfg, workdir, recipe)
    if cfg.data.get("windows"):
        def window_reader(paths):
            return Reader(paths, recipe.columns, cfg.train.batch_size, format=cfg.data.get("format") or None,
                          shuffle=cfg.data.shuffle, seed=cfg.seed, num_epochs=1, num_threads=cfg.data.num_threads)
        return trainer.fit_windows(list(cfg.data.windows), window_reader)
    train_paths, eval_paths, meta = data_paths(cfg, workdir)
    train, ev = make_readers(cfg, recipe, train_paths, eval_paths)
    summary = trainer.fit(train, eval_reader=ev, num_steps=cfg.train.num_steps or None)
    if meta.get("bayes_auc") is not None:
        summary["bayes_auc"] = meta["bayes_auc"]
        trainer._write_summary(summary)
    return summary


def evaluate(cfg, workdir: str) -> dict:
    """Evaluates the latest checkpoint in workdir on the config's eval data."""
    recipe = recipes.build(cfg)
    trainer = make_trainer(cfg, workdir, recipe)
    if trainer.checkpoints is None or trainer.checkpoints.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints: train first")
    train_paths, eval_paths, _ = data_paths(cfg, workdir)
    train, ev = make_readers(cfg, recipe, train_paths, eval_paths)
    if ev is None:
        raise ValueError("the config names no eval data (data.eval)")
    trainer._init_from(ev)
    return trainer.evaluate(ev, log_step=int(trainer.state.step))


# -- CLI -------------------------------------------------------------------------------
def add_cli(sub) -> None:
    for name, fn, text in (("train", _train, "train and evaluate a model from a config (resumes)"),
                           ("eval", _eval, "evaluate the latest checkpoint of a workdir")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, help="configs/<model>.py[:variant]")
        p.add_argument("--workdir", required=True)
        p.add_argument("--mesh", type=int, default=None,
                       help="shard tables over this many devices (= --config.train.mesh)")
        p.add_argument("--coordinator", default=None, help="host:port of process 0 (jax.distributed)")
        p.add_argument("--num-processes", type=int, default=None)
        p.add_argument("--process-id", type=int, default=None)
        p.set_defaults(func=fn, accepts_overrides=True)


def _setup(args):
    """jax.distributed (multi-process) before anything touches the devices, then the config."""
    if args.coordinator:
        # Collectives between CPU devices of different processes need gloo (no effect on GPUs).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    cfg = load_config(args.config, args.overrides)
    if args.mesh is not None:
        cfg.train.mesh = args.mesh
    return cfg


def _train(args) -> int:
    cfg = _setup(args)
    s = train_and_evaluate(cfg, args.workdir)
    ev = s.get("eval", {})
    line = f"trained {s.get('steps')} steps, {s.get('examples', 0):,} examples"
    if "samples_per_sec" in s:
        line += f" at {s['samples_per_sec']:,.0f} samples/s"
    print(line)
    if ev:
        print(f"eval AUC {ev.get('auc', float('nan')):.4f}  logloss {ev.get('logloss', float('nan')):.4f}  "
              f"calibration {ev.get('calibration', float('nan')):.3f}  ({ev.get('count')} examples)"
              + (f"; Bayes-optimal AUC of the generated data {s['bayes_auc']:.4f}" if "bayes_auc" in s else ""))
    print(f"summary: {os.path.join(args.workdir, 'summary.json')}")
    return 0


def _eval(args) -> int:
    cfg = _setup(args)
    res = evaluate(cfg, args.workdir)
    print(json.dumps(res, indent=2, default=float))
    return 0
