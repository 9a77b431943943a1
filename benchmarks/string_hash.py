"""Throughput of recis_jax.features.string_hash.hash_strings (host-side, numpy, one core).

    python benchmarks/string_hash.py [--n 1000000] [--repeats 5] [--out benchmarks/results]

Data sets (fixed seed):
  hex8       n Criteo-like categorical values: 8-character lowercase hex strings
  mixed      n random byte strings with lengths uniform in 0..200 (all farmhash length
             classes; ~100 bytes on average)

Implementations, for kind "farm" (farmhash Fingerprint64) and "murmur" (MurmurHash64A):
  numpy, arrow in        hash_strings on a pyarrow array (the Reader hands us arrow)
  numpy, list of str     hash_strings on a Python list (includes the list -> arrow copy)
  python scalar          the plain-Python reference, per string (on the first --scalar-n)
  pyfarmhash per string  Google's C farmhash called per string from Python, on the same
                         Python list (farm only; skipped without `pip install pyfarmhash`)
  C loop (gcc -O2)       MurmurHash64A in C over the arrow buffers via ctypes: the speed
                         limit for one core (murmur only; skipped without gcc)

Every implementation's output is checked against hash_strings on the strings it ran on.
Reported: strings/s and input MB/s (median of --repeats), as JSON + markdown with the
machine and date. numpy runs single-threaded, so the numbers are per core.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from recis_jax.features.string_hash import farmhash64, hash_strings, murmurhash64a  # noqa: E402

_C_MURMUR = r"""
#include <stdint.h>
#include <string.h>
static uint64_t murmur64a(const uint8_t *key, int64_t len, uint64_t seed) {
  const uint64_t m = 0xc6a4a7935bd1e995ULL; const int r = 47;
  uint64_t h = seed ^ ((uint64_t)len * m);
  const uint8_t *end = key + (len / 8) * 8;
  for (; key != end; key += 8) {
    uint64_t k; memcpy(&k, key, 8);
    k *= m; k ^= k >> r; k *= m; h ^= k; h *= m;
  }
  switch (len & 7) {
  case 7: h ^= (uint64_t)key[6] << 48;
  case 6: h ^= (uint64_t)key[5] << 40;
  case 5: h ^= (uint64_t)key[4] << 32;
  case 4: h ^= (uint64_t)key[3] << 24;
  case 3: h ^= (uint64_t)key[2] << 16;
  case 2: h ^= (uint64_t)key[1] << 8;
  case 1: h ^= (uint64_t)key[0]; h *= m;
  }
  h ^= h >> r; h *= m; h ^= h >> r;
  return h;
}
void murmur_all(const uint8_t *data, const int64_t *offsets, int64_t n, uint64_t *out) {
  for (int64_t i = 0; i < n; i++) out[i] = murmur64a(data + offsets[i], offsets[i + 1] - offsets[i], 0);
}
"""


def c_murmur():
    """Compile the C MurmurHash64A loop; return fn(large_binary array) -> int64, or None."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="strhash-"))
    (tmp / "m.c").write_text(_C_MURMUR)
    try:
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp / "m.so"), str(tmp / "m.c")],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    lib = ctypes.CDLL(str(tmp / "m.so"))
    lib.murmur_all.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]

    def run(arr: pa.Array) -> np.ndarray:
        _, off, data = arr.buffers()
        offsets = np.frombuffer(off, np.int64)[arr.offset : arr.offset + len(arr) + 1]
        out = np.empty(len(arr), np.uint64)
        lib.murmur_all(data.address, offsets.ctypes.data, len(arr), out.ctypes.data)
        return out.view(np.int64)

    return run


def datasets(n: int) -> dict[str, pa.Array]:
    rng = np.random.default_rng(0)
    hex8 = pa.array([f"{v:08x}" for v in rng.integers(0, 2**32, n)], pa.large_binary())
    lengths = rng.integers(0, 201, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    data = rng.integers(0, 256, int(offsets[-1]), dtype=np.uint8)
    mixed = pa.LargeBinaryArray.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    return {"hex8": hex8, "mixed 0-200": mixed}


def as_int64(unsigned: list[int]) -> np.ndarray:
    return np.array(unsigned, np.uint64).view(np.int64)


def string_bytes(arr: pa.Array) -> int:
    """Total length of the strings of a large_binary array (slice-aware)."""
    offsets = np.frombuffer(arr.buffers()[1], np.int64)
    return int(offsets[arr.offset + len(arr)] - offsets[arr.offset])


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "pyarrow": pa.__version__, "numpy": np.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="strings per data set")
    ap.add_argument("--scalar-n", type=int, default=20_000, help="subset for the per-string implementations")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = ap.parse_args()

    try:
        import farmhash  # pyfarmhash (optional)
    except ImportError:
        farmhash = None
    c_loop = c_murmur()

    results = []
    for dname, arr in datasets(args.n).items():
        pylist = [v.decode("ascii") for v in arr.to_pylist()] if dname == "hex8" else arr.to_pylist()
        sub = arr.slice(0, args.scalar_n)
        sub_list = sub.to_pylist()
        text = "str" if dname == "hex8" else "bytes"
        for kind in ("farm", "murmur"):
            expected = hash_strings(arr, kind)
            scalar = farmhash64 if kind == "farm" else murmurhash64a
            impls = [
                ("numpy, arrow in", arr, lambda a=arr: hash_strings(a, kind)),
                (f"numpy, list of {text}", arr, lambda: hash_strings(pylist, kind)),
                ("python scalar (reference)", sub, lambda: as_int64([scalar(v) for v in sub_list])),
            ]
            if kind == "farm" and farmhash is not None:
                impls.append(("pyfarmhash per string (C)", arr,
                              lambda: as_int64([farmhash.fingerprint64(v) for v in pylist])))
            if kind == "murmur" and c_loop is not None:
                impls.append(("C loop, gcc -O2 (ctypes)", arr, lambda a=arr: c_loop(a)))
            for name, data, fn in impls:
                got = fn()
                ok = bool(np.array_equal(got, expected[: len(got)]))
                secs = timed(fn, args.repeats)
                nbytes = string_bytes(data)
                row = {"data": dname, "kind": kind, "impl": name, "strings": len(data), "seconds": secs,
                       "strings_per_sec": len(data) / secs, "mb_per_sec": nbytes / secs / 1e6, "matches": ok}
                results.append(row)
                print(f"{dname:12s} {kind:6s} {name:28s} {row['strings_per_sec'] / 1e6:9.2f} M strings/s "
                      f"{row['mb_per_sec']:8.1f} MB/s  {'ok' if ok else 'MISMATCH'}", flush=True)

    env = machine()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "string_hash", "machine": env, "n": args.n, "scalar_n": args.scalar_n,
               "repeats": args.repeats, "results": results}
    (out / "string_hash_cpu.json").write_text(json.dumps(payload, indent=2))
    lines = [f"# String hashing throughput ({env['cpu']}, {env['cores']} cores, numpy on one)", "",
             f"{env['date']}; Python {env['python']}, numpy {env['numpy']}, pyarrow {env['pyarrow']}. "
             f"{args.n:,} strings per data set (the Python scalar reference on the first {args.scalar_n:,}), "
             f"median of {args.repeats}. hex8: Criteo-like 8-character hex; mixed: random bytes, length 0-200.", "",
             "| data | kind | implementation | M strings/s | MB/s | matches |", "|---|---|---|---:|---:|---|"]
    lines += [f"| {r['data']} | {r['kind']} | {r['impl']} | {r['strings_per_sec'] / 1e6:.2f} | "
              f"{r['mb_per_sec']:.1f} | {'yes' if r['matches'] else 'NO'} |" for r in results]
    (out / "string_hash_cpu.md").write_text("\n".join(lines) + "\n")
    if not all(r["matches"] for r in results):
        sys.exit("some implementation disagrees with hash_strings")


if __name__ == "__main__":
    main()
