"""`recis-jax demo --workdir DIR`: the main job until the trainer lands.

Generates the built-in synthetic Criteo-like dataset into DIR/data (once), reads one
epoch with the threaded columnar reader, moves every batch to the default device (the
path a training step takes), and writes DIR/demo_summary.json: rows, batches, compiled
shapes, read throughput and the dataset's Bayes-optimal AUC (the ceiling a model
trained on it can reach).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from recis_jax.io import synthetic
from recis_jax.io.columns import FixedLenFeature, VarLenFeature
from recis_jax.io.reader import Reader


def criteo_features(num_dense: int = 13, num_sparse: int = 26, seq: bool = False) -> list:
    """The reader specs for the synthetic (and RecIS DeepFM) schema."""
    feats = [FixedLenFeature("label")]
    feats += [FixedLenFeature(f"i{i}") for i in range(1, num_dense + 1)]
    feats += [VarLenFeature(f"c{i}") for i in range(1, num_sparse + 1)]
    if seq:
        feats += [VarLenFeature("seq"), VarLenFeature("target_item")]
    return feats


def run_demo(workdir: str, *, num_files: int = 4, rows_per_file: int = 25_000, batch_size: int = 4096,
             format: str = "parquet", seed: int = 0) -> dict:
    """Generates (if absent) and reads the built-in dataset; returns the summary dict."""
    data = os.path.join(workdir, "data")
    t0 = time.perf_counter()
    if os.path.exists(os.path.join(data, "meta.json")):
        meta = json.load(open(os.path.join(data, "meta.json")))
    else:
        meta = synthetic.generate(data, num_files=num_files, rows_per_file=rows_per_file, format=format,
                                  seed=seed)
    gen_secs = time.perf_counter() - t0

    reader = Reader(data, criteo_features(), batch_size)
    shapes, rows, batches = set(), 0, 0
    t0 = time.perf_counter()
    for batch in reader:
        dev = jax.device_put(batch.features)
        shapes.add(tuple(sorted((k, tuple(np.shape(leaf))) for k, v in dev.items()
                                for leaf in jax.tree_util.tree_leaves(v))))
        rows += batch.num_rows
        batches += 1
    jax.block_until_ready(dev)
    secs = time.perf_counter() - t0
    summary = {
        "data": data,
        "files": len(reader.files),
        "rows": rows,
        "batches": batches,
        "batch_size": batch_size,
        "distinct_batch_shapes": len(shapes),
        "read_seconds": secs,
        "rows_per_sec": rows / secs,
        "generate_seconds": gen_secs,
        "bayes_auc": meta.get("bayes_auc"),
        "device": str(jax.devices()[0]),
    }
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def add_cli(sub) -> None:
    p = sub.add_parser("demo", help="generate the built-in dataset and read it onto the device")
    p.add_argument("--workdir", required=True)
    p.add_argument("--num-files", type=int, default=4)
    p.add_argument("--rows-per-file", type=int, default=25_000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--format", choices=["parquet", "orc"], default="parquet")
    p.set_defaults(func=_main)


def _main(args) -> int:
    s = run_demo(args.workdir, num_files=args.num_files, rows_per_file=args.rows_per_file,
                 batch_size=args.batch_size, format=args.format)
    print(f"read {s['rows']:,} rows in {s['batches']} batches of {s['batch_size']} from {s['files']} files "
          f"at {s['rows_per_sec']:,.0f} rows/s onto {s['device']} ({s['distinct_batch_shapes']} distinct shapes)")
    print(f"dataset Bayes-optimal AUC: {s['bayes_auc']}; summary: {os.path.join(args.workdir, 'demo_summary.json')}")
    return 0
