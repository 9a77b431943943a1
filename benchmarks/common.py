"""Timing and environment-recording helpers shared by the benchmarks.

Framework-free at import time (no jax, no torch), so that a torch-only benchmark process
can use it too: the project runs one framework per process (JAX preallocates most of the
GPU memory). Import-time cost is numpy only.

Timing method (see /work/.library/device/METHOD.md): warm up first (compilation, autotune),
then for each repeat enqueue `inner` calls back to back and synchronize once, so launch
and dispatch latency overlap the device work; per-op time = elapsed / (inner * ops per
call). Report the median over repeats. Inputs rotate over several buffers bigger than L2
together, so repeated calls do not measure the cache.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import pathlib
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from importlib import metadata
from typing import Any, Callable, Iterable, Sequence

import numpy as np

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- data

def bucketize_data(size: int, n: int, rotate: int, seed: int = 0):
    """Benchmark inputs, identical in every process: `rotate` float32 vectors of `size`
    standard normals (no NaN) and n sorted standard-normal boundaries."""
    rng = np.random.default_rng(seed * 1_000_003 + n)
    b = np.sort(rng.standard_normal(n).astype(np.float32))
    xs = [rng.standard_normal(size, dtype=np.float32) for _ in range(rotate)]
    return xs, b


# ----------------------------------------------------------------------------- timing

def summarize(samples: Sequence[float]) -> dict:
    s = sorted(samples)
    return {
        "median_s": statistics.median(s),
        "min_s": s[0],
        "max_s": s[-1],
        "repeats": len(s),
    }


def time_calls(call: Callable[[], Any], sync: Callable[[Any], None], *, ops_per_call: int = 1,
               warmup: int = 3, repeats: int = 15, inner: int = 10) -> dict:
    """Host-clock timing of device work with one sync per `inner` calls.

    `call()` enqueues work and returns something `sync` waits on; all calls go to one
    stream, so waiting on the last output waits for all of them. Returns `summarize` of
    the per-op seconds plus the settings used.
    """
    for _ in range(warmup):
        sync(call())
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = call()
        sync(out)
        samples.append((time.perf_counter() - t0) / (inner * ops_per_call))
        del out
    res = summarize(samples)
    res.update(inner=inner, ops_per_call=ops_per_call, warmup=warmup)
    return res


def jax_sync(out) -> None:
    import jax  # noqa: PLC0415 - keep this module framework-free at import

    jax.block_until_ready(out)


def jax_device_time(call: Callable[[], Any], *, ops_per_call: int = 1, calls: int = 5,
                    warmup: int = 2, plane_prefix: str = "/device:GPU",
                    line_filter: str = "stream") -> dict:
    """GPU time per op from a JAX profiler (CUPTI) trace, independent of host jitter.

    Traces `calls` calls after warm-up and reads the kernels on the GPU plane's stream
    lines: `busy_us_per_op` is the union of kernel intervals (all kernels an op
    launches, e.g. a small table op next to the main kernel) over the number of ops;
    `kernels` lists each kernel name with its count and median duration. On a machine
    without a GPU plane returns {"error": ...}.
    """
    import glob  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    import jax  # noqa: PLC0415

    for _ in range(warmup):
        jax.block_until_ready(call())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            out = None
            for _ in range(calls):
                out = call()
            jax.block_until_ready(out)
            del out
        files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        if not files:
            return {"error": "no xplane file"}
        pd = jax.profiler.ProfileData.from_file(files[0])
        lines = [line for plane in pd.planes if plane.name.startswith(plane_prefix)
                 for line in plane.lines]
        names = [line.name for line in lines]
        chosen = [ln for ln in lines if line_filter in ln.name.lower()]
        if not chosen:  # unknown line naming: every line but XLA's derived summaries
            chosen = [ln for ln in lines
                      if not any(w in ln.name.lower() for w in ("xla", "module", "step"))]
        intervals, per_name = [], {}
        for line in chosen:
            for ev in line.events:
                s, dur = float(ev.start_ns), float(ev.duration_ns)
                intervals.append((s, s + dur))
                per_name.setdefault(ev.name, []).append(dur)
    if not intervals:
        return {"error": f"no GPU kernels in the trace; lines: {names[:10]}"}
    intervals.sort()
    busy, cur_s, cur_e = 0.0, *intervals[0]
    for s, e in intervals[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    ops = calls * ops_per_call
    kernels = {k[:80]: {"count": len(v), "median_us": round(statistics.median(v) / 1e3, 2)}
               for k, v in sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:8]}
    return {"busy_us_per_op": round(busy / ops / 1e3, 2), "ops": ops, "kernels": kernels,
            "lines": [ln.name for ln in chosen][:6]}


def bandwidth_row(name: str, timing: dict, bytes_moved: int, copy_gbps: float | None,
                  best_gbps: float | None = None, **extra) -> dict:
    """One result row: time (us, median), bytes moved, GB/s and fraction of copy."""
    t = timing["median_s"]
    gbps = bytes_moved / t / 1e9
    row = {"impl": name, **extra,
           "time_us": round(t * 1e6, 2),
           "min_us": round(timing["min_s"] * 1e6, 2),
           "max_us": round(timing["max_s"] * 1e6, 2),
           "bytes": int(bytes_moved),
           "GBps": round(gbps, 1)}
    if copy_gbps:
        row["frac_copy"] = round(gbps / copy_gbps, 3)
    if best_gbps:
        row["frac_best"] = round(gbps / best_gbps, 3)
    return row


# ----------------------------------------------------------------------------- environment

def _run(cmd: Sequence[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def env_info(with_jax: bool = True) -> dict:
    """Machine, versions and date. Reads package versions from metadata (importing torch
    into a JAX process would break the one-framework-per-process rule)."""
    info: dict[str, Any] = {
        "date_utc": _run(["date", "-u"]) or _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "versions": {d: _version(d) for d in (
            "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
            "torch", "triton", "pyarrow")},
    }
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                "clocks.max.mem", "--format=csv,noheader"])
    if smi:
        info["nvidia_smi"] = smi.splitlines()
        info["driver"] = smi.splitlines()[0].split(",")[1].strip()
        info["gpu_name"] = smi.splitlines()[0].split(",")[0].strip()
    if with_jax:
        import jax  # noqa: PLC0415

        dev = jax.devices()[0]
        info["jax_backend"] = jax.default_backend()
        info["jax_device"] = f"{dev.platform}:{dev.device_kind}"
        info["jax_device_count"] = jax.device_count()
    return info


# ----------------------------------------------------------------------------- data

def vocab_key(idx: np.ndarray) -> np.ndarray:
    """int64 ID of vocabulary index idx: the splitmix64 finalizer of (idx + 1), a
    bijection of uint64, so distinct indices give distinct 64-bit IDs (shared by the JAX
    and PyTorch sides of benchmarks/embedding.py)."""
    x = np.asarray(idx).astype(np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x.view(np.int64)


# ----------------------------------------------------------------------------- contention

def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal


def _self_jiffies() -> int:
    with open("/proc/self/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])  # utime + stime, all threads of this process


class CpuMonitor:
    """CPU used by *other* processes while this one runs (in cores): the machine's busy
    time minus ours. The 2 cores are shared with other people's jobs; a timing taken
    while others used a sizeable part of a core is retried."""

    def __init__(self):
        self.t, self.busy, self.me = time.perf_counter(), _busy_jiffies(), _self_jiffies()

    def other_cores(self) -> float:
        dt = time.perf_counter() - self.t
        other = (_busy_jiffies() - self.busy) - (_self_jiffies() - self.me)
        return max(0.0, other / os.sysconf("SC_CLK_TCK") / max(dt, 1e-6))


def wait_quiet(threshold: float, timeout: float) -> float:
    """Waits (idle, 1 s samples) until other processes use < threshold cores; returns the
    seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        m = CpuMonitor()
        time.sleep(1.0)
        if m.other_cores() < threshold:
            break
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- output

def md_table(rows: Iterable[dict], columns: Sequence[str]) -> str:
    rows = list(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c))
                                       for c in columns) + " |")
    return "\n".join(lines)


def write_json(path: pathlib.Path | str, obj: Any) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)
