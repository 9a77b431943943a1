"""Weak scaling of the sharded embedding train step over 1..N devices.

    python benchmarks/sharding_scaling.py --out DIR [--devices 1,2,4] [--bucket auto|default|N] [--quick]

Per device: `--rows` examples x 8 features x 4 Zipf(1.1) IDs over a 1M vocabulary per
feature, dim 64, one merged table row-sharded over the mesh (SparseAdam), a linear
logit over the pooled features (dense SGD). The same per-device batch at every device
count (weak scaling): efficiency = step time on 1 device / step time on n. Batches are
built and placed before timing; median over --steps steps after 3 warm-up steps.

Bucket capacity (keys one device sends one owner per step): `default` is the engine's
safe bound (2x lanes / n, for all-unique lanes: owners then sort and probe ~2x the
lanes a single device has); `auto` measures it: the warm-up steps run with the default,
then the capacity becomes 1.25 x the largest bucket fill they saw (rounded up to 256)
and the step is rebuilt, as the trainer's capacity agreement would (an overflow later
would skip the step and stop the benchmark, so nothing is silently dropped).
Writes DIR/sharding_scaling_<platform>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import common  # noqa: E402
import recis_jax  # noqa: E402,F401  (x64)
from recis_jax.embedding.engine import EmbeddingEngine, EmbeddingOption  # noqa: E402
from recis_jax.optim import sparse_adam  # noqa: E402
from recis_jax.ragged import Ragged  # noqa: E402
from recis_jax.sharding import ShardedEmbeddingEngine, make_mesh, make_train_step, put, split_features  # noqa: E402

FEATURES = [f"c{i}" for i in range(8)]
PER_ROW, VOCAB, DIM = 4, 1_000_000, 64


def loss_fn(params, pooled, batch):
    logits = sum(pooled[f] @ params[f] for f in FEATURES)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, batch["labels"]))


def global_batch(rng, rows: int) -> dict:
    feats = {}
    for i, f in enumerate(FEATURES):
        ids = (np.minimum(rng.zipf(1.1, rows * PER_ROW), VOCAB) * 2654435761 + i).astype(np.int64)
        splits = (np.arange(rows + 1) * PER_ROW).astype(np.int32)
        feats[f] = Ragged(ids, splits)
    return {"features": feats, "labels": rng.integers(0, 2, rows).astype(np.float32)}


def run(n: int, rows: int, steps: int, bucket: str) -> dict:
    mesh = make_mesh(n)
    rows_per_table = 2 * VOCAB  # room for every ID of a feature
    opts = {f: EmbeddingOption(DIM, num_rows=rows_per_table) for f in FEATURES}
    engine = EmbeddingEngine(opts)
    sharded = ShardedEmbeddingEngine(engine, mesh, bucket_capacity=None if bucket in ("auto", "default") else int(bucket))
    sparse_opt, dense_tx = sparse_adam(1e-3), optax.sgd(0.1)
    step = make_train_step(sharded, loss_fn, sparse_opt, dense_tx)
    tables = sharded.init(sparse_opt)
    params = {f: jnp.zeros(DIM, jnp.float32) for f in FEATURES}
    opt_state = dense_tx.init(params)
    rng = np.random.default_rng(0)
    cap = rows * PER_ROW  # every row has exactly PER_ROW IDs
    batches = []
    for _ in range(steps + 3):
        g = global_batch(rng, rows * n)
        parts = split_features(g["features"], n, cap)
        labels = g["labels"].reshape(n, rows)
        batches.append(put(mesh, [{"features": p, "labels": labels[i]} for i, p in enumerate(parts)]))
    jax.block_until_ready(batches)
    t0 = time.perf_counter()
    params, opt_state, tables, m = step(params, opt_state, tables, batches[0], jnp.int32(0))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    def fill_of(m):
        return max(int(t["bucket_fill"]) for t in m["tables"].values())

    fill, times = fill_of(m), []
    for i, b in enumerate(batches[1:]):
        if bucket == "auto" and i == 2:  # capacity from the warm-up steps' fills: rebuild
            sharded._bucket_capacity = -(-int(1.25 * fill) // 256) * 256
            step = make_train_step(sharded, loss_fn, sparse_opt, dense_tx)
        t0 = time.perf_counter()
        params, opt_state, tables, m = step(params, opt_state, tables, b, jnp.int32(i + 1))
        jax.block_until_ready((tables, m))
        if i >= 3:
            times.append(time.perf_counter() - t0)
        elif i == 2 and bucket == "auto":
            compile_s += time.perf_counter() - t0
        if bool(m["skipped"]):
            raise RuntimeError(f"step skipped (overflow) at n={n}: {jax.device_get(m['tables'])}")
        fill = max(fill, fill_of(m))
    cap = max(int(t["bucket_capacity"]) for t in m["tables"].values())
    ms = 1e3 * statistics.median(times)
    return {"devices": n, "rows_per_device": rows, "lookups_per_device": rows * len(FEATURES) * PER_ROW,
            "step_ms": round(ms, 3), "samples_per_s": round(rows * n / ms * 1e3), "compile_s": round(compile_s, 1),
            "bucket_capacity": cap, "bucket_fill_max": fill, "loss": float(m["loss"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default=None, help="device counts (default 1, 2, 4, ... up to all)")
    ap.add_argument("--rows", type=int, default=8192, help="examples per device per step")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--bucket", default="auto", help="auto (measured), default (engine bound) or an int")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.quick:
        global VOCAB
        VOCAB, args.rows, args.steps = 10_000, 256, 4
    total = jax.device_count()
    counts = [int(c) for c in args.devices.split(",")] if args.devices else \
        [c for c in (1, 2, 4, 8, 16) if c <= total]
    results = [run(n, args.rows, args.steps, args.bucket) for n in counts]
    for r in results:
        r["weak_scaling_efficiency"] = round(results[0]["step_ms"] / r["step_ms"], 3)
        print(r, flush=True)
    env = common.env_info(with_jax=True)
    plat = jax.default_backend()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sharding_scaling_{plat}.json").write_text(json.dumps({"env": env, "results": results}, indent=2))
    device = env.get("gpu_name") or env.get("cpu")
    lines = [f"# Sharded embedding step, weak scaling ({device} x {total})", "",
             f"{env['date_utc']}; jax {env['versions']['jax']}. Per device: {args.rows} examples x "
             f"{len(FEATURES)} features x {PER_ROW} Zipf(1.1) IDs (vocabulary {VOCAB:,} per feature), dim {DIM}, "
             "one merged table row-sharded over the mesh, SparseAdam + dense SGD; median of "
             f"{args.steps - 1} steps; bucket capacity: {args.bucket}.", "",
             "| devices | lookups/device | bucket cap / max fill | step ms | samples/s | weak-scaling efficiency "
             "| compile s |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['devices']} | {r['lookups_per_device']:,} | {r['bucket_capacity']:,} / {r['bucket_fill_max']:,} "
              f"| {r['step_ms']} | {r['samples_per_s']:,} | "
              f"{r['weak_scaling_efficiency']} | {r['compile_s']} |" for r in results]
    (out / f"sharding_scaling_{plat}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
