"""End-to-end training throughput: recis-jax vs PyTorch (static vocabulary and ID-mapped),
side by side in one run, against the physical limit.

    python benchmarks/e2e.py --device gpu  [--dists uniform,zipf] [--workloads deepfm,dcnv2,seq1k,seq16k]
    python benchmarks/e2e.py --device cpu  --torch-python /tmp/recis-torch-venv/bin/python --torch-compile deepfm

Workloads and data: benchmarks/e2e_data.py (shared with the PyTorch side,
benchmarks/torch_baseline/e2e_torch.py). Every (framework, workload, distribution, mode)
runs in its own process (JAX preallocates most of the GPU memory) with the same timing:
`num_batches` generated batches placed on the device before timing and cycled; the first
step (compilation) timed apart; warm-up steps; then windows of steps with one device sync
per window; step time = median window / steps per window; samples/s = batch / step time
(GPU: 5 warm-up steps, 5 windows of 5; CPU: 2 warm-up steps, 5 windows of 3: with fewer, the
CPU's DeepFM steps, mostly inserts of new IDs at first, swung by 20-30% between runs).
With `--multi-step W`, workload W's recis-jax side also runs with `train.steps_per_call`
= --window-steps (`make_multi_step`: one call runs a window's steps over its stacked
batches, so the host dispatches once per window; the same steps per sync as the others).

recis-jax runs the `recis-jax train` step (`recis_jax.train.step.make_train_step`: feature
ops -> dedup -> hashtable find_or_insert -> gather + pooling -> Flax model -> loss ->
optax + sparse optimizer on touched rows, one donated jit) built from configs/deepfm.py,
configs/dcnv2.py and configs/seq_transformer.py with the workload's shapes; it sees the
raw 64-bit IDs (its tables are hashtables). Tables are sized for every distinct ID of
the generated batches (no growth inside the timed loop; an overflow would skip a step
and fails the run) and start empty: a timed step inserts the IDs it sees first, and
gives them their deterministic initial rows. Set as on the PyTorch side: new rows
N(0, std) (`embedding.init = "normal"`; PyTorch fills its tables with normal_ before
timing), DeepFM's bias as the last column of its 9-wide rows (`features.fuse_bias`),
float32 DeepFM, no numeric transform.

Physical limit per workload (same run): the sparse part must move at least
`e2e_data.sparse_bytes` per step (every lookup's row read once, every distinct row and its
optimizer slots read and written once) at the copy bandwidth, and the dense part must do
`dense_flops_per_sample` at the matmul peak (bf16 on GPU, the faster of bf16 and float32 on CPU), both measured
in each process (the best of a workload's processes is used). bound samples/s = 1 / max(bytes / copy_bw, flops / peak) per sample;
MBU = bytes moved / step time / copy bandwidth; MFU = dense FLOPs / step time / peak.
The JAX process also times the dense model's train step alone (pooled inputs given):
the rest of the step is the sparse part (the profile split in the table).

Writes DIR/e2e_<tag>.json and .md and DIR/e2e_<tag>.png (tag: the GPU model, e.g. h200, or cpu).

Profile of one recis-jax run (3 steps; kernels attributed to JAX source lines):

    XLA_FLAGS="--xla_gpu_enable_command_buffer= --xla_dump_to=H --xla_dump_hlo_as_text \
      --xla_dump_hlo_module_re=.*train_step.*" python benchmarks/e2e.py --one --device gpu \
      --workload dcnv2 --dist uniform --result r.json --profile T
    python benchmarks/trace_summary.py T --hlo H
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

import common  # noqa: E402
import e2e_data as D  # noqa: E402

TORCH_SCRIPT = ROOT / "benchmarks" / "torch_baseline" / "e2e_torch.py"


# ----------------------------------------------------------------------------- recis-jax side

def jax_config(w: D.Workload, platform: str):
    from recis_jax.train.main import load_config

    if w.name.startswith("deepfm"):
        c = load_config(str(ROOT / "configs" / "deepfm.py"))
        c.model.dtype = "float32"   # as the PyTorch side (TF32 matmuls on both)
        c.features.fuse_bias = True  # one [rows, 8 + 1] table, as the PyTorch side
    elif w.name.startswith("dcnv2"):
        c = load_config(str(ROOT / "configs" / "dcnv2.py"))
    else:
        c = load_config(str(ROOT / "configs" / "seq_transformer.py"))
        c.features.seq_len = w.seq_len
        c.model.remat = w.seq_len > 4096
    c.features.dense_transform = "none"  # the generated numerics are used as given, on both sides
    c.embedding.init = "normal"  # new rows N(0, init_std), as the PyTorch tables' normal_(0, std)
    # bf16 dense as PyTorch's autocast; the sequence model's attention and gelu in float32
    # on the CPU, as autocast keeps softmax / gelu there (XLA:CPU's bfloat16 attention is
    # 6x slower than its float32 one, e2e_cpu.md).
    if platform == "cpu" and w.seq_len:
        c.model.attention_dtype = "float32"
    c.train.batch_size = w.batch
    return c


def jax_batch(w: D.Workload, b: dict) -> dict:
    """e2e_data batch -> the reader's host layout (raw 64-bit IDs as Ragged columns)."""
    from recis_jax.ragged import Ragged

    B = w.batch
    feats = {"label": b["label"][:, None]}
    for j in range(D.NUM_DENSE):
        feats[f"i{j + 1}"] = b["dense"][:, j:j + 1]
    for f, (idx, h) in enumerate(zip(b["cat"], w.hotness)):
        feats[f"c{f + 1}"] = Ragged(D.raw_ids(f, idx), (np.arange(B + 1) * h).astype(np.int32))
    if w.seq_len:
        feats["seq"] = Ragged(D.raw_ids(D.ITEM_FEATURE, b["seq"].ravel()),
                              (np.arange(B + 1) * w.seq_len).astype(np.int32))
        feats["target_item"] = Ragged(D.raw_ids(D.ITEM_FEATURE, b["target"]), np.arange(B + 1, dtype=np.int32))
    return {"features": feats, "mask": np.ones(B, bool)}


def split_rows(w: D.Workload, b: dict, k: int) -> list[dict]:
    """An e2e_data batch as k micro-batches of batch / k rows (fixed hotness: row-major slices)."""
    m = w.batch // k
    out = []
    for j in range(k):
        r = slice(j * m, (j + 1) * m)
        part = {"label": b["label"][r], "dense": b["dense"][r],
                "cat": [c[j * m * h:(j + 1) * m * h] for c, h in zip(b["cat"], w.hotness)]}
        if w.seq_len:
            part["seq"], part["target"] = b["seq"][r], b["target"][r]
        out.append(part)
    return out


def _rows(n: int) -> int:
    return max(1024, -(-int(n * 1.02) // 1024) * 1024)


def probes(platform: str) -> dict:
    """Copy bandwidth (read + write bytes / s) and matmul peak, measured in this process."""
    import jax
    import jax.numpy as jnp

    gpu = platform == "gpu"
    n = (1 << 28) if gpu else (1 << 26)  # 1 GiB / 256 MiB of float32
    x = jnp.ones((n,), jnp.float32)
    add = jax.jit(lambda x: x + 1.0)
    copy = common.time_calls(lambda: add(x), jax.block_until_ready, warmup=3, repeats=10, inner=1)
    m = 8192 if gpu else 2048
    best = float("inf")
    # The faster of bf16 and float32 (a CPU with AMX runs bf16 ~5x faster, one without slower).
    for dt in ((jnp.bfloat16,) if gpu else (jnp.bfloat16, jnp.float32)):
        a = jnp.ones((m, m), dt)
        mm = jax.jit(lambda a: a @ a)
        best = min(best, common.time_calls(lambda: mm(a), jax.block_until_ready, warmup=3, repeats=10,
                                           inner=1)["median_s"])
    return {"copy_gbps": 2 * 4 * n / copy["median_s"] / 1e9, "matmul_tflops": 2 * m ** 3 / best / 1e12}


def run_jax(a) -> dict:
    import jax

    import recis_jax  # noqa: F401,I001  (enables x64)
    from recis_jax.embedding.engine import EmbeddingEngine
    from recis_jax.runtime import keep_freed_host_memory
    from recis_jax.train import recipes
    from recis_jax.train.step import init_state, make_multi_step, make_train_step, stack_batches

    w = D.WORKLOADS[a.workload]
    platform = jax.default_backend()
    if platform == "cpu":  # as the Trainer does on the CPU
        keep_freed_host_memory()
    # One pass per batch by default (dcnv2's 65536 x 214 lookups included: 29.7 GB peak on
    # an H200, tables and optimizer state included); --accum K splits a batch into K
    # accumulated micro-batches (same math, one update per batch).
    accum = a.accum or 1
    micro = dataclasses.replace(w, batch=w.batch // accum)
    probe = probes(platform)
    cfg = jax_config(w, platform)
    recipe = recipes.build(cfg)
    host = [D.make_batch(w, a.dist, i, a.seed) for i in range(w.num_batches)]
    # rows for every distinct ID of the generated data (per feature; the item table shared)
    opts = dict(recipe.engine.options)
    for f in range(len(w.vocab)):
        distinct = np.unique(np.concatenate([b["cat"][f] for b in host])).size
        for name in (f"c{f + 1}", f"c{f + 1}{recipes.BIAS_SUFFIX}"):
            if name in opts:
                opts[name] = dataclasses.replace(opts[name], num_rows=_rows(distinct))
    if w.seq_len:
        distinct = np.unique(np.concatenate([np.concatenate([b["seq"].ravel(), b["target"]]) for b in host])).size
        for name in ("seq", "target_item"):
            opts[name] = dataclasses.replace(opts[name], num_rows=_rows(distinct))
    engine = EmbeddingEngine(opts, seed=cfg.seed)
    slots = 1.0 / w.dim if cfg.train.sparse_optimizer == "rowwise_adagrad" else 2.0
    bytes_per_step = statistics.mean(D.sparse_bytes(w, b, slots) for b in host)
    mask = np.ones(micro.batch, bool)
    hb = [tuple({"features": recipe.features.host_transform(jax_batch(micro, p)["features"]), "mask": mask}
                for p in split_rows(w, b, accum)) for b in host]
    hb = [d if accum > 1 else d[0] for d in hb]
    del host
    first_micro = jax.device_put(hb[0][0] if accum > 1 else hb[0])
    state = init_state(recipe.task, engine, recipe.features, recipe.dense_tx, recipe.sparse_opt, first_micro,
                       cfg.seed)
    cb = {"on": True, "off": False}.get(a.command_buffers, cfg.train.get("command_buffers", True))
    step = make_train_step(recipe.task, engine, recipe.features, recipe.dense_tx, recipe.sparse_opt,
                           accum_steps=accum, command_buffers=cb)
    # S > 1: one call runs S steps (make_multi_step) over S stacked consecutive batches,
    # and a window is window_steps / S calls (the same steps per sync as S = 1).
    s = a.steps_per_call
    if a.window_steps % s:
        raise ValueError(f"--window-steps {a.window_steps} is not a multiple of --steps-per-call {s}")
    if s > 1:
        step = make_multi_step(step, command_buffers=cb)
        hb = [stack_batches([hb[(j + t) % len(hb)] for t in range(s)]) for j in range(0, len(hb), s)]
    dev = jax.block_until_ready(jax.device_put(hb))
    del hb
    t0 = time.perf_counter()
    state, m = step(state, dev[0])
    jax.block_until_ready((state, m))
    first = time.perf_counter() - t0
    skipped = [m["skipped"]]
    i = 1
    for _ in range(-(-a.warmup // s)):
        state, m = step(state, dev[i % len(dev)])
        skipped.append(m["skipped"])
        i += 1
    jax.block_until_ready(state)
    windows = []
    for _ in range(a.windows):
        t0 = time.perf_counter()
        for _ in range(a.window_steps // s):
            state, m = step(state, dev[i % len(dev)])
            skipped.append(m["skipped"])
            i += 1
        jax.block_until_ready((state, m))
        windows.append(time.perf_counter() - t0)
    if any(np.any(x) for x in jax.device_get(skipped)):
        raise RuntimeError(f"{w.name}: a step overflowed its tables (skipped): the row estimate is wrong")
    loss = float(np.asarray(m["loss"]).reshape(-1)[-1])
    if not np.isfinite(loss):
        raise RuntimeError(f"{w.name}: loss is {loss}")
    step_s = statistics.median(windows) / a.window_steps
    dense_s = accum * dense_only_step(recipe, engine, state, first_micro, a)
    peak = None
    if platform == "gpu":
        peak = jax.devices()[0].memory_stats().get("peak_bytes_in_use")
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if a.profile:
        with jax.profiler.trace(a.profile, create_perfetto_trace=True):
            for _ in range(3):
                state, m = step(state, dev[i % len(dev)])
                i += 1
            jax.block_until_ready(state)
    return {"framework": "recis-jax", "jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
            "workload": w.name, "dist": a.dist, "mode": "hashtable", "batch": w.batch, "first_step_s": first,
            "step_s": step_s, "samples_per_s": w.batch / step_s, "window_s": windows, "peak_mem_bytes": peak,
            "dense_step_s": dense_s, "sparse_bytes_per_step": bytes_per_step, "loss": loss,
            "table_rows": {p: int(r) for p, r in engine.num_rows.items()}, "dense_dtype": cfg.model.dtype,
            "accum_steps": accum, "steps_per_call": s, "command_buffers": cb, **probe}


def dense_only_step(recipe, engine, state, dev, a) -> float:
    """Time of the dense model's train step alone (value_and_grad + optax update) on the
    batch's pooled embeddings, given as inputs: the dense share of the full step."""
    import jax
    import optax

    task, feats_engine = recipe.task, recipe.features
    feats = feats_engine.apply(dev["features"]) if feats_engine is not None else dev["features"]
    _, lk = jax.jit(lambda t, f: engine.lookup(t, f, train=False))(state.tables, feats)
    emb = jax.jit(lambda rows, f: engine.pool(rows, lk, f, task.embedding_dtype))(lk.rows, feats)
    labels = task.label_array(feats)[:, 0]

    @jax.jit
    def dense_step(params, opt_state, emb):
        def loss_fn(p):
            logits = task.logits(p, emb, feats)[:, 0]
            return optax.sigmoid_binary_cross_entropy(logits, labels).mean()
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt_state = recipe.dense_tx.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss

    params, opt = state.params, state.opt_state
    out = dense_step(params, opt, emb)
    jax.block_until_ready(out)
    times = []
    for _ in range(a.windows):
        t0 = time.perf_counter()
        for _ in range(a.window_steps):
            out = dense_step(params, opt, emb)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / a.window_steps)
    return statistics.median(times)


# ----------------------------------------------------------------------------- orchestration

def _run_one(cmd: list[str], out: pathlib.Path, timeout: int, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        ok = p.returncode == 0 and out.exists()
        tail = (p.stdout + p.stderr)[-1500:]
    except subprocess.TimeoutExpired as e:
        ok, tail = False, f"timed out after {timeout} s: {str(e.stdout or '')[-500:]}"
    wall = time.perf_counter() - t0
    if not ok:
        print(f"FAILED ({wall:.0f} s): {' '.join(cmd)}\n{tail}", flush=True)
        return {"error": tail, "cmd": " ".join(cmd)}
    r = json.loads(out.read_text())
    r["wall_s"] = wall
    print(f"{r.get('framework')} {r.get('workload')} {r.get('dist')} {r.get('mode')}: "
          f"{r['samples_per_s']:,.0f} samples/s (first step {r['first_step_s']:.1f} s, wall {wall:.0f} s)", flush=True)
    return r


def derive(rows: list[dict]) -> list[dict]:
    """Adds bound / MBU / MFU / ratios per (workload, dist) from the recis-jax row's bytes
    and probes (the same data and machine serve the PyTorch rows)."""
    out = []
    keys = sorted({(r["workload"], r["dist"]) for r in rows if "workload" in r})
    for wname, dist in keys:
        w = D.WORKLOADS[wname]
        group = [r for r in rows if r.get("workload") == wname and r.get("dist") == dist]
        ours = next((r for r in group if r["framework"] == "recis-jax"), None)  # bytes: any of its runs
        # the machine's limits: the best probe of the group's processes (XLA:CPU's copy runs
        # on one thread, so on the CPU torch's probe is the higher one)
        probe = {k: max(r[k] for r in group) for k in ("copy_gbps", "matmul_tflops")}
        if ours is not None:
            bytes_ps = ours["sparse_bytes_per_step"] / w.batch
        else:  # recis-jax failed here: the same bytes from the generated batches
            slots = 1.0 / w.dim if wname.startswith("dcnv2") else 2.0
            bytes_ps = statistics.mean(D.sparse_bytes(w, D.make_batch(w, dist, i), slots)
                                       for i in range(w.num_batches)) / w.batch
        flops_ps = D.dense_flops_per_sample(w)
        bw, peak = probe["copy_gbps"] * 1e9, probe["matmul_tflops"] * 1e12
        bound = 1.0 / max(bytes_ps / bw, flops_ps / peak)
        entry = {"workload": wname, "dist": dist, "batch": w.batch, "bytes_per_sample": bytes_ps,
                 "flops_per_sample": flops_ps, "copy_gbps": probe["copy_gbps"], "matmul_tflops": probe["matmul_tflops"],
                 "bound_samples_per_s": bound, "bound_by": "bandwidth" if bytes_ps / bw > flops_ps / peak else "flops",
                 "runs": {}}
        for r in group:
            if r["framework"] == "recis-jax":
                s = r.get("steps_per_call", 1)
                name = "recis-jax" + (f"-s{s}" if s > 1 else "")
            else:
                name = f"torch-{r['mode']}" + ("-compile" if r.get("compile") else "")
            sps = r["samples_per_s"]
            entry["runs"][name] = {"samples_per_s": sps, "step_ms": 1e3 * r["step_s"],
                                   "first_step_s": r["first_step_s"], "peak_mem_gb": (r.get("peak_mem_bytes") or 0) / 1e9,
                                   "of_bound": sps / bound, "mbu": bytes_ps * sps / bw, "mfu": flops_ps * sps / peak}
            if r["framework"] == "recis-jax":
                entry["runs"][name]["dense_share"] = r["dense_step_s"] / r["step_s"]
        # recis-jax at its best: one step per call, or several (make_multi_step) where run.
        mine = [n for n in entry["runs"] if n.startswith("recis-jax")]
        if mine:
            entry["best_recis-jax"] = best = max(mine, key=lambda n: entry["runs"][n]["samples_per_s"])
            for name, run in entry["runs"].items():
                if not name.startswith("recis-jax"):
                    entry[f"ratio_vs_{name}"] = entry["runs"][best]["samples_per_s"] / run["samples_per_s"]
        # PyTorch at its best: eager or torch.compile, whichever was faster in this run.
        for mode in ("static", "mapped"):
            cands = [n for n in (f"torch-{mode}", f"torch-{mode}-compile") if f"ratio_vs_{n}" in entry]
            if cands:
                best = min(cands, key=lambda n: entry[f"ratio_vs_{n}"])
                entry[f"best_torch-{mode}"] = best
                entry[f"ratio_vs_best_torch-{mode}"] = entry[f"ratio_vs_{best}"]
        out.append(entry)
    return out


def markdown(env: dict, derived: list[dict], failures: list[dict], args) -> str:
    dev = env.get("gpu_name") or env.get("cpu")
    v = env["versions"]
    lines = [f"# End-to-end training throughput: recis-jax vs PyTorch ({dev})", "",
             f"{env['date_utc']}; jax {v.get('jax')}, torch {args.torch_version or v.get('torch')}"
             + (f", driver {env['driver']}" if env.get("driver") else "") + f"; Python {env['python']}. "
             f"`python benchmarks/e2e.py --device {args.device}`. Workloads: benchmarks/e2e_data.py; "
             "method: benchmarks/e2e.py's docstring. torch-static: IDs already in range (no mapping); "
             "torch-mapped: raw 64-bit IDs mapped on the device (torch.unique + sorted keys); recis-jax: raw IDs "
             "through its hashtables. Bound: max(sparse bytes / copy bandwidth, dense FLOPs / matmul peak), both "
             "measured in the same run.", "",
             "| workload | IDs | framework | samples/s | step ms | first step s | peak GB | % of bound | MBU | MFU |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in derived:
        for name, r in e["runs"].items():
            lines.append(f"| {e['workload']} (B {e['batch']:,}) | {e['dist']} | {name} | {r['samples_per_s']:,.0f} | "
                         f"{r['step_ms']:.2f} | {r['first_step_s']:.1f} | {r['peak_mem_gb']:.1f} | "
                         f"{100 * r['of_bound']:.1f}% | {100 * r['mbu']:.1f}% | {100 * r['mfu']:.1f}% |")
    lines += ["", "Ratios of recis-jax at its best (one step per call, or several steps per call where that "
              "ran and was faster, marked s: `train.steps_per_call`, recis-jax-sN rows) to PyTorch at its best "
              "in the run: eager, or torch.compile where that was faster (marked c).", "",
              "| workload | IDs | recis-jax / torch-static | recis-jax / torch-mapped | bound samples/s (by) | "
              "bytes/sample | MFLOP/sample | recis-jax dense share of step |", "|---|---|---:|---:|---:|---:|---:|---:|"]

    def ratio(e, mode):
        r = e.get(f"ratio_vs_best_torch-{mode}")
        if r is None:
            return "-"
        marks = ("s" if e["best_recis-jax"] != "recis-jax" else "") + \
            ("c" if e[f"best_torch-{mode}"].endswith("-compile") else "")
        return f"{r:.2f}x" + (f" {marks}" if marks else "")

    for e in derived:
        lines.append(f"| {e['workload']} | {e['dist']} | {ratio(e, 'static')} | {ratio(e, 'mapped')} | "
                     f"{e['bound_samples_per_s']:,.0f} ({e['bound_by']}) | {e['bytes_per_sample'] / 1e3:,.1f} KB | "
                     f"{e['flops_per_sample'] / 1e6:,.1f} | "
                     f"{100 * e['runs'].get('recis-jax', {}).get('dense_share', float('nan')):.0f}% |")
    if derived:
        e = derived[0]
        lines += ["", f"Limits measured in the same run (best of the processes): copy {e['copy_gbps']:,.0f} GB/s "
                  "(read + write), "
                  f"matmul {e['matmul_tflops']:,.2f} TFLOP/s "
                  f"({'bf16' if args.device == 'gpu' else 'the faster of bf16 and float32'})."]
    if failures:
        lines += ["", "Runs that failed (the JSON has their output):"] + [
            f"- `{f['cmd'].split('e2e.py ')[-1].split(' --result')[0]}`: {_reason(f['error'])}" for f in failures]
    return "\n".join(lines) + "\n"


def _reason(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "Error" in ln or "error" in ln]
    return (lines[-1] if lines else err.splitlines()[-1])[:300]


def chart(derived: list[dict], path: pathlib.Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no chart", flush=True)
        return
    names = ["recis-jax", "torch-static", "torch-mapped"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [f"{e['workload']}\n{e['dist']}" for e in derived]
    x = np.arange(len(derived))
    for k, name in enumerate(names):
        runs = [e["runs"].get(e.get(f"best_{name}", name), {}) for e in derived]  # torch: eager or compiled
        sps = [r.get("samples_per_s", 0) for r in runs]
        frac = [100 * r.get("of_bound", 0) for r in runs]
        label = f"{name} (best of 1 / N steps per call)" if name == "recis-jax" else \
            f"{name} (best of eager / compiled)"
        axes[0].bar(x + (k - 1) * 0.27, sps, 0.27, label=label)
        axes[1].bar(x + (k - 1) * 0.27, frac, 0.27, label=label)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("samples/s (log)")
    axes[1].set_ylabel("% of the physical bound")
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--workloads", default=None, help="default: e2e_data.GPU_WORKLOADS / CPU_WORKLOADS")
    ap.add_argument("--dists", default="uniform,zipf")
    ap.add_argument("--frameworks", default="jax,torch-static,torch-mapped")
    ap.add_argument("--torch-python", default=sys.executable)
    ap.add_argument("--torch-compile", default="", help="workloads whose torch runs also run with --compile")
    ap.add_argument("--no-torch-eager", action="store_true",
                    help="skip the eager torch runs of the --torch-compile workloads (compiled only)")
    ap.add_argument("--multi-step", default="", help="workloads whose recis-jax run also runs with "
                                                     "--window-steps steps per call (make_multi_step)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--window-steps", type=int, default=None)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per process")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--command-buffers", choices=("config", "on", "off"), default="config",
                    help="recis-jax runs: XLA:GPU CUDA graphs of the step (config: the workload config's "
                         "train.command_buffers)")
    ap.add_argument("--merge", default="", help="comma-separated e2e_*.json of earlier runs: re-derive their runs "
                                                "(plus this run's) into one table")
    # one recis-jax run (a child process of the suite)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dist", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--accum", type=int, default=0, help="(one run) micro-batches per step (0: per workload)")
    ap.add_argument("--steps-per-call", type=int, default=1, help="(one run) steps per device call")
    ap.add_argument("--profile", default="", help="(one run) write a jax.profiler trace of 3 steps here")
    a = ap.parse_args()
    gpu = a.device == "gpu"
    a.warmup = a.warmup if a.warmup is not None else (5 if gpu else 2)
    a.windows = a.windows if a.windows is not None else 5
    a.window_steps = a.window_steps if a.window_steps is not None else (5 if gpu else 3)
    if a.one:
        r = run_jax(a)
        pathlib.Path(a.result).write_text(json.dumps(r, indent=2))
        return

    workloads = a.workloads.split(",") if a.workloads else list(D.GPU_WORKLOADS if gpu else D.CPU_WORKLOADS)
    if a.merge:
        workloads = []
    frameworks = a.frameworks.split(",")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="e2e_runs."))
    env = dict(os.environ, JAX_PLATFORMS="cuda" if gpu else "cpu")
    timing = ["--warmup", str(a.warmup), "--windows", str(a.windows), "--window-steps", str(a.window_steps),
              "--seed", str(a.seed)]
    rows = []
    for wname in workloads:
        for dist in a.dists.split(","):
            tag = f"{wname}_{dist}"
            calls = [1, a.window_steps] if wname in a.multi_step.split(",") else [1]
            for s in (calls if "jax" in frameworks else []):
                out = tmp / f"{tag}_jax_s{s}.json"
                cmd = [sys.executable, __file__, "--one", "--device", a.device, "--workload", wname, "--dist", dist,
                       "--result", str(out), "--steps-per-call", str(s), "--command-buffers", a.command_buffers] + timing
                rows.append(_run_one(cmd, out, a.timeout, env))
            for mode in ("static", "mapped"):
                if f"torch-{mode}" not in frameworks:
                    continue
                compiled = wname in a.torch_compile.split(",")
                for comp in (([] if a.no_torch_eager else [False]) + [True] if compiled else [False]):
                    out = tmp / f"{tag}_torch_{mode}{'_compile' if comp else ''}.json"
                    cmd = [a.torch_python, str(TORCH_SCRIPT), "--workload", wname, "--dist", dist, "--mode", mode,
                           "--device", "cuda" if gpu else "cpu", "--out", str(out)] + timing + \
                        (["--compile"] if comp else [])
                    rows.append(_run_one(cmd, out, a.timeout))
    for f in filter(None, a.merge.split(",")):
        rows += [r for r in json.loads(pathlib.Path(f).read_text())["runs"]]
    ok = [r for r in rows if "error" not in r]
    failures = [r for r in rows if "error" in r]
    derived = derive(ok)
    merged = [json.loads(pathlib.Path(f).read_text()) for f in filter(None, a.merge.split(","))]
    info = merged[0]["env"] if merged and not workloads else common.env_info(with_jax=False)
    a.torch_version = next((r.get("torch") for r in ok if r.get("framework") == "torch"), None)
    model = re.search(r"\b([A-Z]\d{2,4})\b", str(info.get("gpu_name")))  # "NVIDIA H200" -> h200
    tag = a.tag or ((model.group(1).lower() if model else "gpu") if gpu else "cpu")
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"e2e_{tag}.json").write_text(json.dumps({"env": info, "args": vars(a), "derived": derived, "runs": rows},
                                                    indent=2, default=str))
    (out / f"e2e_{tag}.md").write_text(markdown(info, derived, failures, a))
    chart(derived, out / f"e2e_{tag}.png", f"End-to-end training, {info.get('gpu_name') or info.get('cpu')}")
    print((out / f"e2e_{tag}.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
