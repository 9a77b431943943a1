"""Measured all_to_all bandwidth over the mesh (for the sharding cost model).

    python benchmarks/all_to_all_bw.py [--mib 64,256]

Each device sends `mib` MiB split evenly over all devices (lax.all_to_all in shard_map);
algorithm bandwidth = bytes each device sends to others / time. Prints one line per size.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", default="16,64,256")
    a = ap.parse_args()
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("data",))
    f = jax.jit(jax.shard_map(lambda x: jax.lax.all_to_all(x, "data", 0, 0, tiled=True), mesh=mesh,
                              in_specs=P("data"), out_specs=P("data")))
    for mib in (int(m) for m in a.mib.split(",")):
        per = mib * 2**20 // 4
        x = jax.device_put(jnp.ones((n * per,), jnp.float32), NamedSharding(mesh, P("data")))
        f(x).block_until_ready()
        ts = []
        for _ in range(10):
            t0 = time.perf_counter()
            f(x).block_until_ready()
            ts.append(time.perf_counter() - t0)
        t = statistics.median(ts)
        off = mib * 2**20 * (n - 1) / n
        print(f"all_to_all devices={n} per_device_mib={mib} ms={t * 1e3:.3f} "
              f"algbw_gbps={off / t / 1e9:.1f}", flush=True)


if __name__ == "__main__":
    main()
