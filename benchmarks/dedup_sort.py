"""Dedup sort on the device: one two-key (table, id) sort vs the two one-key unsigned
sorts `recis_jax.sorting.sort_by_table_and_key` uses (CUB radix sorts on the GPU), and
the whole `unique_keys`, at DeepFM (106k lanes), 1M and DLRM-dcnv2 (14M lanes) sizes.

    python benchmarks/dedup_sort.py        (prints one line per size; mean of 10 calls)
"""

import sys
import time
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import recis_jax  # noqa: E402,F401  (x64)
from recis_jax.embedding.dedup import unique_keys  # noqa: E402
from recis_jax.sorting import sort_by_table_and_key  # noqa: E402


def bench(f, *a, reps=10):
    r = f(*a)
    jax.block_until_ready(r)
    t = time.perf_counter()
    for _ in range(reps):
        r = f(*a)
    jax.block_until_ready(r)
    return (time.perf_counter() - t) / reps * 1e3, r


def main():
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    for n in (106_496, 1 << 20, 14_024_704):
        rng = np.random.default_rng(0)
        keys = jnp.asarray(rng.integers(-2**62, 2**62, n) % (4 << 20) * 7919 - 123456789)
        tables = jnp.asarray(rng.integers(0, 26, n).astype(np.int32))
        valid = jnp.asarray(rng.random(n) < 0.98)
        lane = jnp.arange(n, dtype=jnp.int32)
        t1, r1 = bench(jax.jit(lambda t, k: jax.lax.sort((t, k, lane), num_keys=2, is_stable=True)), tables, keys)
        t2, r2 = bench(jax.jit(sort_by_table_and_key), tables, keys)
        same = all(bool(jnp.array_equal(a, b)) for a, b in zip(r1, r2))
        t3, _ = bench(jax.jit(unique_keys), tables, keys, valid)
        print(f"sort n={n:>10,}: two-key {t1:8.3f} ms  two-pass {t2:8.3f} ms  same={same}  unique_keys {t3:8.3f} ms",
              flush=True)


if __name__ == "__main__":
    main()
