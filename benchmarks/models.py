"""Sequence Transformer step time and MFU (forward + backward), and the longest L that fits.

    GPU (device machine, repo root):
      PYTHONPATH=$PWD python3 benchmarks/models.py --device gpu --out $OUT
    CPU (here, < 1 minute):
      .venv/bin/python benchmarks/models.py --device cpu --quick

Model: `recis_jax.models.SequenceTransformer`, 8 pre-LN layers, hidden 1024, 16 heads,
FFN 4096, causal, params float32, compute bfloat16, attention through
`jax.nn.dot_product_attention` (cuDNN flash attention on GPU, XLA on CPU). Input:
[B, L, 128] item embeddings, B = tokens_per_step / L (~64k tokens per step).
Timed: one jitted `value_and_grad` of mean(out^2) over the params (forward + backward,
all gradients returned; no optimizer update).

FLOPs (analytical, matmuls only, `transformer_flops`): 6 * P * tokens for the block
matmuls (P = layers * (4 h^2 + 2 h ffn) = 100.7M) plus attention QK^T and PV,
12 * layers * L^2 * h * B, *halved for causal* (the work a causal flash kernel does);
`mfu_full_attn` counts attention unhalved. The input projection (128 -> h), norms,
softmax and elementwise work are not counted. MFU = FLOPs / step time / peak, peak =
bf16 matmul 8192^3 (jnp.dot) measured in the same run.

Largest L: powers of two above the timed lengths up to --max-length, batch 1, first
without and then with rematerialisation (`remat=True`); OOM is caught and recorded.

Results: <out>/models_<tag>.json and .md (tag: h100, h200, ..., cpu).
"""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--lengths", default=None, help="timed L values (gpu: 1024,4096,16384)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per step (gpu: 65536)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--ffn", type=int, default=None)
    ap.add_argument("--in-dim", type=int, default=128, help="input item-embedding dim")
    ap.add_argument("--bidirectional", action="store_true", help="non-causal attention")
    ap.add_argument("--mask", action="store_true",
                    help="pass a padding mask (every row full length) to time the padded path")
    ap.add_argument("--attention", choices=["auto", "xla", "cudnn"], default="auto")
    ap.add_argument("--max-length", type=int, default=None, help="largest L tried (gpu: 131072)")
    ap.add_argument("--no-search", action="store_true", help="skip the largest-L search")
    ap.add_argument("--peak-size", type=int, default=None, help="matmul n for the peak (gpu: 8192)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--inner", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default=None)
    a = ap.parse_args(argv)
    gpu = a.device == "gpu"
    small = a.quick or not gpu
    a.lengths = [int(x) for x in (a.lengths or ("64,128" if small else "1024,4096,16384")).split(",")]
    a.tokens = a.tokens or (256 if small else 65536)
    a.layers = a.layers or (2 if small else 8)
    a.hidden = a.hidden or (64 if small else 1024)
    a.heads = a.heads or (4 if small else 16)
    a.ffn = a.ffn or (256 if small else 4096)
    a.max_length = a.max_length or (512 if small else 131072)
    a.peak_size = a.peak_size or (512 if small else 8192)
    a.repeats = a.repeats or (3 if small else 7)
    a.inner = a.inner or (1 if small else 3)
    return a


def _is_oom(e: BaseException) -> bool:
    s = str(e)
    return any(w in s for w in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))


def matmul_peak(n: int, repeats: int, inner: int) -> dict:
    """bf16 [n, n] @ [n, n] FLOP/s (bf16 output, f32 accumulation as XLA does)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from benchmarks import common  # noqa: PLC0415

    ks = jax.random.split(jax.random.key(0), 2)
    a = jax.random.normal(ks[0], (n, n), jnp.bfloat16)
    b = jax.random.normal(ks[1], (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
    t = common.time_calls(lambda: f(a, b), common.jax_sync, repeats=repeats, inner=max(inner, 3))
    return {"n": n, "time_s": t["median_s"], "flops_per_s": 2 * n ** 3 / t["median_s"]}


def run_case(a, length: int, batch: int, remat: bool, peak: float, timed: bool) -> dict:
    """Compile and time one (L, batch) forward+backward; OOM -> {"status": "oom"}."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from benchmarks import common  # noqa: PLC0415
    from recis_jax.models import SequenceTransformer, attention_implementation  # noqa: PLC0415
    from recis_jax.models.transformer import transformer_flops  # noqa: PLC0415

    causal = not a.bidirectional
    impl = None if a.attention == "auto" else a.attention
    model = SequenceTransformer(num_layers=a.layers, hidden=a.hidden, num_heads=a.heads,
                                ffn=a.ffn, causal=causal, remat=remat, attention_impl=impl,
                                dtype=jnp.bfloat16, param_dtype=jnp.float32)
    row = {"L": length, "batch": batch, "tokens": length * batch, "remat": remat,
           "attention": attention_implementation(jnp.bfloat16, a.hidden // a.heads, impl)}
    try:
        seq = jax.random.normal(jax.random.key(1), (batch, length, a.in_dim), jnp.bfloat16)
        mask = jnp.ones((batch, length), bool) if a.mask else None
        params = jax.jit(model.init)(jax.random.key(0), seq[:1, :8], None if mask is None else mask[:1, :8])

        def loss(p, seq, mask):
            out = model.apply(p, seq, mask)
            return jnp.mean(jnp.square(out))

        t0 = time.perf_counter()
        step = jax.jit(jax.value_and_grad(loss)).lower(params, seq, mask).compile()
        row["compile_s"] = round(time.perf_counter() - t0, 1)
        try:
            mem = step.memory_analysis()
            row["temp_GB"] = round(mem.temp_size_in_bytes / 1e9, 2)
        except Exception:  # noqa: BLE001 - not every backend reports it
            pass
        repeats, inner = (a.repeats, a.inner) if timed else (2, 1)
        t = common.time_calls(lambda: step(params, seq, mask), common.jax_sync,
                              warmup=1 if not timed else 2, repeats=repeats, inner=inner)
        val, _ = step(params, seq, mask)
        row["loss_finite"] = bool(jnp.isfinite(val))
    except Exception as e:  # noqa: BLE001
        if _is_oom(e):
            row["status"] = "oom"
            row["error"] = str(e).splitlines()[0][:200]
        else:
            row["status"] = "error"
            row["error"] = "".join(traceback.format_exception_only(type(e), e))[:500]
        return row
    fl = transformer_flops(a.layers, a.hidden, a.ffn, batch, length, causal=causal)
    s = t["median_s"]
    row.update(status="ok", step_ms=round(s * 1e3, 2), min_ms=round(t["min_s"] * 1e3, 2),
               tokens_per_s=round(length * batch / s),
               model_tflops=float(f"{fl['total'] / 1e12:.4g}"),
               tflops_per_s=float(f"{fl['total'] / s / 1e12:.4g}"),
               mfu=round(fl["total"] / s / peak, 3),
               mfu_full_attn=round((fl["dense"] + fl["attention_full"]) / s / peak, 3),
               attn_flop_frac=round(fl["attention"] / fl["total"], 3))
    return row


def _free(jax) -> None:
    """Drop the previous case's buffers and executables before the next (bigger) one."""
    gc.collect()
    jax.clear_caches()


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:  # the largest-L search wants most of the card
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    import jax  # noqa: PLC0415

    import recis_jax  # noqa: F401, PLC0415  (x64 on, as in training)
    from benchmarks import common  # noqa: PLC0415

    if a.device == "gpu" and jax.default_backend() != "gpu":
        print(f"--device gpu but JAX backend is {jax.default_backend()}", file=sys.stderr)
        return 2
    env = common.env_info()
    kind = jax.devices()[0].device_kind
    tag = a.tag or ("cpu" if a.device == "cpu" else
                    next((k for k in ("h100", "h200", "a100", "b200", "l4") if k in kind.lower()),
                         "gpu"))
    print(f"device: {kind}  backend: {jax.default_backend()}", flush=True)

    peak = matmul_peak(a.peak_size, a.repeats, a.inner)
    print(f"bf16 matmul {a.peak_size}^3: {peak['flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)

    rows = []
    for length in a.lengths:
        batch = max(1, a.tokens // length)
        row = run_case(a, length, batch, remat=False, peak=peak["flops_per_s"], timed=True)
        _free(jax)
        rows.append(row)
        print({k: row.get(k) for k in ("L", "batch", "status", "step_ms", "mfu", "temp_GB")}, flush=True)

    search = []
    if not a.no_search:
        length, remat = max(a.lengths) * 2, False
        while length <= a.max_length:
            row = run_case(a, length, 1, remat=remat, peak=peak["flops_per_s"], timed=False)
            _free(jax)
            search.append(row)
            print("search", {k: row.get(k) for k in ("L", "remat", "status", "step_ms", "mfu")}, flush=True)
            if row["status"] == "ok":
                length *= 2
            elif row["status"] == "oom" and not remat:
                remat = True  # retry the same L with rematerialised blocks
            else:
                break
    fits = [r for r in rows + search if r["status"] == "ok"]
    largest = max(fits, key=lambda r: (r["L"], -r["remat"])) if fits else None

    result = {
        "benchmark": "models: SequenceTransformer forward+backward",
        "env": env, "device_kind": kind, "args": vars(a),
        "model": {"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "ffn": a.ffn,
                  "causal": not a.bidirectional,
                  "block_params": a.layers * (4 * a.hidden ** 2 + 2 * a.hidden * a.ffn),
                  "param_dtype": "float32", "compute_dtype": "bfloat16"},
        "flops_note": "6*P*tokens + 12*layers*L^2*h*B attention, halved when causal (mfu); "
                      "mfu_full_attn counts attention unhalved",
        "peak": peak, "rows": rows, "search": search,
        "largest_L": None if largest is None else {
            "L": largest["L"], "batch": largest["batch"], "remat": largest["remat"],
            # True: nothing failed up to --max-length, so the card holds at least this L
            "search_limit_reached": bool(search) and search[-1]["status"] == "ok"},
    }
    out = pathlib.Path(a.out)
    common.write_json(out / f"models_{tag}.json", result)
    cols = ["L", "batch", "remat", "attention", "status", "step_ms", "tokens_per_s",
            "tflops_per_s", "mfu", "mfu_full_attn", "attn_flop_frac", "temp_GB", "compile_s"]
    md = [f"# SequenceTransformer forward+backward on {kind}", "",
          f"{env.get('date_utc')}; jax {env['versions'].get('jax')}; "
          f"{env.get('gpu_name') or env.get('cpu')}", "",
          f"Model: {a.layers} pre-LN layers, hidden {a.hidden}, {a.heads} heads, FFN {a.ffn}, "
          f"{'causal' if not a.bidirectional else 'bidirectional'}, f32 params, bf16 compute; "
          f"~{a.tokens} tokens per step; mask: {a.mask}.", "",
          f"Peak (bf16 matmul {a.peak_size}^3, same run): {peak['flops_per_s'] / 1e12:.1f} TFLOP/s. "
          f"FLOPs: {result['flops_note']}.", "",
          common.md_table(rows, cols), ""]
    if search:
        md += ["Largest-L search (batch 1):", "", common.md_table(search, cols), ""]
    md.append(f"Largest L that fits: {result['largest_L']}")
    (out / f"models_{tag}.md").write_text("\n".join(md) + "\n")
    short = ["L", "batch", "remat", "status", "step_ms", "tflops_per_s", "mfu"]
    print("\n" + common.md_table(rows + search, short))
    print(f"largest L: {result['largest_L']}; written {out}/models_{tag}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
