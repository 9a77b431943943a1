"""FeatureEngine: fused (one call per op kind) vs per-feature ops, inside one jit.

    python benchmarks/features.py [--device cpu|gpu] [--batch 4096] [--repeats 15]

RecIS fuses same-kind ops across features into one kernel to save launches. Under XLA
every feature's elementwise chain is already one fusion inside the jitted step, so the
question is whether concatenating the features' values (with one parameter per value)
beats per-feature ops whose parameters are compile-time constants. Scenarios, Criteo
shaped (26 categorical ID columns, 13 dense columns, batch --batch):

  mod          26 x Mod(m_i) on [B] int64 IDs (negative IDs included)
  mod_ragged   26 x Mod(m_i) on multi-hot Ragged IDs (1-7 per row, capacity 8B)
  multi_hash   26 x IDMultiHash([n_i, 2 n_i]) on [B] int64 IDs
  bucketize    13 x Bucketize(b_i) (24-64 boundaries each) on [B] float32 with NaN
  numeric      13 x FillMissing -> Log1p -> Standardize on [B] float32
  criteo       26 x Mod and 13 x FillMissing -> Log1p -> Bucketize, one engine

The bucketize scenario adds "per-feature, table search": the fused path's binary search
run per feature, which splits the fused gain into algorithm and fusion.

Each scenario jits `engine.apply` three times (fuse=False "per-feature", fuse=True
"fused", fuse=None "auto": the engine's default, fusing only Bucketize), checks the
outputs are identical, then times the modes in alternating order (rounds of --inner
calls, one sync per round, inputs rotating over 4 batches); reported: median
microseconds per engine call and compile seconds. Results: benchmarks/results/features_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's recis_jax, not a stale installed copy


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per mode")
    p.add_argument("--inner", type=int, default=20, help="calls per round")
    p.add_argument("--scenarios", default="mod,mod_ragged,multi_hash,bucketize,numeric,criteo")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if ARGS.device == "gpu" else "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import recis_jax  # noqa: E402,F401  (x64)
from benchmarks import common  # noqa: E402
from recis_jax.features import (  # noqa: E402
    Bucketize,
    Feature,
    FeatureEngine,
    FillMissing,
    IDMultiHash,
    Log1p,
    Mod,
    SelectField,
    Standardize,
)
from recis_jax.features.ops import Context  # noqa: E402
from recis_jax.ragged import Ragged  # noqa: E402

N_CAT, N_DENSE, ROTATE = 26, 13, 4


# -- data and feature specs --------------------------------------------------------------
def _ids(rng, b):
    return rng.integers(-(2**63), 2**63 - 1, size=b, dtype=np.int64, endpoint=True)


def _dense(rng, b):
    x = rng.lognormal(2.0, 2.0, size=b).astype(np.float32) - 1.0  # counts-like, some < 0
    x[rng.random(b) < 0.1] = np.nan
    return x


def _ragged(rng, b):
    lengths = rng.integers(1, 8, size=b)
    splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    vals = np.zeros(8 * b, np.int64)
    vals[: splits[-1]] = _ids(rng, int(splits[-1]))
    return Ragged(vals, splits)


def _mods(rng):
    return [int(m) for m in rng.integers(10_000, 10_000_000, size=N_CAT)]


def _boundaries(rng, i):
    return np.unique(np.round(np.exp(np.sort(rng.uniform(0, 12, 24 + (40 * i) // N_DENSE))), 2))


def scenario(name: str, batch: int, seed: int = 0):
    """(features, [batch dicts]) for one scenario."""
    rng = np.random.default_rng(seed)
    cat = [f"C{i + 1}" for i in range(N_CAT)]
    dense = [f"I{i + 1}" for i in range(N_DENSE)]
    mods = _mods(rng)
    if name in ("mod", "mod_ragged"):
        feats = [Feature(c, [SelectField(c), Mod(m)]) for c, m in zip(cat, mods)]
        make = _ragged if name == "mod_ragged" else _ids
        cols = cat
    elif name == "multi_hash":
        feats = [Feature(c, [SelectField(c), IDMultiHash([m, 2 * m])]) for c, m in zip(cat, mods)]
        make, cols = _ids, cat
    elif name == "bucketize":
        feats = [Feature(d, [SelectField(d), Bucketize(_boundaries(rng, i))]) for i, d in enumerate(dense)]
        make, cols = _dense, dense
    elif name == "numeric":
        feats = [Feature(d, [SelectField(d), FillMissing(0.0), Log1p(), Standardize(2.0, 1.5)]) for d in dense]
        make, cols = _dense, dense
    elif name == "criteo":
        feats = [Feature(c, [SelectField(c), Mod(m)]) for c, m in zip(cat, mods)]
        feats += [Feature(d, [SelectField(d), FillMissing(0.0), Log1p(), Bucketize(np.log1p(_boundaries(rng, i)))])
                  for i, d in enumerate(dense)]
        batches = [{**{c: _ids(rng, batch) for c in cat}, **{d: _dense(rng, batch) for d in dense}}
                   for _ in range(ROTATE)]
        return feats, batches
    else:
        raise ValueError(f"unknown scenario {name!r}")
    return feats, [{c: make(rng, batch) for c in cols} for _ in range(ROTATE)]


# -- timing --------------------------------------------------------------------------------
def _same(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True) for x, y in zip(la, lb))


MODES = {"per-feature": False, "fused": True, "auto": None}


def _per_feature_table_search(feats):
    """Attribution for Bucketize: the fused path's search algorithm, run per feature
    (a group of one), to separate the algorithm's gain from the fusion's."""

    def apply(batch):
        out = {}
        for f in feats:
            op, ctx = f.ops[1], Context(f.name, f.inputs)
            out[f.name] = Bucketize.apply_fused([op], [batch[f.inputs[0]]], [ctx])[0]
        return out

    return apply


def run(name: str, batch: int, repeats: int, inner: int) -> list[dict]:
    feats, host_batches = scenario(name, batch)
    batches = [jax.device_put(b) for b in host_batches]
    variants = {mode: FeatureEngine(feats, fuse=fuse).apply for mode, fuse in MODES.items()}
    if name == "bucketize":
        variants["per-feature, table search"] = _per_feature_table_search(feats)
    fns, compile_s = {}, {}
    for mode, fn in variants.items():
        t0 = time.perf_counter()
        fns[mode] = jax.jit(fn).lower(batches[0]).compile()
        compile_s[mode] = time.perf_counter() - t0
    ref = fns["per-feature"](batches[0])
    for mode, fn in fns.items():
        if not _same(ref, fn(batches[0])):
            raise AssertionError(f"{name}: {mode} and per-feature outputs differ")
        for b in batches:  # warm up
            jax.block_until_ready(fn(b))
    samples = {m: [] for m in fns}
    order = list(fns)
    for r in range(repeats):
        for mode in order[r % len(order):] + order[: r % len(order)]:  # rotate: drift hits all
            t0 = time.perf_counter()
            out = None
            for i in range(inner):
                out = fns[mode](batches[i % ROTATE])
            jax.block_until_ready(out)
            samples[mode].append((time.perf_counter() - t0) / inner)
    values = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(host_batches[0]))
    rows = []
    for mode in fns:
        s = common.summarize(samples[mode])
        rows.append({
            "scenario": name, "mode": mode, "features": len(feats), "batch": batch, "input_values": values,
            "time_us": round(s["median_s"] * 1e6, 1), "min_us": round(s["min_s"] * 1e6, 1),
            "max_us": round(s["max_s"] * 1e6, 1), "compile_s": round(compile_s[mode], 2),
        })
    per = rows[0]["time_us"]
    for r in rows:
        r["vs_per_feature"] = round(r["time_us"] / per, 2)
    return rows


def main():
    args = ARGS
    info = common.env_info()
    rows = []
    for name in args.scenarios.split(","):
        r = run(name, args.batch, args.repeats, args.inner)
        rows += r
        print(f"{name:11s} " + "   ".join(f"{x['mode']} {x['time_us']:8.1f} us" for x in r), flush=True)
    out = pathlib.Path(args.out)
    stem = f"features_{args.device}"
    settings = {"batch": args.batch, "repeats": args.repeats, "inner": args.inner, "rotate": ROTATE}
    common.write_json(out / f"{stem}.json", {"env": info, "settings": settings, "rows": rows})
    faster = {}
    for r in rows:
        if r["scenario"] not in faster or r["time_us"] < faster[r["scenario"]]["time_us"]:
            faster[r["scenario"]] = r
    device = info.get("gpu_name") or f"{info['platform']}, {info['cpu_count']} cores"
    md = [
        f"# FeatureEngine: fused vs per-feature ops ({args.device}: {device})",
        "",
        f"{info['date_utc']}; Python {info['python']}, jax {info['versions']['jax']}, "
        f"jaxlib {info['versions']['jaxlib']}, numpy {info['numpy']}; backend {info.get('jax_device')}.",
        f"Batch {args.batch}; median over {args.repeats} rounds of {args.inner} calls per mode, the three "
        f"modes in rotating order; inputs rotate over {ROTATE} batches. Time is per `engine.apply` call "
        "inside one jit; outputs of all modes were checked identical. Command: "
        f"`python benchmarks/features.py --device {args.device} --batch {args.batch}`.",
        "",
        common.md_table(rows, ["scenario", "mode", "features", "input_values", "time_us", "min_us", "max_us",
                               "compile_s", "vs_per_feature"]),
        "",
        "Fastest per scenario: " + ", ".join(f"{k}: {v['mode']}" for k, v in faster.items()) + ".",
        "",
    ]
    (out / f"{stem}.md").write_text("\n".join(md))
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
