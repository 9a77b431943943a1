"""Hashtable index ops on a GB-sized index: Pallas-Triton kernels vs the XLA path.

    python benchmarks/ops_hashtable.py [--slots-log2 26] [--batch-log2 22] [--loads 0.5,0.8]
        [--sweep] [--xla] [--profile] [--budget-s S] [--out benchmarks/results/ops_hashtable_h100]

(--impl interpret --slots-log2 10 --batch-log2 7: a CPU smoke test of the script.)
Results and their reading: benchmarks/results/ops_hashtable_h100{.md,_notes.md}.
--sweep times the kernel configs of FIND_SWEEP / CLAIM_SWEEP (block, warps, probe width),
each checked against the XLA results first (`ok`), and uses the fastest correct one;
--profile adds the GPU kernel times of one call (profiler trace).

Index: S = 2^26 slots (slot_keys int64 + slot_tables int32 + slot_rows int32 + slot_state
int8 = 17 B/slot, 1.14 GB), the arrays of recis_jax.embedding.hashtable. It is filled by
the Pallas insert to load L (L*S distinct keys: key = splitmix64(i + 1), table = i % 4,
row = i; i = 0..L*S-1), then, at each load:

  find (hit)   N = 2^22 lanes of distinct present keys (i = j * 2654435761 mod L*S)
  find (miss)  N lanes of absent keys
  find_or_insert(f)  pallas_kernels.hashtable.find_or_insert (the index part of
               HashTable.find_or_insert: find, rows from a free stack by cumsum, insert the
               misses, commit or undo) on N lanes of which a fraction f are new keys
               (lanes shuffled). Each call gets a fresh copy of the filled index (donated,
               in place; the copy is not timed), so every call starts at load L; it ends at
               L + f*N/S.

max_probes = 1024 (at load 0.8 linear-probing chains pass the default 128 now and then
over 50M keys, which would report overflow). keys/s = N / time (lanes per second).

Timing: find: median of --repeats x 10 back-to-back calls, one sync (benchmarks/common.py);
find_or_insert: one call per repeat between syncs (host clock, includes ~20-50 us of
dispatch), median. The XLA path (recis_jax.embedding.hashtable's while loops) is timed
the same way with fewer repeats.

Bounds (stated per row): bytes touched per key / copy bandwidth, where a random access
costs a 32-byte sector. find hit: 13 B in + 9 B out + 4 sectors (state, key, table, row)
= 150 B. Also measured: the rate of random 4-byte gathers from a 1 GB array (one sector
each), giving a second bound for find hit = gather rate / 4 sectors.

Correctness (recorded in the JSON): after each fill every filled key is LIVE exactly once
(count), the hit batch is found by both paths at row i with equal results, misses are
not found, find_or_insert returns the same rows/found/is_new/num_new as the XLA path
and every new key is then found at its row.
"""

from __future__ import annotations

import argparse
import functools
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

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import common  # noqa: E402
from pallas_kernels import hashtable as ph  # noqa: E402

P = 2654435761
FIND_SWEEP = [ph.Config(64, 2, 1), ph.Config(128, 4, 1), ph.Config(64, 2, 4), ph.Config(128, 4, 4),
              ph.Config(128, 4, 8), ph.Config(256, 8, 8)]
CLAIM_SWEEP = [ph.Config(128, 4, 1), ph.Config(64, 2, 8), ph.Config(128, 4, 8), ph.Config(128, 4, 16),
               ph.Config(256, 8, 16)]
NEW_BASE = 1 << 40
T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def vocab(i):
    """int64 key of vocabulary index i (splitmix64 of i + 1, a bijection)."""
    x = (i + 1).astype(jnp.uint64)
    x = (x ^ (x >> 30)) * jnp.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> 27)) * jnp.uint64(0x94D049BB133111EB)
    x = x ^ (x >> 31)
    return jax.lax.bitcast_convert_type(x, jnp.int64)


def lanes_of(i):
    return (i % 4).astype(jnp.int32), vocab(i)


def empty_index(s):
    return ph.Index(jnp.zeros(s, jnp.int64), jnp.zeros(s, jnp.int32), jnp.zeros(s, jnp.int32),
                    jnp.zeros(s, jnp.int8))


def copy_index(index):
    return jax.tree.map(lambda a: a.copy(), index)


@functools.partial(jax.jit, static_argnames=("chunk", "max_probes", "impl"), donate_argnums=0)
def fill_chunk(index, lo, hi, *, chunk, max_probes, impl):
    i = lo + jnp.arange(chunk, dtype=jnp.int64)
    t, k = lanes_of(i)
    r = ph.insert(index, t, k, i.astype(jnp.int32), i < hi, max_probes=max_probes, impl=impl)
    return r.index, r.overflow


def fill(index, lo, hi, chunk, max_probes, impl):
    over = False
    for a in range(lo, hi, chunk):
        index, o = fill_chunk(index, jnp.int64(a), jnp.int64(hi), chunk=chunk, max_probes=max_probes, impl=impl)
        over |= bool(o)
    return index, over


def hit_ids(n, m, salt=0):
    return (jnp.arange(n, dtype=jnp.int64) * P + salt) % m


def batch(n, m, f, salt):
    """Vocabulary ids of N lanes: (1 - f) N present (distinct), f N new; shuffled."""
    nn = int(round(f * n))
    ids = jnp.concatenate([hit_ids(n - nn, m, salt), NEW_BASE + salt * n + jnp.arange(nn, dtype=jnp.int64)])
    return ids[jax.random.permutation(jax.random.PRNGKey(salt), n)], nn


def time_once(fn, sync, repeats):
    ts = []
    for _ in range(repeats):
        ts.append(fn())
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "repeats": repeats}


def profile_call(call) -> dict:
    """{kernel name: [count, total us]} of one traced call, plus _busy_us (union of the
    kernel intervals on the GPU stream lines)."""
    import glob  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            call()
        files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        if not files:
            return {"error": "no trace"}
        pd = jax.profiler.ProfileData.from_file(files[0])
        per, iv = {}, []
        for plane in pd.planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if "stream" not in line.name.lower():
                    continue
                for ev in line.events:
                    c = per.setdefault(ev.name[:60], [0, 0.0])
                    c[0] += 1
                    c[1] += ev.duration_ns / 1e3
                    iv.append((float(ev.start_ns), float(ev.start_ns + ev.duration_ns)))
    iv.sort()
    busy, cs, ce = 0.0, *(iv[0] if iv else (0.0, 0.0))
    for a, b in iv[1:]:
        if a > ce:
            busy, cs, ce = busy + ce - cs, a, b
        else:
            ce = max(ce, b)
    busy += ce - cs
    out = {k: [v[0], round(v[1], 1)] for k, v in sorted(per.items(), key=lambda kv: -kv[1][1])[:12]}
    out["_busy_us"] = round(busy / 1e3, 1)
    return out


def profile_foi(fn, pristine, t, k, valid):
    idx = copy_index(pristine)
    jax.block_until_ready(idx)
    return profile_call(lambda: jax.block_until_ready(fn(idx, t, k, valid)))


def rate_row(name, timing, n, **extra):
    t = timing["median_s"]
    return {"op": name, **extra, "time_us": round(t * 1e6, 1), "min_us": round(timing["min_s"] * 1e6, 1),
            "keys_per_s": float(f"{n / t:.3g}")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots-log2", type=int, default=26)
    ap.add_argument("--batch-log2", type=int, default=22)
    ap.add_argument("--loads", default="0.5,0.8")
    ap.add_argument("--fractions", default="0.1,0.5,1.0", help="new-key fractions for find_or_insert")
    ap.add_argument("--max-probes", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sweep", action="store_true", help="sweep block/warps of both kernels")
    ap.add_argument("--xla", action="store_true", help="also time the XLA path")
    ap.add_argument("--profile", action="store_true", help="GPU kernel times of one call (profiler trace)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip the rest after this many seconds")
    ap.add_argument("--impl", default="pallas", help="kernel impl (interpret: a CPU smoke test)")
    ap.add_argument("--out", default=str(common.RESULTS_DIR / "ops_hashtable"))
    args = ap.parse_args()

    s, n, mp = 1 << args.slots_log2, 1 << args.batch_log2, args.max_probes
    kimpl = args.impl
    res = {"env": common.env_info(), "slots": s, "index_bytes": 17 * s, "batch": n, "max_probes": mp,
           "rows": [], "checks": {}, "sweep": [], "hlo": {}}
    out = pathlib.Path(args.out)

    def save():
        common.write_json(out.with_suffix(".json"), res)
        out.with_suffix(".md").write_text(markdown(res))

    def left():
        return args.budget_s - (time.perf_counter() - T0)

    # --- bandwidth references
    big = jnp.zeros(1 << 28, jnp.int32)  # 1 GiB
    cp = jax.jit(lambda a: a + 1)
    t = common.time_calls(lambda: cp(big), common.jax_sync, repeats=10, inner=5)
    res["copy_GBps"] = round(2 * big.nbytes / t["median_s"] / 1e9, 1)
    gidx = jax.random.randint(jax.random.PRNGKey(1), (n,), 0, big.shape[0])
    gat = jax.jit(lambda a, i: a[i])
    t = common.time_calls(lambda: gat(big, gidx), common.jax_sync, repeats=10, inner=10)
    res["random_gather_per_s"] = float(f"{n / t['median_s']:.3g}")
    del big
    log("copy GB/s", res["copy_GBps"], "random 4B gathers/s", res["random_gather_per_s"])
    bw = res["copy_GBps"] * 1e9
    res["bounds"] = {"find_hit_bytes": 150, "find_hit_copy_bound": float(f"{bw / 150:.3g}"),
                     "find_hit_gather_bound": float(f"{res['random_gather_per_s'] / 4:.3g}")}

    ones = jnp.ones(n, bool)
    free = jnp.arange(n - 1, -1, -1, dtype=jnp.int32)

    def find_fn(impl, cfg=None):
        if cfg is not None:
            ph.FIND_CONFIG = cfg
        return jax.jit(lambda idx, t, k, v: ph.find(idx, t, k, v, max_probes=mp, impl=impl))

    def foi_fn(impl, cfg=None):
        if cfg is not None:
            ph.CLAIM_CONFIG = cfg
        return jax.jit(lambda idx, t, k, v: ph.find_or_insert(idx, t, k, v, free, jnp.int32(n), max_probes=mp,
                                                              impl=impl), donate_argnums=0)

    def time_find(fn, index, t, k, repeats, inner=10):
        return common.time_calls(lambda: fn(index, t, k, ones), common.jax_sync, repeats=repeats, inner=inner)

    def time_foi(fn, pristine, t, k, repeats):
        def one():
            idx = copy_index(pristine)
            jax.block_until_ready(idx)
            t0 = time.perf_counter()
            o = fn(idx, t, k, ones)
            jax.block_until_ready(o)
            dt = time.perf_counter() - t0
            del o, idx
            return dt
        one()  # warm-up (compile)
        return time_once(one, None, repeats)

    index = empty_index(s)
    m = 0
    best_find, best_claim = ph.FIND_CONFIG, ph.CLAIM_CONFIG
    for load in [float(x) for x in args.loads.split(",")]:
        target = int(load * s)
        index, over = fill(index, m, target, min(1 << 23, s), mp, kimpl)
        m = target
        live = int(jnp.sum(index.slot_state == ph.LIVE))
        chk = {"fill_overflow": over, "live": live, "expected_live": m}
        log(f"load {load}: filled {m} keys, live {live}, overflow {over}")

        # --- find correctness at scale
        ht_, hk = lanes_of(hit_ids(n, m))
        mt, mk = lanes_of(NEW_BASE + (1 << 39) + jnp.arange(n, dtype=jnp.int64))
        fp = find_fn(kimpl)(index, ht_, hk, ones)
        fx = find_fn("reference")(index, ht_, hk, ones)
        chk["find_hit_all_found"] = bool(jnp.all(fp.found))
        chk["find_hit_rows_ok"] = bool(jnp.all(fp.rows == hit_ids(n, m).astype(jnp.int32)))
        chk["find_pallas_eq_xla"] = all(bool(jnp.array_equal(a, b)) for a, b in zip(fp, fx))
        chk["find_miss_none_found"] = not bool(jnp.any(find_fn(kimpl)(index, mt, mk, ones).found))
        res["checks"][str(load)] = chk
        log("checks", chk)
        save()

        # --- config sweep (each config also checked against the XLA results)
        if args.sweep and left() > 60:
            mx = find_fn("reference")(index, mt, mk, ones)
            for cfg in FIND_SWEEP:
                ff = find_fn(kimpl, cfg)
                ok = (all(bool(jnp.array_equal(a, b)) for a, b in zip(ff(index, ht_, hk, ones), fx))
                      and all(bool(jnp.array_equal(a, b)) for a, b in zip(ff(index, mt, mk, ones), mx)))
                tm = time_find(ff, index, ht_, hk, repeats=5)
                res["sweep"].append(rate_row("find_hit", tm, n, load=load, impl=kimpl, config=list(cfg), ok=ok))
                log(res["sweep"][-1])
                tm = time_find(ff, index, mt, mk, repeats=3)
                res["sweep"].append(rate_row("find_miss", tm, n, load=load, impl=kimpl, config=list(cfg), ok=ok))
            del mx
            fs = [r for r in res["sweep"] if r["op"] == "find_hit" and r["load"] == load and r["ok"]]
            best_find = ph.Config(*max(fs, key=lambda r: r["keys_per_s"])["config"])
            ph.FIND_CONFIG = best_find
            ids, _ = batch(n, m, 1.0, 7)
            tt, tk = lanes_of(ids)
            _, rb = foi_fn("reference")(copy_index(index), tt, tk, ones)
            for cfg in CLAIM_SWEEP:
                fn = foi_fn(kimpl, cfg)
                ia, ra = fn(copy_index(index), tt, tk, ones)
                fa = find_fn("reference")(ia, tt, tk, ones)
                ok = (all(bool(jnp.array_equal(a, b)) for a, b in zip(ra, rb)) and bool(jnp.all(fa.found))
                      and bool(jnp.array_equal(fa.rows, ra.rows)))
                del ia, ra, fa
                tm = time_foi(fn, index, tt, tk, repeats=3)
                res["sweep"].append(rate_row("find_or_insert", tm, n, load=load, impl=kimpl,
                                             config=list(cfg), new_frac=1.0, ok=ok))
                log(res["sweep"][-1])
            del rb
            save()
            cs = [r for r in res["sweep"] if r["op"] == "find_or_insert" and r["load"] == load and r["ok"]]
            best_claim = ph.Config(*max(cs, key=lambda r: r["keys_per_s"])["config"])
            res.setdefault("best_configs", {})[str(load)] = {"find": list(best_find), "claim": list(best_claim)}
            log("best", res["best_configs"])
        ph.FIND_CONFIG, ph.CLAIM_CONFIG = best_find, best_claim

        # --- find timings
        ffp = find_fn(kimpl)
        for name, (t_, k_) in (("find_hit", (ht_, hk)), ("find_miss", (mt, mk))):
            tm = time_find(ffp, index, t_, k_, repeats=args.repeats)
            row = rate_row(name, tm, n, load=load, impl=kimpl, config=list(ph.FIND_CONFIG))
            if args.profile and name == "find_hit":
                row["gpu_kernels"] = profile_call(lambda: jax.block_until_ready(ffp(index, t_, k_, ones)))
                row["gpu_busy_us"] = row["gpu_kernels"].pop("_busy_us", None)
            if name == "find_hit":
                row["copy_bound"] = res["bounds"]["find_hit_copy_bound"]
                row["frac_bound"] = round(row["keys_per_s"] / row["copy_bound"], 3)
            res["rows"].append(row)
            log(row)
            if args.xla and left() > 40:
                tm = time_find(find_fn("reference"), index, t_, k_, repeats=3, inner=2)
                res["rows"].append(rate_row(name, tm, n, load=load, impl="xla"))
                log(res["rows"][-1])
        save()

        # --- find_or_insert
        for f in [float(x) for x in args.fractions.split(",")]:
            ids, nn = batch(n, m, f, 11)
            tt, tk = lanes_of(ids)
            fn = foi_fn(kimpl)
            # correctness vs XLA on one call
            ia, ra = fn(copy_index(index), tt, tk, ones)
            fr = foi_fn("reference")
            ib, rb = fr(copy_index(index), tt, tk, ones)
            c = {"same_as_xla": all(bool(jnp.array_equal(a, b)) for a, b in zip(ra, rb)),
                 "num_new": int(ra.num_new), "expected_new": nn, "overflow": bool(ra.overflow)}
            fa = find_fn(kimpl)(ia, tt, tk, ones)
            c["all_found_after"] = bool(jnp.all(fa.found))
            c["rows_after_eq_returned"] = bool(jnp.array_equal(fa.rows, ra.rows))
            c["live_after"] = int(jnp.sum(ia.slot_state == ph.LIVE))
            c["expected_live_after"] = m + nn
            if f == float(args.fractions.split(",")[0]):
                hlo = fn.lower(copy_index(index), tt, tk, ones).compile().as_text()
                big_copies = [ln.strip()[:160] for ln in hlo.splitlines()
                              if f"[{s}]" in ln and (" copy(" in ln or "copy-start" in ln)]
                res["hlo"][str(load)] = {"copies_of_S_arrays": big_copies[:10]}
            del ia, ib, fa, ra, rb
            res["checks"][f"{load}_foi_{f}"] = c
            log("foi checks", c)
            tm = time_foi(fn, index, tt, tk, repeats=args.repeats)
            row = rate_row("find_or_insert", tm, n, load=load, impl=kimpl, new_frac=f,
                           load_after=round((m + nn) / s, 3), config=[list(ph.FIND_CONFIG), list(ph.CLAIM_CONFIG)])
            if args.profile:
                row["gpu_kernels"] = profile_foi(fn, index, tt, tk, ones)
                row["gpu_busy_us"] = row["gpu_kernels"].pop("_busy_us", None)
            res["rows"].append(row)
            log(row)
            if args.xla and left() > 60 and f == 0.5:
                tm = time_foi(fr, index, tt, tk, repeats=2)
                res["rows"].append(rate_row("find_or_insert", tm, n, load=load, impl="xla", new_frac=f,
                                            load_after=round((m + nn) / s, 3)))
                log(res["rows"][-1])
            save()
            if left() < 20:
                break
    save()
    log("done")


def markdown(res) -> str:
    e = res["env"]
    lines = [
        "# hashtable index ops: Pallas-Triton vs XLA",
        "",
        f"- device: {e.get('gpu_name', e.get('jax_device'))} (driver {e.get('driver')}), jax "
        f"{e['versions'].get('jax')}, date {e['date_utc']}",
        f"- index: {res['slots']} slots x 17 B = {res['index_bytes'] / 1e9:.2f} GB; batch N = {res['batch']} lanes; "
        f"max_probes {res['max_probes']}; keys/s = lanes / time",
        f"- copy bandwidth (read+write) {res.get('copy_GBps')} GB/s; random 4-byte gathers from 1 GiB: "
        f"{res.get('random_gather_per_s')} /s",
        f"- bounds for find (hit): {res.get('bounds')}",
        "- find: median of repeats x 10 back-to-back calls; find_or_insert: one call per repeat on a fresh copy"
        " of the filled index (host clock, includes dispatch)",
        "",
        common.md_table(res["rows"], ["op", "load", "impl", "new_frac", "load_after", "time_us", "min_us",
                                      "keys_per_s", "gpu_busy_us", "copy_bound", "frac_bound", "config"]),
        "",
        "## checks",
        "",
        "```",
        json.dumps(res["checks"], indent=1),
        json.dumps(res.get("hlo"), indent=1),
        "```",
        "",
        "## GPU kernels of one call (name: [count, total us])",
        "",
    ]
    for r in res["rows"]:
        if "gpu_kernels" in r:
            lines.append(f"- {r['op']} load {r['load']} new_frac {r.get('new_frac')}: {r['gpu_kernels']}")
    if res["sweep"]:
        lines += ["", "## config sweep (block, num_warps, width); ok = same results as the XLA path", "",
                  common.md_table(res["sweep"], ["op", "load", "config", "new_frac", "time_us", "keys_per_s", "ok"]),
                  f"\nbest: {res.get('best_configs')}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
