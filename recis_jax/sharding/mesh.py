"""The device mesh, key ownership, and putting per-device data on the mesh.

One mesh axis, "data": the batch is split over it (data parallel) and every embedding
table is row-sharded over it, each device owning the keys whose owner hash lands on it.
Every array that lives "per device" (table state, batch) carries a leading axis of size
n = mesh size, sharded over "data"; inside `jax.shard_map` a device sees its own slice
with a leading axis of size 1 (`squeeze` / `unsqueeze` convert).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from recis_jax.ragged import Ragged, capacity_bucket, slice_rows

AXIS = "data"

# Owner hash: murmur3's fmix64 of (id + table * salt). It differs from the hashtable's
# slot hash (splitmix64 of id ^ table * golden) so that, inside one shard, the keys it
# owns are still spread evenly over the slots (owner and slot position independent).
_OWNER_SALT = np.uint64(0xD6E8FEB86659FD93)
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)


def make_mesh(num_devices: int | None = None, devices: Sequence | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh ("data",) over `devices` (default: the first `num_devices` of
    `jax.devices()`, all of them by default; in a multi-process run all processes'
    devices)."""
    if devices is None:
        have = jax.devices()
        if num_devices is not None and num_devices > len(have):
            raise ValueError(f"make_mesh: {num_devices} devices asked, {len(have)} available")
        devices = have[: num_devices or len(have)]
    return jax.make_mesh((len(devices),), (AXIS,), devices=list(devices))


def owner_of(tables: jax.Array, keys: jax.Array, num_shards: int) -> jax.Array:
    """int32 [N] owning shard of each key (tables [N] int32, keys [N] int64): a well
    mixed 64-bit hash of the exact (table, id) pair, mod num_shards. Works on numpy
    input too (returns a jax array)."""
    x = jax.lax.bitcast_convert_type(jnp.asarray(keys, jnp.int64), jnp.uint64)
    x = x + jnp.asarray(tables).astype(jnp.uint64) * _OWNER_SALT
    x = (x ^ (x >> 33)) * _M1
    x = (x ^ (x >> 33)) * _M2
    x = x ^ (x >> 33)
    return (x % np.uint64(num_shards)).astype(jnp.int32)


def squeeze(tree: Any) -> Any:
    """Drops the leading per-device axis (size 1 inside shard_map) of every leaf."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def unsqueeze(tree: Any) -> Any:
    """Adds the leading per-device axis back (for shard_map outputs with P("data"))."""
    return jax.tree_util.tree_map(lambda x: x[None], tree)


def split_features(features: dict[str, Ragged], num_shards: int, capacity: int | dict[str, int] | None = None
                   ) -> list[dict[str, Ragged]]:
    """Host: splits a global batch of numpy Raggeds ([B] rows each, B divisible by
    num_shards) into num_shards contiguous row blocks, each padded to one static values
    capacity per feature (default: the largest block's live count, rounded up with
    `ragged.capacity_bucket`; pass it explicitly when processes must agree)."""
    out = [dict() for _ in range(num_shards)]
    for name, r in features.items():
        b = r.nrows
        if b % num_shards:
            raise ValueError(f"feature {name!r}: batch {b} is not divisible by {num_shards} shards")
        per = b // num_shards
        parts = [slice_rows(r, i * per, (i + 1) * per) for i in range(num_shards)]
        cap = capacity.get(name) if isinstance(capacity, dict) else capacity
        if cap is None:
            cap = capacity_bucket(max(int(p.row_splits[-1]) for p in parts))
        for i, p in enumerate(parts):
            p = Ragged(p.values, p.row_splits.astype(np.int64), p.weights).pad(cap)
            out[i][name] = p
    return out


def stack(per_device: Sequence[Any]) -> Any:
    """Host: stacks per-device numpy pytrees along a new leading axis."""
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_device)


def put(mesh: jax.sharding.Mesh, per_device: Sequence[Any]) -> Any:
    """Puts one pytree per mesh device (all processes' devices, single process) on the
    mesh: leaves [n, ...] sharded over "data"."""
    if len(per_device) != mesh.size:
        raise ValueError(f"need one pytree per device: got {len(per_device)} for a mesh of {mesh.size}")
    return jax.device_put(stack(per_device), NamedSharding(mesh, P(AXIS)))


def put_process_local(mesh: jax.sharding.Mesh, local_per_device: Sequence[Any]) -> Any:
    """Multi-process: each process passes one pytree per *local* device (in mesh order);
    returns global arrays [n, ...] sharded over "data"."""
    sharding = NamedSharding(mesh, P(AXIS))
    local = stack(local_per_device)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, x, (mesh.size,) + x.shape[1:]), local)


def local_shards(x: jax.Array) -> dict[int, np.ndarray]:
    """{mesh position: host copy} of the shards of a [n, ...] array that this process
    holds (all of them in a single-process run)."""
    return {s.index[0].start or 0: np.asarray(s.data)[0] for s in x.addressable_shards}
