"""Serving export and batch prediction.

    recis-jax export  --config configs/deepfm.py --workdir /tmp/deepfm --out /tmp/deepfm_export
    recis-jax predict --export /tmp/deepfm_export --data /data/new/*.parquet --out /tmp/preds.parquet

An export directory holds what inference needs and nothing else:
  config.json        the training config (rebuilds features, tables and model)
  dense.safetensors  the model params, one tensor per leaf ("Dense_0/kernel", ...)
  sparse/            the live embedding rows (safetensors, ids + rows; no optimizer
                     slots), in the checkpoint format (recis_jax.checkpoint.sparse)
  serving.json       step, config hash, the sparse manifest part and sha256 of every file
It is written into a temporary directory and renamed, like a checkpoint. `predict`
verifies the checksums, rebuilds the tables (IDs never seen in training read zeros, as in
evaluation) and scores the files in order.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.numpy as stnp

from recis_jax.checkpoint.sparse import CheckpointError, fsync_tree, load_sparse, save_sparse, sha256_file, write_json
from recis_jax.io.files import file_info, list_files
from recis_jax.io.reader import Reader
from recis_jax.train import recipes
from recis_jax.train.main import config_hash, load_config, make_trainer

DENSE_FILE = "dense.safetensors"
SERVING_MANIFEST = "serving.json"


def _flat(params) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in leaves}


def export(cfg, workdir: str, out: str, step: int | None = None) -> dict:
    """Writes the serving export of workdir's checkpoint (default the latest) to `out`."""
    recipe = recipes.build(cfg)
    trainer = make_trainer(cfg, workdir, recipe)
    step = step if step is not None else trainer.checkpoints.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints: train first")
    reader = Reader(cfg.data.eval or cfg.data.train or os.path.join(workdir, "data", "eval"), recipe.columns,
                    cfg.train.batch_size, num_epochs=1)
    trainer._init_from(reader)
    if int(trainer.state.step) != step:
        trainer.restore(step)
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export.", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(cfg.to_json(indent=2))
        stnp.save_file(_flat(jax.device_get(trainer.dense_params())), os.path.join(tmp, DENSE_FILE))
        tables = {p: ts._replace(table=ts.table._replace(slots={}, slot_defaults={}))
                  for p, ts in trainer.state.tables.items()}
        sparse = save_sparse(tmp, tables, recipe.engine)
        files = {name: sha256_file(os.path.join(tmp, name)) for name in ("config.json", DENSE_FILE)}
        manifest = {"format": "recis-jax-export/1", "step": step, "config_hash": config_hash(cfg),
                    "files": files, "tables": sparse}
        write_json(os.path.join(tmp, SERVING_MANIFEST), manifest)
        fsync_tree(tmp)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


class Predictor:
    """A loaded export: `predict(reader) -> float32 [N, T]` probabilities."""

    def __init__(self, directory: str):
        path = os.path.join(directory, SERVING_MANIFEST)
        try:
            with open(path) as f:
                self.manifest = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable export manifest: {e}") from e
        for name, digest in self.manifest.get("files", {}).items():
            fpath = os.path.join(directory, name)
            if os.path.basename(name) != name or not os.path.isfile(fpath) or sha256_file(fpath) != digest:
                raise CheckpointError(f"{fpath}: missing or sha256 mismatch with serving.json")
        with open(os.path.join(directory, "config.json")) as f:
            self.cfg = ml_collections.ConfigDict(json.load(f))
        self.recipe = recipes.build(self.cfg)
        self.directory = directory
        self.trainer = None
        self.missing_labels: list[str] = []

    def _load(self, reader: Reader):
        from recis_jax.train.trainer import Trainer

        t = Trainer(self.recipe.task, self.recipe.engine, self.recipe.dense_tx, None, features=self.recipe.features,
                    workdir=None, log_every=None)
        t.sparse_opt = None
        t._init_from(reader)
        flat = stnp.load_file(os.path.join(self.directory, DENSE_FILE))
        leaves = jax.tree_util.tree_leaves_with_path(t.state.params)
        new = []
        for path, v in leaves:
            key = "/".join(str(getattr(k, "key", k)) for k in path)
            if key not in flat or flat[key].shape != np.shape(v):
                raise CheckpointError(f"{self.directory}/{DENSE_FILE}: param {key!r} missing or of another shape")
            new.append(flat[key])
        params = jax.tree_util.tree_unflatten(jax.tree.structure(t.state.params), new)
        tables = load_sparse(self.directory, self.manifest, self.recipe.engine, None)
        t.state = t.state._replace(params=jax.device_put(params), tables=tables)
        self.trainer = t

    def reader(self, paths, batch_size: int | None = None) -> Reader:
        """A reader over `paths` in order; label columns are optional (serving data
        usually has none: they read as 0 and the returned labels are meaningless)."""
        b = batch_size or self.cfg.train.batch_size
        labels = set(self.recipe.task.labels)
        present = set(file_info(list_files(paths)[0]).schema.names)
        cols = [c for c in self.recipe.columns if c.name not in labels or c.source in present]
        self.missing_labels = sorted(labels - {c.name for c in cols})
        return Reader(paths, cols, b, num_epochs=1)

    def predict(self, reader: Reader) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities float32 [N, T], labels float32 [N, T]) over the reader's rows in order."""
        if self.trainer is None:
            self._load(reader)
        t = self.trainer
        from recis_jax.metrics import streaming

        probs, labels = [], []
        stats = streaming.init(self.recipe.task.num_tasks)
        for b in reader.batches():
            for name in self.missing_labels:
                b.features[name] = np.zeros((len(b.mask), 1), np.float32)
            stats, out = t._eval_step(t.state, stats, t.device_batch(b))
            out = jax.device_get(out)
            keep = np.asarray(b.mask)
            probs.append(1.0 / (1.0 + np.exp(-out["logits"][keep])))
            labels.append(out["labels"][keep])
        return np.concatenate(probs).astype(np.float32), np.concatenate(labels)


def add_cli(sub) -> None:
    p = sub.add_parser("export", help="write a serving export (dense params, config, live embeddings)")
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=int, default=None)
    p.set_defaults(func=_export, accepts_overrides=True)
    p = sub.add_parser("predict", help="score data files with a serving export")
    p.add_argument("--export", required=True)
    p.add_argument("--data", required=True, nargs="+")
    p.add_argument("--out", default=None, help="a .parquet file for the predictions")
    p.add_argument("--batch-size", type=int, default=None)
    p.set_defaults(func=_predict)


def _export(args) -> int:
    cfg = load_config(args.config, args.overrides)
    m = export(cfg, args.workdir, args.out, args.step)
    rows = sum(e.get("rows", 0) for e in m["tables"].values())
    print(f"exported step {m['step']} to {args.out}: {len(m['tables'])} tables, {rows:,} live rows")
    return 0


def _predict(args) -> int:
    from recis_jax.metrics import auc

    pred = Predictor(args.export)
    probs, labels = pred.predict(pred.reader(args.data, args.batch_size))
    names = list(pred.recipe.task.labels)
    print(f"scored {len(probs):,} rows" + "".join(
        f"; auc({n}) {auc(labels[:, i], probs[:, i]):.4f}" for i, n in enumerate(names)
        if n not in pred.missing_labels))
    if args.out:
        cols = {f"prediction_{n}" if len(names) > 1 else "prediction": probs[:, i] for i, n in enumerate(names)}
        pq.write_table(pa.table(cols), args.out)
        print(f"wrote {args.out}")
    return 0
