"""Embedding-bag pooling at the DLRM-dcnv2 shape: kernel configurations, forward and backward.

The sparse part of the e2e dcnv2 step (benchmarks/e2e.py) pools 26 features of MLPerf's
hotness (1 to 100 IDs per bag, batch 65536: 14M lanes, dim 128) from their unique rows
(`recis_jax.embedding.pooling.pool_unique`) and, in the backward, gathers the bag
gradients onto the unique rows (one `segment_gather_sum` over all unique rows, most
with 1-2 occurrences, the rest padding). This measures, by GPU busy time (CUPTI trace):

  fwd_*   the forward: one kernel call over all bags (default config), `pool_unique`
          (one call per feature group of the same config), per-feature calls with other
          lane budgets / warps, and XLA's gather + sum of the fixed-hotness bags;
  bwd_*   the backward gather with K (rows per step) / G (lanes) / warps / L (piece);
  bwd+update_*  the backward gather and row-wise Adagrad update: two passes vs the fused
          kernel (SegmentGrads) per lanes / warps (--update-only: this section alone);
  copy    x + 1 over 1.8 GB, the bandwidth reference.

    python benchmarks/pooling_dcnv2.py [--batch 65536] [--out benchmarks/results]

Writes pooling_dcnv2_<gpu>.json and .md. Needs a GPU (the compiled kernels);
RECIS_KERNELS=interpret with a small --batch checks the script on a CPU (no timings).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
import e2e_data as D  # noqa: E402
from pallas_kernels import embedding_bag as eb  # noqa: E402
from pallas_kernels import sparse_update as su  # noqa: E402
from recis_jax.embedding import dedup, pooling  # noqa: E402

DIM = 128
FWD = [(1, 4096, 4), (1, 8192, 8), (1, 16384, 8)]                  # (K min, G*K*D budget, warps)
BWD = [(1, 32, 4, 16), (1, 64, 4, 16), (1, 64, 8, 16), (1, 128, 8, 16), (1, 32, 2, 16), (1, 16, 2, 16),
       (1, 32, 4, 64), (2, 16, 4, 32), (2, 32, 4, 32), (2, 16, 2, 32)]  # (K, G, warps, L)
FUSED = [(16, 4), (8, 2), (4, 1), (8, 1), (16, 2), (4, 2), (2, 1)]  # fused backward + update: (G, warps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--update-only", action="store_true", help="only the backward + update section")
    a = ap.parse_args()
    interpret = os.environ.get("RECIS_KERNELS") == "interpret"
    b, hot = a.batch, D.MLPERF_HOTNESS
    vocab = [min(v, D.DCNV2_ROW_CAP) for v in D.MLPERF_VOCAB]
    rng = np.random.default_rng(0)
    tab = np.concatenate([np.full(b * h, f, np.int32) for f, h in enumerate(hot)])
    ids = np.concatenate([rng.integers(0, v, b * h) for v, h in zip(vocab, hot)])
    n = tab.size
    u = jax.jit(dedup.unique_keys)(jnp.asarray(tab), jnp.asarray(ids), jnp.ones(n, bool))
    rows = jax.random.normal(jax.random.key(0), (n, DIM), jnp.float32)
    bags = [(jnp.asarray(np.arange(b + 1, dtype=np.int32) * h), jnp.asarray(np.repeat(np.arange(b, dtype=np.int32), h)),
             None) for h in hot]
    ua = (u.inverse, u.order, u.splits)
    starts = np.cumsum([0] + [b * h for h in hot])
    splits = jnp.asarray(np.concatenate([np.arange(b) * h + s for h, s in zip(hot, starts)] + [[n]]).astype(np.int32))
    bag = jnp.asarray(np.concatenate([np.repeat(np.arange(b), h) + f * b for f, h in enumerate(hot)]).astype(np.int32))
    res = {"env": common.env_info(), "batch": b, "dim": DIM, "lanes": n, "unique": int(u.num_unique), "us": {}}

    def sgs(*args, **kw):
        return eb.segment_gather_sum_pallas(*args, interpret=interpret, **kw)

    def timed(name, f, *args):
        # Every array is an argument: closed-over index arrays are constant-folded for minutes.
        c = jax.jit(f).lower(*args).compile()
        r = common.jax_device_time(lambda: c(*args), calls=5, warmup=2)
        res["us"][name] = r.get("busy_us_per_op", r.get("error"))
        print(f"{name:36s} {res['us'][name]}", flush=True)

    if a.update_only:
        bwd_update(res, b, hot, u, interpret)
        write(res, a.out, "pooling_dcnv2_update", n, b, "--update-only")
        return
    x = jnp.ones((n, DIM // 4), jnp.float32)
    timed("copy", lambda x: x + 1, x)
    if isinstance(res["us"]["copy"], float):
        res["copy_GBps"] = round(2 * x.nbytes / (res["us"]["copy"] * 1e-6) / 1e9, 1)
    del x
    timed("fwd_one_call_default", lambda r, s, i: sgs(r, s, i), rows, splits, u.inverse)
    timed("fwd_pool_unique", lambda r, ua, bg: pooling.pool_unique(r, *ua, bg), rows, ua, bags)
    for kmin, budget, warps in FWD:
        def per_feature(r, idx, spl, kmin=kmin, budget=budget, warps=warps):
            outs = []
            for f, h in enumerate(hot):
                k = kmin
                while k < 32 and k < h:
                    k *= 2
                cfg = eb.Config(rows=k, lanes=max(1, min(64, budget // (k * DIM))), piece=16 * k, num_warps=warps)
                outs.append(sgs(r, spl[f], idx[starts[f]:starts[f + 1]], config=cfg))
            return outs
        timed(f"fwd_per_feature_k{kmin}_b{budget}_w{warps}", per_feature, rows, u.inverse, [s for s, _, _ in bags])
    timed("fwd_xla_gather_sum", lambda r, idx: [jnp.sum(r[idx[starts[f]:starts[f + 1]]].reshape(b, h, DIM), 1)
                                                for f, h in enumerate(hot)], rows, u.inverse)
    g = jax.random.normal(jax.random.key(1), (b * len(hot), DIM), jnp.float32)
    splits_u = eb.splits_from_sorted_segment(u.sorted_segment, n)
    bag_sorted = bag[u.order]
    timed("bwd_default_config", lambda g, su, bo: sgs(g, su, bo), g, splits_u, bag_sorted)
    for k, lanes, warps, piece in BWD:
        cfg = eb.Config(rows=k, lanes=lanes, piece=piece, num_warps=warps)
        timed(f"bwd_k{k}_g{lanes}_w{warps}_L{piece}", lambda g, su, bo, cfg=cfg: sgs(g, su, bo, config=cfg),
              g, splits_u, bag_sorted)

    def loss(r, ua, bg):
        return sum(jnp.sum(o * o) for o in pooling.pool_unique(r, *ua, bg))
    timed("fwd_bwd_pool_unique", jax.grad(loss), rows, ua, bags)
    bwd_update(res, b, hot, u, interpret)
    got = jax.jit(lambda r, ua, bg: jnp.concatenate(pooling.pool_unique(r, *ua, bg)))(rows, ua, bags)
    want = jax.jit(lambda r, s, i: sgs(r, s, i))(rows, splits, u.inverse)
    res["max_abs_diff_pool_unique_vs_one_call"] = float(jnp.max(jnp.abs(got - want)))

    write(res, a.out, "pooling_dcnv2", n, b)


def write(res, out, stem, n, b, flags=""):
    tag = (res["env"].get("gpu_name") or "cpu").split()[-1].lower()
    out = pathlib.Path(out)
    common.write_json(out / f"{stem}_{tag}.json", res)
    rows_md = [{"variant": k, "us": v} for k, v in res["us"].items()]
    (out / f"{stem}_{tag}.md").write_text(
        f"# Pooling at the DLRM-dcnv2 shape ({res['env'].get('gpu_name', 'cpu')})\n\n"
        f"{res['env']['date_utc']}; jax {res['env']['versions']['jax']}; `python benchmarks/pooling_dcnv2.py"
        f"{' ' + flags if flags else ''}`; {n:,} lanes, {res['unique']:,} unique rows, dim {DIM}, batch {b}; GPU "
        f"{'kernel' if flags else 'busy'} microseconds per call; copy {res.get('copy_GBps')} GB/s.\n\n"
        + common.md_table(rows_md, ["variant", "us"]) + "\n")


def _rowwise_adagrad(p, s, g, lr, t):
    """Row-wise Adagrad's row math (as recis_jax.optim.rowwise_adagrad's, eps 1e-8)."""
    acc = s["acc"] + jnp.mean(g * g, axis=-1)
    return p - lr * g * jax.lax.rsqrt(acc + np.float32(1e-8))[:, None], {"acc": acc}


def bwd_update(res, b, hot, u, interpret):
    """The backward gather and the row-wise Adagrad update of the unique rows: two passes
    (segment_gather_sum's [N, dim] float32 gradient, then sparse_update) vs the fused
    kernel reading SegmentGrads, per launch configuration. Kernel time only (the sum of
    the named kernels' medians; the table is not donated, so XLA copies it per call)."""
    n, nf = u.order.shape[0], len(hot)
    num_unique = int(u.num_unique)
    r = 16_000_000 if n > 1_000_000 else 4 * n  # more rows than lanes: every lane a distinct row
    table = jnp.zeros((r, DIM), jnp.float32)
    slots = {"acc": jnp.full((r,), 0.1, jnp.float32)}
    row_ids = jnp.asarray(np.random.default_rng(1).permutation(r)[:n].astype(np.int32))
    bag = jnp.asarray(np.concatenate([np.repeat(np.arange(b) * nf + f, h) for f, h in enumerate(hot)]).astype(np.int32))
    g = jax.random.normal(jax.random.key(2), (b * nf, DIM), jnp.bfloat16)
    seg = su.SegmentGrads(g, u.splits, bag[u.order])
    impl = "interpret" if interpret else "pallas"
    lr, t = jnp.float32(0.01), jnp.int32(1)

    def kernel_us(name, f, *args, want=("embedding_bag", "sparse_update", "segment_update")):
        c = jax.jit(f).lower(*args).compile()
        rr = common.jax_device_time(lambda: c(*args), calls=3, warmup=1)
        ks = {k: v for k, v in rr.get("kernels", {}).items() if any(w in k for w in want)}
        res["us"][name] = round(sum(v["median_us"] * v["count"] / 3 for v in ks.values()), 1) if ks else rr.get("error")
        res.setdefault("kernels", {})[name] = ks
        print(f"{name:36s} {res['us'][name]}  {ks}", flush=True)

    kernel_us("bwd+update_two_pass", lambda tb, sl, sg: su.sparse_update(
        _rowwise_adagrad, tb, sl, row_ids, sg.materialize(impl), u.valid, lr, t, impl=impl), table, slots, seg)
    for lanes, warps in FUSED:
        cfg = eb.Config(rows=1, lanes=lanes, piece=64, num_warps=warps)
        kernel_us(f"bwd+update_fused_g{lanes}_w{warps}",
                  lambda tb, sl, sg, cfg=cfg: su._segment_update_pallas(
                      tb, sl, row_ids, sg, u.valid, lr, t, row_update=_rowwise_adagrad, clip_norm=None, config=cfg,
                      interpret=interpret), table, slots, seg)


if __name__ == "__main__":
    main()
