"""Op-level benchmarks: Pallas-Triton kernels vs XLA vs torch.

Two groups (--ops bucketize | sparse | all; default bucketize):

* bucketize (below);
* sparse: the sparse-path kernels of pallas_kernels/ (embedding_bag, sparse_update,
  ids_partition), see `main_sparse` and the "sparse ops" section at the end:

    GPU (device machine, repo root):
      PYTHONPATH=$PWD python3 benchmarks/ops.py --device gpu --ops sparse --out $OUT
    CPU (a smoke run of the script, interpret-mode kernels, tiny sizes):
      .venv/bin/python benchmarks/ops.py --device cpu --ops sparse --quick --out /tmp/x

Bucketize:

    GPU (device machine, repo root):
      PYTHONPATH=$PWD python3 benchmarks/ops.py --device gpu --sweep --out $OUT
    CPU (here):
      .venv/bin/python benchmarks/ops.py --device cpu

One run measures, for x of --size float32 and n boundaries in --ns:
  * pallas            `bucketize(..., impl="pallas")` (the dispatcher's default config)
  * xla_scan          `jnp.searchsorted` default method ("scan")
  * xla_scan_unrolled `method="scan_unrolled"` (= bucketize_reference)
  * xla_sort          `method="sort"`
  * torch_int64 / torch_int32  `torch.bucketize(x, b, right=True[, out_int32=True])`,
                      in its own process (benchmarks/torch_bucketize.py), run before
                      JAX touches the GPU
  * copy              JAX device-to-device copy of the same x (`jnp.copy`), the
                      bandwidth ceiling; also a negation (read 4 B, write 4 B)
Bytes counted per element: 4 read + 4 written (int32 out), 4 + 8 for torch's int64;
the boundaries (<= 16 KB, cache resident) are not counted. GB/s = bytes / median time.
With --sweep (GPU) it also checks and times kernel variants (layout, block, num_warps,
eviction policy). On the GPU it first checks the kernel against NumPy at several sizes
(partial blocks, NaN, +-inf, -0.0, values equal to boundaries).

Results: <out>/ops_bucketize_<tag>.json and .md (tag: h100, h200, cpu, ...).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--ops", choices=["bucketize", "sparse", "all"], default="bucketize")
    ap.add_argument("--quick", action="store_true", help="sparse: a reduced case list")
    ap.add_argument("--sections", default="copy,pool,bwd,update,partition,sweep",
                    help="sparse: sections to run, in this order")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="sparse: skip remaining cases once this many seconds have passed")
    ap.add_argument("--size", type=int, default=None, help="elements of x (gpu 8M, cpu 1M)")
    ap.add_argument("--ns", default="16,64,1024", help="boundary counts of the main table")
    ap.add_argument("--rotate", type=int, default=None, help="x buffers rotated (gpu 4, cpu 2)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--inner", type=int, default=None)
    ap.add_argument("--sweep", action="store_true", help="time kernel variants (GPU)")
    ap.add_argument("--sweep-ns", default="16,64,256,1024,4096")
    ap.add_argument("--sweep-set", choices=["full", "final"], default="full",
                    help="full: the first exploration; final: around the chosen defaults")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-gpu-trace", action="store_true",
                    help="skip the profiler (CUPTI) GPU-time column")
    ap.add_argument("--torch-python", default=sys.executable,
                    help="interpreter for the torch process (skipped if torch is missing)")
    ap.add_argument("--out", default=str(common.RESULTS_DIR))
    ap.add_argument("--tag", default=None)
    a = ap.parse_args(argv)
    gpu = a.device == "gpu"
    a.size = a.size or (8 * 2**20 if gpu else 2**20)
    a.rotate = a.rotate or (4 if gpu else 2)
    a.repeats = a.repeats or (15 if gpu else 5)
    a.inner = a.inner or (10 if gpu else 2)
    return a


def special_x(rng, size: int, b: np.ndarray) -> np.ndarray:
    """x with duplicates, values equal to boundaries, NaN, +-inf, +-0."""
    x = (rng.standard_normal(size) * 1.5).astype(np.float32)
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0], np.float32)
    k = min(size, specials.size)
    x[:k] = specials[:k]
    if size > 8:
        pick = rng.integers(0, size, size // 4)
        x[pick] = rng.choice(b, size=pick.size)
        x[rng.integers(0, size, size // 16)] = np.nan
        x[rng.integers(0, size, size // 16)] = np.inf
    return rng.permutation(x)


def numpy_bucketize(x: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.searchsorted(b, x, side="right").astype(np.int32)
    out[np.isnan(x)] = len(b)
    return out


def run_torch(a, out_dir: pathlib.Path) -> dict:
    if a.no_torch:
        return {"skipped": "--no-torch"}
    path = out_dir / "torch_bucketize_raw.json"
    cmd = [a.torch_python, str(ROOT / "benchmarks" / "torch_bucketize.py"),
           "--device", "cuda" if a.device == "gpu" else "cpu", "--size", str(a.size),
           "--ns", a.ns, "--rotate", str(a.rotate), "--repeats", str(a.repeats),
           "--inner", str(a.inner), "--out", str(path)]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    print(p.stdout[-3000:], p.stderr[-3000:] if p.returncode not in (0, 3) else "", flush=True)
    if path.exists():
        import json  # noqa: PLC0415

        res = json.loads(path.read_text())
        res["wall_s"] = round(time.time() - t0, 1)
        path.unlink()
        return res
    return {"skipped": f"torch process failed rc={p.returncode}: {p.stderr[-1500:]}"}


def main(argv=None) -> int:
    a = parse_args(argv)
    rc = 0
    if a.ops in ("bucketize", "all"):
        rc |= main_bucketize(a)
    if a.ops in ("sparse", "all"):
        rc |= main_sparse(a)
    return rc


def main_bucketize(a) -> int:
    gpu = a.device == "gpu"
    if not gpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:
        # The torch process runs first; no preallocation keeps room if they overlap.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    out_dir = pathlib.Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ns = [int(v) for v in a.ns.split(",")]

    t_start = time.time()
    torch_res = run_torch(a, out_dir)

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from pallas_kernels import bucketize as bk  # noqa: PLC0415

    env = common.env_info()
    if gpu and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu but JAX backend is {jax.default_backend()}")
    kind = env.get("gpu_name") or env["jax_device"]
    tag = a.tag or next((t for t in ("h100", "h200", "a100") if t in kind.lower()),
                        "gpu" if gpu else "cpu")
    report = {"env": env, "args": vars(a), "torch": torch_res, "checks": [], "rows": [],
              "sweep": [], "errors": []}
    json_path = out_dir / f"ops_bucketize_{tag}.json"

    def save():
        report["wall_s"] = round(time.time() - t_start, 1)
        common.write_json(json_path, report)
        (out_dir / f"ops_bucketize_{tag}.md").write_text(render_md(report))

    kernel_impl = "pallas" if gpu else "interpret"

    # ------------------------------------------------------------------ correctness
    if not a.no_check:
        rng = np.random.default_rng(1234)
        sizes = [1, 1000, 1025, 65537, 2**20 + 3] if gpu else [1, 1000, 1025]
        check_ns = [1, 3, 16, 64, 255, 1000, 1024, 4096]
        for n in check_ns:
            b = np.sort(rng.standard_normal(n).astype(np.float32))
            if n > 8:
                b[n // 3] = b[n // 3 + 1]  # a repeated boundary
            for size in sizes:
                x = special_x(rng, size, b)
                want = numpy_bucketize(x, b)
                ref = np.asarray(bk.bucketize(jnp.asarray(x), jnp.asarray(b), impl="reference"))
                try:
                    got = np.asarray(bk.bucketize(jnp.asarray(x), jnp.asarray(b),
                                                  impl=kernel_impl))
                except Exception:  # noqa: BLE001
                    got = np.full_like(want, -1)
                    report["errors"].append({"impl": "check default", "n": n,
                                             "error": traceback.format_exc()[-2000:]})
                ok = bool((got == want).all())
                report["checks"].append({"n": n, "size": size, "impl": kernel_impl,
                                         "layout": "default", "ok": ok,
                                         "mismatches": int((got != want).sum()),
                                         "reference_ok": bool((ref == want).all())})
        for layout in ("sorted", "eytzinger", "compare"):
            for n, size, block in ((16, 1025, 256), (64, 4097, 512), (1000, 70001, 1024)):
                b = np.sort(rng.standard_normal(n).astype(np.float32))
                x = special_x(rng, size, b).reshape(-1, 1) if size % 2 else special_x(rng, size, b)
                want = numpy_bucketize(x.ravel(), b).reshape(x.shape)
                try:
                    got = np.asarray(bk.bucketize_pallas(
                        jnp.asarray(x), jnp.asarray(b), interpret=not gpu,
                        config=bk.Config(block=block, num_warps=4, layout=layout)))
                    ok, bad = bool((got == want).all()), int((got != want).sum())
                except Exception:  # noqa: BLE001 - a variant that fails to lower
                    ok, bad = False, -1
                    report["errors"].append({"impl": f"check {layout}", "n": n,
                                             "error": traceback.format_exc()[-2000:]})
                report["checks"].append({"n": n, "size": size, "impl": kernel_impl,
                                         "layout": f"{layout}/b{block}", "ok": ok,
                                         "mismatches": bad})
        bad = [c for c in report["checks"] if not c["ok"] or not c.get("reference_ok", True)]
        print(f"checks: {len(report['checks']) - len(bad)}/{len(report['checks'])} ok", flush=True)
        for c in bad:
            print("  FAIL", c, flush=True)
        save()

    # ------------------------------------------------------------------ timing helpers
    def timed(fn, xs, *args, repeats=a.repeats, inner=a.inner, gpu_calls=5):
        f = jax.jit(fn)
        t = common.time_calls(lambda: f(xs, *args), common.jax_sync,
                              ops_per_call=len(xs), warmup=3, repeats=repeats, inner=inner)
        if gpu and not a.no_gpu_trace:
            try:
                t["gpu"] = common.jax_device_time(lambda: f(xs, *args),
                                                  ops_per_call=len(xs), calls=gpu_calls)
            except Exception as e:  # noqa: BLE001 - profiler trouble must not stop timing
                t["gpu"] = {"error": repr(e)[:500]}
        return t

    gpu_copy = {}

    def row_of(name, t, nbytes, n, **extra):
        row = common.bandwidth_row(name, t, nbytes, copy_gbps, best, n=n, **extra)
        g = t.get("gpu", {})
        if "busy_us_per_op" in g:
            row["gpu_us"] = g["busy_us_per_op"]
            row["gpu_GBps"] = round(nbytes / (g["busy_us_per_op"] * 1e-6) / 1e9, 1)
            if gpu_copy.get("GBps"):
                row["gpu_frac_copy"] = round(row["gpu_GBps"] / gpu_copy["GBps"], 3)
            row["kernels"] = g["kernels"]
        elif g:
            row["gpu_error"] = g.get("error")
        return row

    N = a.size
    xs_np, _ = common.bucketize_data(N, 16, a.rotate)
    xs = [jnp.asarray(x) for x in xs_np]
    copy_t = timed(lambda xs: [jnp.copy(x) for x in xs], xs)
    neg_t = timed(lambda xs: [-x for x in xs], xs)
    copy_gbps = 8 * N / copy_t["median_s"] / 1e9
    # Best copy-like bandwidth seen in this run: JAX copy, JAX negate, torch copy_.
    best = max(copy_gbps, 8 * N / neg_t["median_s"] / 1e9,
               torch_res.get("copy", {}).get("GBps", 0.0))
    report["best_copy_GBps"] = round(best, 1)
    if "busy_us_per_op" in copy_t.get("gpu", {}):
        gpu_copy["GBps"] = 8 * N / (copy_t["gpu"]["busy_us_per_op"] * 1e-6) / 1e9
    report["copy"] = row_of("jax_copy", copy_t, 8 * N, None)
    report["neg"] = row_of("jax_negate", neg_t, 8 * N, None)
    print(f"copy {copy_t['median_s']*1e6:.1f} us = {copy_gbps:.0f} GB/s; "
          f"negate {report['neg']['GBps']} GB/s", flush=True)
    del xs

    # ------------------------------------------------------------------ main table
    def method(m):
        return lambda xs, b: [jnp.searchsorted(b, x, side="right", method=m).astype(jnp.int32)
                              for x in xs]

    impls = [("xla_scan", method("scan")), ("xla_scan_unrolled", method("scan_unrolled"))]
    if gpu:  # method="sort" takes ~0.25 s per 1M on 2 CPU cores: GPU only
        impls.append(("xla_sort", method("sort")))
        impls.insert(0, ("pallas", lambda xs, b: [bk.bucketize(x, b, impl="pallas") for x in xs]))
    for n in ns:
        xs_np, b_np = common.bucketize_data(N, n, a.rotate)
        xs = [jnp.asarray(x) for x in xs_np]
        b = jnp.asarray(b_np)
        want = numpy_bucketize(xs_np[0], b_np)
        for name, fn in impls:
            try:
                got = np.asarray(jax.jit(fn)(xs[:1], b)[0])
                t = timed(fn, xs, b)
                row = row_of(name, t, 8 * N, n, correct=bool((got == want).all()))
                if name == "pallas":
                    row["config"] = str(tuple(bk.default_config(n)))
                report["rows"].append(row)
                print(row, flush=True)
            except Exception as e:  # noqa: BLE001 - record and go on
                report["errors"].append({"impl": name, "n": n, "error": repr(e)[:2000]})
                print("ERROR", name, n, repr(e)[:500], flush=True)
        if gpu:
            # One op per jitted call (includes the Eytzinger table op and launch gaps).
            f1 = jax.jit(lambda x, b: bk.bucketize(x, b, impl="pallas"))
            it = iter(range(10**9))
            one = lambda: f1(xs[next(it) % len(xs)], b)  # noqa: E731
            t = common.time_calls(one, common.jax_sync, repeats=a.repeats, inner=4 * a.inner)
            try:
                if not a.no_gpu_trace:
                    t["gpu"] = common.jax_device_time(one, calls=8)
            except Exception as e:  # noqa: BLE001
                t["gpu"] = {"error": repr(e)[:500]}
            row = row_of("pallas_1op", t, 8 * N, n, correct=True)
            report["rows"].append(row)
            print(row, flush=True)
        for r in torch_res.get("results", []):
            if r["n"] == n:
                row = common.bandwidth_row(
                    "torch_int32" if r["out_int32"] else "torch_int64", r, r["bytes"],
                    copy_gbps, best, n=n, correct=r["correct"])
                # CUDA events time the stream, so they are GPU time too.
                row["gpu_us"], row["gpu_GBps"] = row["time_us"], row["GBps"]
                if gpu_copy.get("GBps"):
                    row["gpu_frac_copy"] = round(row["GBps"] / gpu_copy["GBps"], 3)
                report["rows"].append(row)
        save()
        del xs

    # ------------------------------------------------------------------ variant sweep
    if a.sweep:  # on CPU: interpret mode, only to test this script (use a small --size)
        configs = []
        if a.sweep_set == "full":
            for layout in ("sorted", "eytzinger"):
                for block in (512, 1024, 2048, 4096):
                    for nw in (4, 8):
                        configs.append(bk.Config(block, nw, layout))
                configs.append(bk.Config(1024, 4, layout, "evict_first"))
                configs.append(bk.Config(2048, 8, layout, "evict_first"))
            for block in (128, 256, 512):
                for nw in (4, 8):
                    configs.append(bk.Config(block, nw, "compare"))
        else:
            configs += [bk.Config(1024, 4, "sorted"), bk.Config(512, 4, "sorted")]
            configs += [bk.Config(blk, nw, "eytzinger") for blk, nw in
                        ((256, 2), (512, 2), (512, 4), (512, 8), (1024, 4), (1024, 8),
                         (2048, 16))]
        for n in [int(v) for v in a.sweep_ns.split(",")]:
            xs_np, b_np = common.bucketize_data(N, n, a.rotate)
            xs = [jnp.asarray(x) for x in xs_np]
            b = jnp.asarray(b_np)
            want = numpy_bucketize(xs_np[0], b_np)
            for cfg in configs:
                if cfg.layout == "compare" and n > 63:
                    continue
                fn = (lambda cfg: lambda xs, b: [bk.bucketize_pallas(x, b, config=cfg,
                                                                     interpret=not gpu)
                                                 for x in xs])(cfg)
                try:
                    got = np.asarray(jax.jit(fn)(xs[:1], b)[0])
                    t = timed(fn, xs, b, repeats=max(5, a.repeats // 2), inner=5, gpu_calls=3)
                    row = row_of(kernel_impl, t, 8 * N, n,
                                               correct=bool((got == want).all()),
                                               layout=cfg.layout, block=cfg.block,
                                               num_warps=cfg.num_warps, evict=cfg.x_evict)
                    report["sweep"].append(row)
                    print(f"sweep n={n} {tuple(cfg)}: {row['time_us']} us (gpu "
                          f"{row.get('gpu_us')}) {row['GBps']} GB/s ok={row['correct']}",
                          flush=True)
                except Exception as e:  # noqa: BLE001
                    report["errors"].append({"impl": f"sweep {tuple(cfg)}", "n": n,
                                             "error": traceback.format_exc()[-2000:]})
                    print("ERROR sweep", n, cfg, repr(e)[:500], flush=True)
            save()
            del xs
    save()
    print(render_md(report), flush=True)
    return 0 if all(c["ok"] for c in report["checks"]) else 1


def render_md(r: dict) -> str:
    env = r["env"]
    v = env.get("versions", {})
    t = r.get("torch", {})
    lines = [
        "# bucketize: Pallas-Triton kernel vs XLA vs torch",
        "",
        f"- device: {env.get('gpu_name') or env.get('jax_device')} "
        f"(driver {env.get('driver', 'n/a')}), host {env.get('host')}, {env.get('cpu_count')} CPUs",
        f"- versions: python {env.get('python')}, jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, "
        f"jax-cuda13-plugin {v.get('jax-cuda13-plugin')}, torch {t.get('torch', v.get('torch'))} "
        f"(CUDA {t.get('torch_cuda')}), triton {v.get('triton')}",
        f"- date: {env.get('date_utc')}",
        f"- x: {r['args']['size']} float32 (standard normal), boundaries: n sorted standard "
        f"normals; {r['args']['rotate']} x buffers rotated; median of {r['args']['repeats']} "
        f"repeats x {r['args']['inner']} back-to-back calls after warm-up",
        "- bytes counted: 4 B read + 4 B written per element (int32 out); torch_int64 "
        "writes 8 B; boundaries not counted. frac_copy = GB/s / JAX `jnp.copy` GB/s; "
        "frac_best = GB/s / best copy-like GB/s of the run (JAX copy, JAX negate, torch copy_). "
        "pallas: 4 x-buffers per jitted call (the Eytzinger table op is shared); "
        "pallas_1op: one op per jitted call (wall time = JAX dispatch bound).",
        "- time_us: host clock, synced once per `inner` calls (includes any host-side gaps); "
        "gpu_us: GPU busy time per op from a JAX profiler (CUPTI) trace, all kernels of the "
        "op; gpu_frac_copy = gpu_GBps / GPU-time bandwidth of `jnp.copy`. torch rows: CUDA "
        "events (both columns).",
        "",
    ]
    if "copy" in r:
        lines.append(f"copy bandwidth (JAX `jnp.copy`, read+write): {r['copy']['GBps']} GB/s "
                     f"({r['copy']['time_us']} us); negate: {r['neg']['GBps']} GB/s"
                     + f"; best copy-like: {r.get('best_copy_GBps')} GB/s"
                     + (f"; torch copy_: {t['copy']['GBps']:.0f} GB/s" if "copy" in t else "")
                     + (f"; `jnp.copy` by GPU time: {r['copy'].get('gpu_GBps')} GB/s "
                        f"({r['copy'].get('gpu_us')} us)" if r['copy'].get('gpu_us') else ""))
        lines.append("")
    if r["checks"]:
        ok = sum(c["ok"] and c.get("reference_ok", True) for c in r["checks"])
        lines.append(f"correctness vs NumPy: {ok}/{len(r['checks'])} cases exact "
                     f"(impl {r['checks'][0]['impl']}; n in 1..4096, sizes incl. partial "
                     "blocks, NaN, +-inf, -0.0, values equal to boundaries)")
        lines.append("")
    if "skipped" in t:
        lines.append(f"torch: skipped ({t['skipped'][:200]})")
        lines.append("")
    cols = ["n", "impl", "time_us", "GBps", "frac_copy", "gpu_us", "gpu_GBps", "gpu_frac_copy",
            "correct", "config"]
    lines.append(common.md_table(r["rows"], cols))
    if r["sweep"]:
        lines += ["", "## kernel variants (sweep)", ""]
        rows = sorted(r["sweep"], key=lambda s: (s["n"], s.get("gpu_us", s["time_us"])))
        lines.append("(sweep timing: fewer repeats, 5 calls per sync, so a few % slower than "
                     "the main table)")
        lines.append("")
        lines.append(common.md_table(rows, ["n", "layout", "block", "num_warps", "evict",
                                            "time_us", "frac_copy", "gpu_us",
                                            "gpu_frac_copy", "correct"]))
    if r["errors"]:
        lines += ["", "## errors", ""]
        for e in r["errors"]:
            lines.append(f"- {e['impl']} n={e['n']}: `{e['error'][-600:]}`")
    return "\n".join(lines) + "\n"


# ============================================================================ sparse ops
#
# Cases (GPU): a table of 8M rows (2**23) x dim 16 / 64 / 128 float32 (0.5 / 2 / 4 GB),
# 4M lookups (2**22), ids uniform or Zipf (s = 1: log-uniform rank, scrambled by an odd
# multiplier mod 2**23 so hot rows are spread over the table), bags of 32 or long bags
# (log-uniform lengths 1k-100k). torch runs the same numpy-generated ids in its own
# process first (benchmarks/torch_ops.py); tables are random on each side.
#
# Bytes counted (read + written, the minimum an op must move):
#   pool      C * (4 idx + 4 D row) [+ 4 C weights] + 4 (B + 1) splits + 4 B D out
#   bwd       C * (4 idx + 4 D grad) + 4 (U + 1) + 4 U D out (U = distinct ids)
#   update    U * (4 row id + 1 mask + 4 D grad + 2 * 4 D (1 + dim slots) + 2 * 4 row slots)
#   partition N * (8 key + 4 table + 1 valid) read + N * 12 (owner, perm, rank) written

SPARSE_ROWS = 2**23
SPARSE_LOOKUPS = 2**22


def sparse_spec(quick: bool, gpu: bool) -> dict:
    """The case list, shared with benchmarks/torch_ops.py (numpy-only)."""
    rows = SPARSE_ROWS if gpu else 2**12
    c = SPARSE_LOOKUPS if gpu else 2**11
    pool = [
        dict(id="d16_uni_b32", dim=16, dist="uniform", bag=32),
        dict(id="d64_uni_b32", dim=64, dist="uniform", bag=32),
        dict(id="d128_uni_b32", dim=128, dist="uniform", bag=32),
        dict(id="d64_zipf_b32", dim=64, dist="zipf", bag=32),
        dict(id="d64_uni_long", dim=64, dist="uniform", bag="long"),
        dict(id="d64_uni_b32_wmean", dim=64, dist="uniform", bag=32, weighted=True, combiner="mean"),
        dict(id="d64_occ_b32", dim=64, dist="uniform", bag=32, gathered=True),
    ]
    bwd = [
        dict(id="d16_uni", dim=16, dist="uniform"),
        dict(id="d64_uni", dim=64, dist="uniform"),
        dict(id="d128_uni", dim=128, dist="uniform"),
        dict(id="d64_zipf", dim=64, dist="zipf"),
    ]
    update = [
        dict(id="adam_d16", opt="adam", dim=16),
        dict(id="adam_d64", opt="adam", dim=64),
        dict(id="adam_d128", opt="adam", dim=128),
        dict(id="adamw_d64", opt="adamw", dim=64),
        dict(id="adagrad_d64", opt="adagrad", dim=64),
    ]
    partition = [dict(id="n8", shards=8), dict(id="n64", shards=64)]
    if quick:
        pool = [p for p in pool if p["id"] in ("d16_uni_b32", "d64_uni_b32", "d64_uni_long", "d64_occ_b32")]
        bwd = [b for b in bwd if b["id"] == "d64_uni"]
        update = [u for u in update if u["id"] in ("adam_d64", "adagrad_d64")]
        partition = partition[:1]
    touched = 2**20 if gpu else 2**9
    return dict(rows=rows, lookups=c, touched=touched, pool=pool, bwd=bwd, update=update,
                partition=partition, seed=1234)


def bench_ids(dist: str, size: int, rows: int, seed: int) -> np.ndarray:
    """int32 row ids in [0, rows): uniform, or Zipf s=1 (log-uniform rank) scrambled."""
    rng = np.random.default_rng(seed)
    if dist == "uniform":
        return rng.integers(0, rows, size, dtype=np.int64).astype(np.int32)
    u = rng.random(size)
    k = np.minimum(np.floor(np.exp(u * np.log(rows + 1.0))) - 1, rows - 1).astype(np.int64)
    return ((k * 0x9E3779B1) % rows).astype(np.int32)  # odd multiplier: a bijection mod 2**k


def bench_splits(bag, size: int, seed: int) -> np.ndarray:
    """int32 row_splits over `size` items: bags of `bag`, or log-uniform 1k-100k ("long")."""
    if bag == "long":
        rng = np.random.default_rng(seed + 17)
        lo, hi = (1000, 100_000) if size >= 2**20 else (50, 500)
        lens, total = [], 0
        while total < size:
            n = min(int(np.exp(rng.uniform(np.log(lo), np.log(hi)))), size - total)
            lens.append(n)
            total += n
        return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    return np.arange(0, size + 1, bag, dtype=np.int32)


def pool_bytes(case, c, b):
    d = case["dim"]
    extra = 4 * c if case.get("weighted") else 0
    return c * (4 + 4 * d) + extra + 4 * (b + 1) + 4 * b * d


def run_torch_sparse(a, spec, out_dir: pathlib.Path) -> dict:
    if a.no_torch:
        return {"skipped": "--no-torch"}
    import json  # noqa: PLC0415

    spec_path = out_dir / "torch_ops_spec.json"
    res_path = out_dir / "torch_ops_raw.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [a.torch_python, str(ROOT / "benchmarks" / "torch_ops.py"), "--spec", str(spec_path),
           "--device", "cuda" if a.device == "gpu" else "cpu", "--out", str(res_path),
           "--sections", a.sections]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    print(p.stdout[-3000:], p.stderr[-3000:] if p.returncode not in (0, 3) else "", flush=True)
    spec_path.unlink(missing_ok=True)
    if res_path.exists():
        res = json.loads(res_path.read_text())
        res["wall_s"] = round(time.time() - t0, 1)
        res_path.unlink()
        return res
    return {"skipped": f"torch process failed rc={p.returncode}: {p.stderr[-1500:]}"}


def main_sparse(a) -> int:  # noqa: C901 - one linear script
    gpu = a.device == "gpu"
    if not gpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    out_dir = pathlib.Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = [x for x in a.sections.split(",") if x]
    spec = sparse_spec(a.quick, gpu)
    t_start = time.time()
    torch_res = run_torch_sparse(a, spec, out_dir)

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    jax.config.update("jax_enable_x64", True)
    from pallas_kernels import embedding_bag as eb  # noqa: PLC0415
    from pallas_kernels import ids_partition as ip  # noqa: PLC0415
    from recis_jax import optim  # noqa: PLC0415
    from recis_jax.embedding.dedup import sorted_segment_sum  # noqa: PLC0415

    env = common.env_info()
    if gpu and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu but JAX backend is {jax.default_backend()}")
    kind = env.get("gpu_name") or env["jax_device"]
    tag = a.tag or next((t for t in ("h100", "h200", "a100") if t in kind.lower()),
                        "gpu" if gpu else "cpu")
    kimpl = "pallas" if gpu else "interpret"
    report = {"env": env, "args": vars(a), "spec": spec, "torch": torch_res,
              "rows": [], "sweep": [], "errors": []}
    torch_rows = {(r["section"], r["case"], r["impl"]): r for r in torch_res.get("results", [])}
    json_path = out_dir / f"ops_sparse_{tag}.json"
    repeats, inner = (a.repeats, 5) if gpu else (3, 1)

    def save():
        report["wall_s"] = round(time.time() - t_start, 1)
        common.write_json(json_path, report)
        (out_dir / f"ops_sparse_{tag}.md").write_text(render_sparse_md(report))

    def over_budget():
        return a.budget_s is not None and time.time() - t_start > a.budget_s

    def timeit(call):
        return common.time_calls(call, common.jax_sync, warmup=2, repeats=repeats, inner=inner)

    copy_gbps = None
    # Kernel variants timed besides the defaults (GPU): Config(rows, lanes, piece, warps...).
    # (The defaults are Config(32, 8, 512, 4) at dim 16 and Config(32, 2, 512, 4) at 64.)
    pool_variants = [(16, eb.Config(32, 4, 512, 2)), (16, eb.Config(16, 16, 256, 4)),
                     (16, eb.Config(32, 16, 512, 8)), (16, eb.Config(32, 8, 512, 8)),
                     (16, eb.Config(32, 8, 512, 2)), (64, eb.Config(32, 1, 512, 2)),
                     (64, eb.Config(32, 4, 512, 8))]
    bwd_variants = [eb.Config(2, 32, 32, 4), eb.Config(4, 16, 64, 4), eb.Config(1, 64, 16, 4),
                    eb.Config(2, 16, 32, 2), eb.Config(8, 8, 128, 4)]
    from pallas_kernels import sparse_update as su  # noqa: PLC0415
    update_variants = [su.Config(16, 4), su.Config(64, 8), su.Config(8, 2), su.Config(32, 8)]
    if not gpu:
        bwd_variants = bwd_variants[:1]

    def add(section, case, impl, t, nbytes, **extra):
        row = common.bandwidth_row(impl, t, nbytes, copy_gbps, None, section=section,
                                   case=case, **extra)
        tr = torch_rows.get((section, case, "torch"))
        if tr and "median_s" in tr and impl != "torch":
            row["x_torch"] = round(tr["median_s"] / t["median_s"], 2)
        report["rows"].append(row)
        print({k: row.get(k) for k in ("section", "case", "impl", "time_us", "GBps", "frac_copy",
                                       "x_torch", "max_err")}, flush=True)
        return row

    def add_torch(section, case, nbytes):
        tr = torch_rows.get((section, case, "torch"))
        if tr and "median_s" in tr:
            add(section, case, "torch", tr, nbytes, correct=tr.get("correct"),
                torch_op=tr.get("op"))

    def guard(section, case, fn):
        if over_budget():
            report["errors"].append({"section": section, "case": case, "error": "skipped: budget"})
            return
        try:
            fn()
        except Exception:  # noqa: BLE001 - record and go on
            report["errors"].append({"section": section, "case": case,
                                     "error": traceback.format_exc()[-2500:]})
            print("ERROR", section, case, traceback.format_exc()[-1500:], flush=True)
        save()

    def err(x, y):
        x = np.asarray(jnp.asarray(x, jnp.float32))
        y = np.asarray(jnp.asarray(y, jnp.float32))
        return float(np.max(np.abs(x - y) / (1.0 + np.abs(y)))) if x.size else 0.0

    # ---------------------------------------------------------------- copy bandwidth
    if "copy" in sections:
        n = 2**28 if gpu else 2**20  # 1 GB float32
        x = jnp.ones((n,), jnp.float32)
        f = jax.jit(jnp.copy)
        t = timeit(lambda: f(x))
        copy_gbps = 8 * n / t["median_s"] / 1e9
        report["copy"] = common.bandwidth_row("jax_copy", t, 8 * n, None)
        if "copy" in torch_res:
            report["torch_copy"] = torch_res["copy"]
        print(f"copy: {copy_gbps:.0f} GB/s", flush=True)
        del x
        save()

    R, C = spec["rows"], spec["lookups"]
    key = jax.random.key(0)
    tables = {}

    def table(d):
        if d not in tables:
            tables.clear()  # one table on the device at a time
            tables[d] = jax.random.normal(jax.random.fold_in(key, d), (R, d), jnp.float32)
        return tables[d]

    # ---------------------------------------------------------------- gather + pool
    def pool_case(case):
        d = case["dim"]
        ids_np = bench_ids(case["dist"], C, R, spec["seed"])
        splits_np = bench_splits(case["bag"], C, spec["seed"])
        b = len(splits_np) - 1
        ids, splits = jnp.asarray(ids_np), jnp.asarray(splits_np)
        rowids = jnp.asarray(np.repeat(np.arange(b, dtype=np.int32), np.diff(splits_np)))
        mean = case.get("combiner") == "mean"
        w = jnp.asarray(np.random.default_rng(3).random(C).astype(np.float32)) if case.get("weighted") else None
        nbytes = pool_bytes(case, C, b)
        if case.get("gathered"):
            src = jax.random.normal(jax.random.fold_in(key, 99), (C, d), jnp.float32)
            idx = None
            nbytes -= 4 * C
        else:
            src, idx = table(d), ids
        # Every impl takes (src, idx, splits, w, rowids): arrays closed over would become
        # constants, which XLA folds at compile time.
        impls = {
            "pallas": jax.jit(lambda s, i, sp, w, rowids: eb.segment_gather_sum(
                s, sp, i, w, mean=mean, impl=kimpl)),
            "xla_ref": jax.jit(lambda s, i, sp, w, rowids: eb.segment_gather_sum_reference(
                s, sp, i, w, mean=mean)),
        }
        if not mean:
            def segsum(s, i, sp, w, rowids):  # the fastest XLA form: scatter-add (atomics)
                x = s if i is None else s[i]
                x = x if w is None else x * w[:, None]
                return jax.ops.segment_sum(x, rowids, b, indices_are_sorted=True)
            impls["xla_segsum"] = jax.jit(segsum)
        want = impls["xla_ref"](src, idx, splits, w, rowids)
        for name, f in impls.items():
            got = f(src, idx, splits, w, rowids)
            e = err(got, want)
            del got
            t = timeit(lambda: f(src, idx, splits, w, rowids))
            add("pool", case["id"], name, t, nbytes, max_err=e, bags=b, dim=d)
        add_torch("pool", case["id"], nbytes)

    if "pool" in sections:
        for case in spec["pool"]:
            guard("pool", case["id"], lambda: pool_case(case))

    # ---------------------------------------------------------------- backward segment sum
    def bwd_case(case):
        d = case["dim"]
        ids_np = bench_ids(case["dist"], C, R, spec["seed"] + 1)
        uniq, inv_np = np.unique(ids_np, return_inverse=True)
        u = len(uniq)
        order_np = np.argsort(inv_np, kind="stable").astype(np.int32)
        seg_np = inv_np[order_np].astype(np.int32)
        splits_np = np.searchsorted(seg_np, np.arange(u + 1), side="left").astype(np.int32)
        g = jax.random.normal(jax.random.fold_in(key, 7), (C, d), jnp.float32)
        inv, order, seg, splits = (jnp.asarray(x) for x in (inv_np.astype(np.int32), order_np,
                                                             seg_np, splits_np))
        nbytes = C * (4 + 4 * d) + 4 * (u + 1) + 4 * u * d
        impls = {
            "pallas": jax.jit(lambda g, order, seg, splits, inv: eb.segment_gather_sum(
                g, splits, order, impl=kimpl)),
            "xla_ref": jax.jit(lambda g, order, seg, splits, inv: sorted_segment_sum(g[order], seg, u)),
            "xla_segsum": jax.jit(lambda g, order, seg, splits, inv: jax.ops.segment_sum(g, inv, u)),
        }
        for cfg in bwd_variants if case["id"] == "d64_uni" else ():
            impls[f"pallas{tuple(cfg)}"] = jax.jit(
                lambda g, order, seg, splits, inv, cfg=cfg: eb.segment_gather_sum_pallas(
                    g, splits, order, config=cfg, interpret=not gpu))
        args = (g, order, seg, splits, inv)
        want = impls["xla_ref"](*args)
        for name, f in impls.items():
            got = f(*args)
            e = err(got, want)
            del got
            t = timeit(lambda: f(*args))
            add("bwd", case["id"], name, t, nbytes, max_err=e, unique=u, dim=d)
        add_torch("bwd", case["id"], nbytes)

    if "bwd" in sections:
        for case in spec["bwd"]:
            guard("bwd", case["id"], lambda: bwd_case(case))
    tables.clear()

    # ---------------------------------------------------------------- fused optimizer update
    def update_case(case):
        d, u = case["dim"], spec["touched"]
        opt = optim.make(case["opt"], lr=0.01)
        rng = np.random.default_rng(spec["seed"] + 2)
        rows = jnp.asarray(rng.choice(R, u, replace=False).astype(np.int32))
        g = jax.random.normal(jax.random.fold_in(key, 8), (u, d), jnp.float32)
        mask = jnp.ones((u,), bool)
        nslot_dim = sum(1 for s in opt.init(1, d).values() if s.ndim == 2)
        nslot_row = len(opt.slot_names) - nslot_dim
        nbytes = u * (4 + 1 + 4 * d + 2 * 4 * d * (1 + nslot_dim) + 2 * 4 * nslot_row)

        def fresh():
            emb = jax.random.normal(jax.random.fold_in(key, 9), (R, d), jnp.float32)
            return emb, opt.init(R, d)

        row_fn = _row_update_of(opt) if case["id"] == "adam_d64" and gpu else None

        results = {}
        runs = [("xla_ref", "reference", None), ("pallas", kimpl, None)]
        if case["id"] == "adam_d64" and gpu:
            runs += [(f"pallas{tuple(c)}", "pallas", c) for c in update_variants]
        for name, impl, cfg in runs:
            if cfg is None:
                def upd(e, s, rows, g, mask, impl=impl):
                    return opt.apply(e, s, rows, g, mask, jnp.int32(1), impl=impl)
            else:
                def upd(e, s, rows, g, mask, cfg=cfg):  # the optimizer's math, one config
                    from pallas_kernels import sparse_update as su  # noqa: PLC0415
                    return su.sparse_update_pallas(
                        row_fn, e, s, rows, g, mask, jnp.float32(0.01), jnp.int32(1), config=cfg)
            f = jax.jit(upd, donate_argnums=(0, 1))
            st = list(fresh())
            e1, s1 = f(*st, rows, g, mask)
            results[name] = (e1[rows[:4096]], {k: v[rows[:4096]] for k, v in s1.items()})
            st = [e1, s1]
            del e1, s1

            def call():
                st[0], st[1] = f(st[0], st[1], rows, g, mask)
                return st[0]
            t = timeit(call)
            ref = results["xla_ref"]
            e = max(err(results[name][0], ref[0]), *[err(results[name][1][k], ref[1][k]) for k in ref[1]]) \
                if ref[1] else err(results[name][0], ref[0])
            add("update", case["id"], name, t, nbytes, dim=d, touched=u, max_err=e)
            st.clear()
        add_torch("update", case["id"], nbytes)

    if "update" in sections:
        for case in spec["update"]:
            guard("update", case["id"], lambda: update_case(case))

    # ---------------------------------------------------------------- ids partition
    def partition_case(case):
        n = C
        rng = np.random.default_rng(spec["seed"] + 3)
        keys = jnp.asarray(common.vocab_key(rng.integers(0, 1 << 40, n)))
        tabs = jnp.asarray(rng.integers(0, 4, n).astype(np.int32))
        valid = jnp.asarray(rng.random(n) < 0.95)
        k = case["shards"]
        nbytes = n * (8 + 4 + 1) + n * 12
        impls = {"pallas": jax.jit(lambda t, x, v: ip.ids_partition(t, x, v, k, impl=kimpl)),
                 "xla_ref": jax.jit(lambda t, x, v: ip.ids_partition_reference(t, x, v, k))}
        want = impls["xla_ref"](tabs, keys, valid)
        for name, f in impls.items():
            got = f(tabs, keys, valid)
            ok = all(bool(jnp.all(x == y)) for x, y in zip(got, want))
            t = timeit(lambda: f(tabs, keys, valid))
            add("partition", case["id"], name, t, nbytes, correct=ok, shards=k)
        add_torch("partition", case["id"], nbytes)

    if "partition" in sections:
        for case in spec["partition"]:
            guard("partition", case["id"], lambda: partition_case(case))

    # ---------------------------------------------------------------- pool kernel variants
    if "sweep" in sections and gpu:
        for d, cfg in pool_variants:
            def one(d=d, cfg=cfg):
                for bag in (32,):
                    ids = jnp.asarray(bench_ids("uniform", C, R, spec["seed"]))
                    sp_np = bench_splits(bag, C, spec["seed"])
                    sp = jnp.asarray(sp_np)
                    f = jax.jit(lambda s, i, sp: eb.segment_gather_sum_pallas(s, sp, i, config=cfg))
                    tab = table(d)
                    t = timeit(lambda: f(tab, ids, sp))
                    row = common.bandwidth_row("pallas", t, pool_bytes({"dim": d}, C, len(sp_np) - 1),
                                               copy_gbps, None, dim=d, bag=bag, config=str(tuple(cfg)))
                    report["sweep"].append(row)
                    print("sweep", row["dim"], row["bag"], row["config"], row["time_us"], row["GBps"],
                          flush=True)
            guard("sweep", str((d, tuple(cfg))), one)
    save()
    print(render_sparse_md(report), flush=True)
    return 0


def _row_update_of(opt):
    """The per-row math closure of a recis_jax sparse optimizer (for timing kernel
    configs directly): captured from one traced apply call."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from pallas_kernels import sparse_update as su  # noqa: PLC0415

    seen = {}
    orig = su.sparse_update

    def spy(row_update, *args, **kw):
        seen["f"] = row_update
        return orig(row_update, *args, **kw)
    su.sparse_update = spy
    try:
        jax.eval_shape(lambda: opt.apply(jnp.zeros((4, 2)), opt.init(4, 2), jnp.zeros(1, jnp.int32),
                                         jnp.zeros((1, 2)), jnp.ones(1, bool), 1, impl="reference"))
    finally:
        su.sparse_update = orig
    return seen["f"]


def render_sparse_md(r: dict) -> str:
    env = r["env"]
    v = env.get("versions", {})
    t = r.get("torch", {})
    sp = r["spec"]
    lines = [
        "# Sparse-path ops: Pallas-Triton kernels vs XLA vs torch",
        "",
        f"- device: {env.get('gpu_name') or env.get('jax_device')} (driver {env.get('driver', 'n/a')}), "
        f"host {env.get('host')}, {env.get('cpu_count')} CPUs",
        f"- versions: python {env.get('python')}, jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, "
        f"torch {t.get('torch', v.get('torch'))} (CUDA {t.get('torch_cuda')}), triton {v.get('triton')}",
        f"- date: {env.get('date_utc')}",
        f"- table rows {sp['rows']}, lookups {sp['lookups']}, touched rows (update) {sp['touched']}; "
        "float32; ids uniform or Zipf(s=1, scrambled); bags of 32 or log-uniform 1k-100k ('long')",
        "- time_us: median over repeats of 5 back-to-back calls per sync (host clock; torch: CUDA "
        "events); GBps: bytes (see benchmarks/ops.py) / time; frac_copy: GBps / JAX `jnp.copy` "
        "GBps of a 1 GB array in the same run; x_torch: torch time / this time (> 1 = faster than "
        "torch); max_err: max |x - ref| / (1 + |ref|) against xla_ref.",
        "- impls: pallas = pallas_kernels (embedding_bag.segment_gather_sum, sparse_update, "
        "ids_partition); xla_ref = their pure-jnp references (deterministic: sorted-segment scan; "
        "gather/scatter; sort); xla_segsum = jax.ops.segment_sum (scatter-add with float atomics, "
        "not deterministic); torch: F.embedding_bag, index_add_, eager index_select/index_copy_ "
        "Adam/Adagrad, hash + stable sort + bincount.",
        "",
    ]
    if "copy" in r:
        lines.append(f"copy bandwidth (JAX `jnp.copy`, 1 GB, read+write): {r['copy']['GBps']} GB/s"
                     + (f"; torch copy_: {r['torch_copy']['GBps']:.0f} GB/s" if "torch_copy" in r else ""))
        lines.append("")
    if "skipped" in t:
        lines += [f"torch: skipped ({str(t['skipped'])[:300]})", ""]
    titles = {"pool": "gather + pool (forward)", "bwd": "backward: segment sum onto unique rows",
              "update": "fused sparse optimizer update (donated, in place)",
              "partition": "ids partition by owner"}
    cols = ["case", "impl", "time_us", "GBps", "frac_copy", "x_torch", "max_err", "correct"]
    for sec, title in titles.items():
        rows = [x for x in r["rows"] if x["section"] == sec]
        if rows:
            lines += [f"## {title}", "", common.md_table(rows, cols), ""]
    if r.get("sweep"):
        lines += ["## pool kernel variants (Config(rows, lanes, piece, num_warps))", "",
                  common.md_table(r["sweep"], ["dim", "bag", "config", "time_us", "GBps", "frac_copy"]), ""]
    if r["errors"]:
        lines += ["## errors", ""]
        for e in r["errors"]:
            lines.append(f"- {e['section']} {e['case']}: `{e['error'][-700:]}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
