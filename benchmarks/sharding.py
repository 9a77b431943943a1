"""Exchange volume of the row-sharded embedding lookup, with and without local dedup.

    python benchmarks/sharding.py [--out benchmarks/results/sharding_cpu]

Runs on fake CPU devices (8, through XLA_FLAGS) and counts, for one feature, what the
forward all_to_all of `recis_jax.sharding` would move per step for n = 2, 4, 8 shards,
using the library's own functions (`dedup.unique_keys`, `sharding.owner_of`,
`sharding.exchange.plan`) inside `jax.shard_map`:

  dedup    each device dedups its slice of the batch first (what the sharded engine does);
  no dedup each device sends every occurrence to its owner.

Per exchanged lane: forward 8 (id) + 4 (table) + 1 (valid) + 4 (count) bytes, back
4 * dim (row) + 1 (live), and the backward pass sends 4 * dim (gradient) along the same
route: 18 + 8 * dim bytes. Reported per step, summed over devices:
  payload_MB   lanes actually sent (to any owner, self included) x bytes per lane;
  wire_MB      the part that leaves the device (owner != sender);
  padded_MB    what the padded all_to_all moves with the smallest power-of-two bucket
               capacity that does not overflow (n x cap lanes per device);
  max_fill     the fullest bucket (lanes), and the row balance of the owners:
  rows max/mean  live rows per shard after all steps (unique (table, id) per owner).
Batch: B = 4096 bags x 8 IDs (32,768 lookups per step), dim 64, 4 steps; IDs: bounded
Zipf(s) over a 1M vocabulary (continuous inverse CDF; rank -> 64-bit id by a fixed
mix), and uniform for contrast. Bytes, not time: fake CPU devices share 2 cores, so
timings would say nothing about a real interconnect.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import recis_jax  # noqa: E402,F401  (x64)
from benchmarks.common import RESULTS_DIR, env_info, md_table, write_json  # noqa: E402
from recis_jax.embedding.dedup import unique_keys  # noqa: E402
from recis_jax.sharding import AXIS, make_mesh, owner_of  # noqa: E402
from recis_jax.sharding.exchange import plan  # noqa: E402

B, L, DIM, STEPS, VOCAB = 4096, 8, 64, 4, 1_000_000
LANE_BYTES = 18 + 8 * DIM


def ids_for(dist: str, s: float, rng: np.random.Generator) -> np.ndarray:
    """[B * L] int64 IDs of one step."""
    u = rng.random(B * L)
    if dist == "uniform":
        rank = np.floor(u * VOCAB)
    else:  # bounded Zipf(s) over 1..VOCAB, continuous inverse CDF
        a = 1.0 - s
        rank = np.floor(((VOCAB ** a - 1.0) * u + 1.0) ** (1.0 / a)) - 1
    x = rank.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(12345)  # rank -> 64-bit id
    return (x ^ (x >> np.uint64(29))).view(np.int64)


def counts_fn(n: int, dedup: bool):
    """jit(shard_map): per device [1, M] ids -> [1, 4] (sent, off-device, max fill, unique)."""
    def f(ids):
        ids = ids[0]
        t = jnp.zeros(ids.shape, jnp.int32)
        valid = jnp.ones(ids.shape, bool)
        if dedup:
            u = unique_keys(t, ids, valid)
            t, ids, valid = u.tables, u.keys, u.valid
        own = owner_of(t, ids, n)
        r = plan(own, valid, n, ids.shape[0])  # capacity = all lanes: never overflows
        me = jax.lax.axis_index(AXIS)
        out = jnp.stack([jnp.sum(valid), jnp.sum(valid & (own != me)), r.max_fill, jnp.sum(valid)])
        return out.astype(jnp.int64)[None]

    mesh = make_mesh(n)
    return mesh, jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))


def run(dist: str, s: float, n: int, dedup: bool) -> dict:
    rng = np.random.default_rng(7)
    mesh, fn = counts_fn(n, dedup)
    sharding = jax.sharding.NamedSharding(mesh, P(AXIS))
    sent = off = 0
    fill = 0
    seen = set()
    for _ in range(STEPS):
        ids = ids_for(dist, s, rng)
        seen.update(np.unique(ids).tolist())
        c = np.asarray(fn(jax.device_put(ids.reshape(n, -1), sharding)))
        sent, off, fill = sent + int(c[:, 0].sum()), off + int(c[:, 1].sum()), max(fill, int(c[:, 2].max()))
    cap = 1 << max(fill - 1, 0).bit_length()
    keys = np.fromiter(seen, np.int64)
    rows = np.bincount(np.asarray(owner_of(np.zeros(len(keys), np.int32), keys, n)), minlength=n)
    mb = 1e6 * STEPS
    return {"ids": dist if dist == "uniform" else f"zipf({s})", "n": n, "dedup": dedup,
            "lanes_per_step": sent // STEPS, "payload_MB": round(sent * LANE_BYTES / mb, 3),
            "wire_MB": round(off * LANE_BYTES / mb, 3), "max_fill": fill, "cap": cap,
            "padded_MB": round(n * n * cap * LANE_BYTES / 1e6, 3),
            "rows_max_over_mean": round(float(rows.max() / rows.mean()), 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS_DIR / "sharding_cpu"))
    args = ap.parse_args()
    rows = []
    for dist, s in (("zipf", 1.1), ("zipf", 1.3), ("uniform", 0.0)):
        for n in (2, 4, 8):
            for dedup in (False, True):
                rows.append(run(dist, s, n, dedup))
                print(rows[-1], flush=True)
    for r in rows:  # dedup's saving against the same (ids, n) without it
        base = next(x for x in rows if x["ids"] == r["ids"] and x["n"] == r["n"] and not x["dedup"])
        r["payload_vs_no_dedup"] = round(r["payload_MB"] / base["payload_MB"], 3)
    info = env_info()
    result = {"env": info, "settings": {"B": B, "L": L, "dim": DIM, "steps": STEPS, "vocab": VOCAB,
                                        "lane_bytes": LANE_BYTES}, "rows": rows}
    out = pathlib.Path(args.out)
    write_json(out.with_suffix(".json"), result)
    cols = ["ids", "n", "dedup", "lanes_per_step", "payload_MB", "payload_vs_no_dedup", "wire_MB", "max_fill", "cap",
            "padded_MB", "rows_max_over_mean"]
    md = [f"# Sharded lookup: exchange bytes per step (CPU fake devices)\n",
          f"{info['date_utc']}; {info['cpu']} ({info['cpu_count']} cores); jax {info['versions']['jax']}; "
          f"python {info['python']}.\n",
          f"One feature, B = {B} bags x {L} IDs, dim {DIM}, {STEPS} steps, vocabulary {VOCAB:,}; "
          f"{LANE_BYTES} bytes per exchanged lane (ids forward, rows back, gradients back to owners). "
          "MB per step summed over devices. `padded_MB`: the fixed-capacity all_to_all at the "
          "smallest power-of-two bucket that holds the fullest bucket. `rows_max_over_mean`: live "
          "rows per shard after all steps (owner balance). Produced by `python benchmarks/sharding.py`.\n",
          md_table(rows, cols), ""]
    out.with_suffix(".md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
