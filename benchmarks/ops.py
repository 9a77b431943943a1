"""Op-level benchmarks: bucketize (Pallas-Triton kernel vs XLA searchsorted vs torch).

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


if __name__ == "__main__":
    sys.exit(main())
