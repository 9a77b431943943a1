"""Read throughput of recis_jax.io.Reader against a plain single-threaded pyarrow read.

    python benchmarks/io.py [--rows-per-file 50000] [--num-files 8] [--out benchmarks/results]

Data: the built-in synthetic Criteo-like dataset (label, 13 dense, 26 list<int64>),
generated once per format into a cache directory. Each configuration reads one whole
epoch into batches of 4096 rows; the baseline reads the same files with
`use_threads=False` and converts the same columns to numpy arrays + offsets (what a
training loop needs), so both do the same work. Reported: rows/s and on-disk MB/s
(median of --repeats runs), written as JSON + markdown with machine, versions and date.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from common import env_info  # noqa: E402  (benchmarks/ is the script dir)
from recis_jax.io import synthetic  # noqa: E402
from recis_jax.io.columns import FixedLenFeature, VarLenFeature  # noqa: E402
from recis_jax.io.files import list_files  # noqa: E402
from recis_jax.io.reader import Reader  # noqa: E402

FEATURES = ([FixedLenFeature("label")] + [FixedLenFeature(f"i{i}") for i in range(1, 14)]
            + [VarLenFeature(f"c{i}") for i in range(1, 27)])
BATCH = 4096


def plain_pyarrow(paths: list[str], fmt: str) -> int:
    """Single-threaded read + conversion of every column to numpy."""
    rows = 0
    for p in paths:
        t = pq.read_table(p, use_threads=False) if fmt == "parquet" else orc.ORCFile(p).read()
        for name in t.column_names:
            col = t.column(name).combine_chunks()
            if pa.types.is_list(col.type):
                np.asarray(col.offsets)
                col.flatten().to_numpy()
            else:
                col.to_numpy(zero_copy_only=False)
        rows += t.num_rows
    return rows


def ours(paths: list[str], threads: int) -> int:
    r = Reader(paths, FEATURES, BATCH, shard_index=0, shard_count=1, num_threads=threads, prefetch=8)
    return sum(b.num_rows for b in r)


def timed(fn, repeats: int) -> tuple[float, int]:
    times, rows = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        rows = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-files", type=int, default=8)
    ap.add_argument("--rows-per-file", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="1,2,4")
    ap.add_argument("--cache", default="/tmp/recis-jax-bench-io")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = ap.parse_args()

    results = []
    for fmt in ("parquet", "orc"):
        data = pathlib.Path(args.cache) / f"{fmt}-{args.num_files}x{args.rows_per_file}"
        if not (data / "meta.json").exists():
            synthetic.generate(str(data), num_files=args.num_files, rows_per_file=args.rows_per_file,
                               format=fmt, seed=0, overwrite=True)
        paths = list_files(str(data), fmt)
        nbytes = sum(os.path.getsize(p) for p in paths)
        configs = [("pyarrow, 1 thread (baseline)", lambda: plain_pyarrow(paths, fmt))]
        configs += [(f"recis_jax Reader, {t} threads", lambda t=t: ours(paths, t))
                    for t in map(int, args.threads.split(","))]
        base = None
        for name, fn in configs:
            fn()  # warm the page cache and imports
            secs, rows = timed(fn, args.repeats)
            rps = rows / secs
            base = base or rps
            results.append({"format": fmt, "config": name, "rows": rows, "seconds": secs,
                            "rows_per_sec": rps, "file_mb_per_sec": nbytes / secs / 1e6,
                            "vs_baseline": rps / base})
            print(f"{fmt:8s} {name:32s} {rps:12,.0f} rows/s {nbytes / secs / 1e6:8.1f} MB/s  x{rps / base:.2f}")

    env = env_info(with_jax=False)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "io", "machine": env, "batch_size": BATCH, "num_files": args.num_files,
               "rows_per_file": args.rows_per_file, "results": results}
    (out / "io_cpu.json").write_text(json.dumps(payload, indent=2))
    v = env["versions"]
    lines = [f"# IO read throughput ({env['cpu']}, {env['cpu_count']} cores)", "",
             f"{env['date_utc']}; Python {env['python']}, pyarrow {v['pyarrow']}, numpy {env['numpy']}, "
             f"load average {os.getloadavg()[0]:.2f}. {args.num_files} files x {args.rows_per_file} rows of synthetic Criteo-like "
             f"data (label, 13 dense, 26 list<int64>), batches of {BATCH}, median of {args.repeats}.", "",
             "| format | reader | rows/s | on-disk MB/s | vs baseline |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['format']} | {r['config']} | {r['rows_per_sec']:,.0f} | {r['file_mb_per_sec']:.1f} | "
              f"{r['vs_baseline']:.2f} |" for r in results]
    (out / "io_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
