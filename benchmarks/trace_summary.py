"""Summarises a jax.profiler trace: device time per kernel and per source line of the step.

    python benchmarks/trace_summary.py TRACE_DIR [--hlo HLO_DUMP_DIR] [--steps 3] [--top 25] [--json F]

TRACE_DIR: the directory given to `jax.profiler.trace(..., create_perfetto_trace=True)`
(its perfetto_trace.json.gz). HLO_DUMP_DIR: `XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text`
of the same process; with it every kernel is attributed to the JAX source line of its
HLO instruction (the `metadata={source_file, source_line}` XLA keeps), which says which
part of the step (hashtable, dedup, pooling, model, optimizer) the time goes to.

Device time is the sum of kernel durations on the GPU streams (on the CPU: of the XLA
worker threads' op events), divided by --steps: per-step milliseconds, and the share of
all device time. Kernels overlap only across streams, so shares are of busy time.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}")
_META = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\d+)')


def load_events(trace_dir: pathlib.Path) -> list[dict]:
    """Kernel / XLA op events ('X' phase) of the device streams (GPU) or XLA threads (CPU)."""
    files = sorted(trace_dir.rglob("perfetto_trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"{trace_dir}: no perfetto_trace.json.gz (trace with create_perfetto_trace=True)")
    data = json.load(gzip.open(files[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    pname, tname = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            pname[e["pid"]] = e["args"]["name"]
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            tname[(e["pid"], e["tid"])] = e["args"]["name"]
    gpu_pids = {p for p, n in pname.items() if "GPU" in n or "/device:" in n}
    out = []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if gpu_pids:
            if e["pid"] in gpu_pids and "Stream" in tname.get((e["pid"], e.get("tid")), "Stream"):
                out.append(e)
        elif ((e.get("args") or {}).get("hlo_op") or "XLAEigen" in tname.get((e["pid"], e.get("tid")), "")) \
                and not re.match(r"(ThunkExecutor|while|conditional|call)\b", e["name"]):
            out.append(e)  # CPU: leaf ops only (executor, loop and call events enclose others)
    return out


def load_hlo_sources(hlo_dir: pathlib.Path | None, depth: int = 3) -> dict[str, str]:
    """HLO instruction name -> 'leaf.py:line < caller.py:line < ...' (the JAX call stack XLA
    keeps as `stack_frame_id` metadata, innermost first, `depth` frames) from the
    after-optimizations dumps."""
    if hlo_dir is None:
        return {}
    src = {}
    for f in sorted(hlo_dir.glob("*after_optimizations.txt")):
        text = f.read_text(errors="replace").splitlines()
        tables, section = {}, None
        for line in text:
            if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                section = tables.setdefault(line, {})
                continue
            if section is not None:
                m = re.match(r"^(\d+) (.*)$", line)
                if m:
                    section[int(m.group(1))] = m.group(2)
                    continue
                section = None
            m = _INSTR.match(line)
            if not m:
                continue
            meta = dict(_META.findall(m.group(2)))
            frame = int(meta.get("stack_frame_id", 0))
            chain = []
            while frame and len(chain) < depth:
                fr = dict(_META.findall(tables.get("StackFrames", {}).get(frame, "")))
                loc = dict(_META.findall(tables.get("FileLocations", {}).get(int(fr.get("file_location_id", 0)), "")))
                name = tables.get("FileNames", {}).get(int(loc.get("file_name_id", 0)), "?").strip('"')
                chain.append(f"{pathlib.Path(name).name}:{loc.get('line', '?')}")
                frame = int(fr.get("parent_frame_id", 1)) - 1  # printed 1-based; 0: outermost
            if chain:
                src.setdefault(m.group(1), " < ".join(chain))
                src.setdefault(m.group(1).replace(".", "_"), " < ".join(chain))  # kernel names
    return src


def summarise(events: list[dict], sources: dict[str, str], steps: int) -> dict:
    by_kernel, by_source = collections.Counter(), collections.Counter()
    for e in events:
        args = e.get("args") or {}
        op = args.get("hlo_op") or e["name"]
        if op == "command_buffer":  # a CUDA graph of kernels: the kernel is named after its HLO op
            op = e["name"]
        by_kernel[re.sub(r"[._]\d+$", "", op) + " | " + e["name"][:60]] += e["dur"]
        by_source[sources.get(op, "(no source: " + re.sub(r"[._]\d+$", "", op) + ")")] += e["dur"]
    total = sum(by_kernel.values())
    per = lambda c: [(k, v / steps / 1e3, v / total) for k, v in c.most_common()]  # noqa: E731
    return {"steps": steps, "device_ms_per_step": total / steps / 1e3, "kernels_per_step": len(events) / steps,
            "by_kernel": per(by_kernel), "by_source": per(by_source)}


def markdown(s: dict, top: int) -> str:
    lines = [f"device busy {s['device_ms_per_step']:.2f} ms/step, {s['kernels_per_step']:.0f} kernels/step", ""]
    for title, key in (("source line (HLO metadata)", "by_source"), ("kernel", "by_kernel")):
        lines += [f"| {title} | ms/step | share |", "|---|---:|---:|"]
        lines += [f"| `{k}` | {ms:.3f} | {sh:.1%} |" for k, ms, sh in s[key][:top]]
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace_dir")
    ap.add_argument("--hlo", default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    s = summarise(load_events(pathlib.Path(a.trace_dir)), load_hlo_sources(a.hlo and pathlib.Path(a.hlo)), a.steps)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(s, indent=1))
    print(markdown(s, a.top))


if __name__ == "__main__":
    main()
