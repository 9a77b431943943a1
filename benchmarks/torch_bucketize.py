"""torch.bucketize baseline, run in its own process by benchmarks/ops.py.

    python benchmarks/torch_bucketize.py --device cuda --size 8388608 --ns 16,64,1024 --out t.json

Same inputs as the JAX side (benchmarks.common.bucketize_data). Times
`torch.bucketize(x, b, right=True)` (int64 out, what RecIS-style code gets by default)
and with `out_int32=True`, with CUDA events on the GPU (host clock on CPU).
Exit code 3 and {"skipped": reason} when torch is not importable.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.common import bucketize_data, summarize, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--size", type=int, default=8 * 2**20)
    ap.add_argument("--ns", default="16,64,1024")
    ap.add_argument("--rotate", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        import torch  # noqa: PLC0415
    except ImportError as e:
        write_json(args.out, {"skipped": f"torch not importable: {e}"})
        return 3
    import numpy as np  # noqa: PLC0415

    dev = torch.device(args.device)
    res = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "results": []}
    if args.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        res["sm_count"] = p.multi_processor_count
        res["l2_bytes"] = getattr(p, "L2_cache_size", None)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def timeit(fn, ops):
        for _ in range(3):
            fn()
        sync()
        samples = []
        for _ in range(args.repeats):
            if args.device == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                for _ in range(args.inner):
                    fn()
                e.record()
                e.synchronize()
                samples.append(s.elapsed_time(e) / 1e3 / (args.inner * ops))
            else:
                t0 = time.perf_counter()
                for _ in range(args.inner):
                    fn()
                samples.append((time.perf_counter() - t0) / (args.inner * ops))
        out = summarize(samples)
        out.update(inner=args.inner, ops_per_call=ops)
        return out

    # Copy bandwidth seen by torch, for reference (bytes read + written).
    xs_np, _ = bucketize_data(args.size, 16, args.rotate, args.seed)
    xs = [torch.from_numpy(x).to(dev) for x in xs_np]
    outs = [torch.empty_like(x) for x in xs]

    def copy():
        for x, o in zip(xs, outs):
            o.copy_(x)
    t = timeit(copy, len(xs))
    res["copy"] = {**t, "bytes": 8 * args.size, "GBps": 8 * args.size / t["median_s"] / 1e9}

    for n in [int(v) for v in args.ns.split(",")]:
        xs_np, b_np = bucketize_data(args.size, n, args.rotate, args.seed)
        xs = [torch.from_numpy(x).to(dev) for x in xs_np]
        b = torch.from_numpy(b_np).to(dev)
        ref = np.searchsorted(b_np, xs_np[0], side="right")
        for int32 in (False, True):
            got = torch.bucketize(xs[0], b, right=True, out_int32=int32).cpu().numpy()
            ok = bool((got == ref).all())

            def run(int32=int32):
                for x in xs:
                    torch.bucketize(x, b, right=True, out_int32=int32)
            t = timeit(run, len(xs))
            res["results"].append({"n": n, "out_int32": int32, "correct": ok,
                                   "bytes": (4 + (4 if int32 else 8)) * args.size, **t})
            print(f"torch n={n} int32={int32}: {t['median_s']*1e6:.1f} us ok={ok}", flush=True)
        del xs, b
    write_json(args.out, res)
    print(json.dumps({"copy_GBps": res["copy"]["GBps"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
