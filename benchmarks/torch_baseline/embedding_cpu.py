"""PyTorch CPU baseline for benchmarks/embedding.py: one feature's embedding train step.

    python benchmarks/torch_baseline/embedding_cpu.py --data DIR [--variants mapped,static]

Runs in its own Python 3.11 environment with torch 2.13.0 (CPU); benchmarks/embedding.py
creates that environment and launches this script. It reads the ID streams the JAX
benchmark wrote (DIR/manifest.json + one .npz per table size) so both frameworks train
on exactly the same lookups, and prints one JSON object to stdout.

The job, as a competent PyTorch user would write it without TorchRec:
  a batch of B bags x 4 int64 IDs -> ID -> row mapping -> nn.EmbeddingBag(mode="sum",
  sparse=True) -> loss = sum(pooled ** 2) -> backward -> torch.optim.SparseAdam on the
  touched rows. The table is preallocated with the same capacity as the JAX slab (live
  rows + headroom for the new IDs of every step).

Variants:
  mapped  collision-free 64-bit ID -> row mapping in tensors: `torch.unique(ids,
          return_inverse=True)`, then `torch.searchsorted` in a sorted key index (keys
          int64 [n] + their rows) finds existing IDs; new IDs get the next free rows and
          are merged into the sorted index (an O(n) merge with boolean-mask scatters -
          the sorted index is what keeps the lookup vectorised, and a sorted array can
          only grow by rewriting it). New rows are initialised N(0, 0.01).
  static  static vocabulary: the IDs already are row numbers in [0, R) (the ideal a
          dynamic table cannot reach: no mapping at all).

Timing: wall clock of the whole step (mapping + forward + backward + optimizer) per
step, median over the timed steps after warm-up; torch runs eagerly, so the clock
stops when the step's Python returns.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # benchmarks/
from common import CpuMonitor, vocab_key, wait_quiet  # noqa: E402


class SortedIndex:
    """Collision-free int64 ID -> row map kept as a sorted key array (tensors only)."""

    def __init__(self, torch, keys, rows, num_rows):
        self.torch = torch
        order = torch.argsort(keys)
        self.keys = keys[order].contiguous()
        self.rows = rows[order].contiguous()
        self.num_rows = int(num_rows)  # next free row

    def lookup_or_insert(self, ids):
        """Rows int64 [L] for ids int64 [L]; returns (rows, new rows int64 [k])."""
        torch = self.torch
        u, inv = torch.unique(ids, sorted=True, return_inverse=True)
        n = self.keys.numel()
        pos = torch.searchsorted(self.keys, u)
        posc = pos.clamp(max=max(n - 1, 0))
        found = self.keys[posc] == u if n else torch.zeros_like(u, dtype=torch.bool)
        rows_u = torch.where(found, self.rows[posc], 0)
        miss = ~found
        k = int(miss.sum())
        new_rows = torch.arange(self.num_rows, self.num_rows + k, dtype=torch.int64)
        if k:
            rows_u[miss] = new_rows
            # Merge the (sorted) new keys into the sorted index: O(n).
            ins = pos[miss] + torch.arange(k, dtype=torch.int64)
            keep = torch.ones(n + k, dtype=torch.bool)
            keep[ins] = False
            keys = torch.empty(n + k, dtype=torch.int64)
            rows = torch.empty(n + k, dtype=torch.int64)
            keys[keep] = self.keys
            rows[keep] = self.rows
            keys[ins] = u[miss]
            rows[ins] = new_rows
            self.keys, self.rows = keys, rows
            self.num_rows += k
        return rows_u[inv], new_rows


def run_config(torch, variant, vocab, capacity, dim, idx_stream, bags, ids_per_bag, warmup, fresh_total, retry,
               lr=1e-3):
    """One (table size, distribution, dim, variant): returns per-step seconds etc."""
    nn = torch.nn
    torch.manual_seed(0)
    emb = nn.EmbeddingBag(capacity, dim, mode="sum", sparse=True, _weight=torch.empty(capacity, dim))
    with torch.no_grad():
        emb.weight.normal_(0.0, 0.01)
    opt = torch.optim.SparseAdam(emb.parameters(), lr=lr)
    index = None
    t0 = time.perf_counter()
    if variant == "mapped":
        keys = torch.from_numpy(vocab_key(np.arange(vocab, dtype=np.int64)))
        index = SortedIndex(torch, keys, torch.arange(vocab, dtype=torch.int64), vocab)
        del keys
    prefill_s = time.perf_counter() - t0
    best = None
    for attempt in range(retry["retries"] + 1):
        waited = wait_quiet(retry["quiet_cores"], retry["load_wait"])
        stream = idx_stream.copy()
        stream[stream >= vocab] += attempt * fresh_total  # fresh IDs stay fresh on a retry
        times, new_counts, mon = [], [], None
        for s in range(stream.shape[0]):
            idx = stream[s]
            if variant == "mapped":
                ids = torch.from_numpy(vocab_key(idx))  # host-side input prep, not timed
            else:
                ids = torch.from_numpy(idx)
            if s == warmup:
                mon = CpuMonitor()
            t0 = time.perf_counter()
            if variant == "mapped":
                rows, new_rows = index.lookup_or_insert(ids)
                if new_rows.numel():
                    with torch.no_grad():
                        emb.weight[new_rows] = torch.randn(new_rows.numel(), dim) * 0.01
                new_counts.append(int(new_rows.numel()))
            else:
                rows = ids
            pooled = emb(rows.view(bags, ids_per_bag))
            loss = pooled.pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            if s >= warmup:
                times.append(dt)
        other = mon.other_cores()
        # Keep the least disturbed attempt.
        if best is None or other < best[0]:
            best = (other, times, new_counts, attempt, waited)
        if other <= retry["max_other_cores"]:
            break
        if attempt < retry["retries"]:
            print(f"# torch retry {variant} N={vocab:,} dim={dim}: others used {other:.2f} cores "
                  f"({1e3 * statistics.median(times):.2f} ms)", file=sys.stderr, flush=True)
    other, times, new_counts, used, waited = best
    out = {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "steps": len(times),
        "warmup": warmup,
        "prefill_s": prefill_s,
        "loss_finite": bool(torch.isfinite(loss).item()),
        "other_cpu_cores": round(other, 3),
        "attempts": attempt + 1,
        "attempt_used": used,
        "waited_quiet_s": round(waited, 1),
    }
    if variant == "mapped":
        out["new_ids_per_step"] = statistics.mean(new_counts[warmup:])
        out["index_size"] = int(index.keys.numel())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="directory written by benchmarks/embedding.py")
    p.add_argument("--variants", default="mapped,static")
    args = p.parse_args(argv)

    import torch

    data = pathlib.Path(args.data)
    man = json.loads((data / "manifest.json").read_text())
    results = []
    for cfg in man["configs"]:
        z = np.load(data / cfg["file"])
        for dist in cfg["dists"]:
            stream = z[f"idx_{dist}"]
            # Cross-check: our vocab_key reproduces the IDs the JAX side trained on.
            sample = z[f"keys_sample_{dist}"]
            if not np.array_equal(vocab_key(stream[0, : sample.shape[0]]), sample):
                raise SystemExit("vocab_key mismatch between the JAX benchmark and the torch baseline")
            for variant in args.variants.split(","):
                r = run_config(torch, variant, cfg["vocab"], cfg["capacity"], cfg["dim"], stream,
                               man["bags"], man["ids_per_bag"], man["warmup"], cfg["fresh_total"], man)
                r.update(vocab=cfg["vocab"], capacity=cfg["capacity"], dim=cfg["dim"], dist=dist,
                         variant=variant)
                results.append(r)
                print(f"# torch {variant:6s} N={cfg['vocab']:>9,} {dist:7s} dim={cfg['dim']:3d}: "
                      f"{r['median_ms']:.2f} ms (others used {r['other_cpu_cores']:.2f} cores)", file=sys.stderr, flush=True)
                gc.collect()
    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_config_parallel": torch.__config__.parallel_info().splitlines()[:6],
        "cpu_count": os.cpu_count(),
    }
    json.dump({"env": env, "results": results}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
