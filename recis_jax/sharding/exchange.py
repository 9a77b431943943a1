"""Fixed-capacity bucketed exchange between devices (inside `jax.shard_map`).

`ragged_all_to_all` is not implemented on CPU, so the exchange is padded: each device
puts the lanes it sends to shard j into bucket j of a send buffer [n, cap, ...] and one
`jax.lax.all_to_all` swaps buckets, so that afterwards bucket j holds what device j
sent. A lane that does not fit its bucket is never dropped silently: `Route.overflow`
says so, and the caller (the sharded engine) then sends nothing and reports it, so the
step can be rerun with a larger capacity.

Lanes keep their order inside a bucket (a stable sort by owner), so received lanes
arrive in a fixed order: (source device, source lane), which makes the reductions
downstream deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from recis_jax.sharding.mesh import AXIS


class Route(NamedTuple):
    """Where each of N local lanes goes in the [num_shards, capacity] send buffer.

    slot int32 [N]: flat index owner * capacity + position, or num_shards * capacity +
      lane (out of range, distinct per lane, so scatters may promise unique indices: not
      sent) for invalid lanes and lanes past their bucket's end;
    overflow bool []: a valid lane did not fit (this device only);
    max_fill int32 []: the largest number of lanes any bucket wanted.
    """

    slot: jax.Array
    overflow: jax.Array
    max_fill: jax.Array


def plan(owner: jax.Array, valid: jax.Array, num_shards: int, capacity: int) -> Route:
    """Buckets lanes (owner int32 [N] in [0, num_shards), valid bool [N]) by owner."""
    n = owner.shape[0]
    lane = jnp.arange(n, dtype=jnp.int32)
    key = jnp.where(valid, owner, num_shards)  # invalid lanes sort last, in their own bucket
    # Stable one-key sort of unsigned keys: a CUB radix sort on the GPU (two keys are not).
    s_key, s_lane = jax.lax.sort((key.astype(jnp.uint32), lane), num_keys=1, is_stable=True)
    s_key = s_key.astype(jnp.int32)
    fill = jnp.zeros(num_shards + 1, jnp.int32).at[key].add(1)
    start = jnp.cumsum(fill) - fill
    pos = jnp.zeros(n, jnp.int32).at[s_lane].set(lane - start[s_key])
    fits = valid & (pos < capacity)
    slot = jnp.where(fits, owner * capacity + pos, num_shards * capacity + lane)
    return Route(slot, jnp.any(valid & ~fits), jnp.max(fill[:num_shards]))


def plan_from_partition(owner: jax.Array, rank: jax.Array, counts: jax.Array, valid: jax.Array,
                        num_shards: int, capacity: int) -> Route:
    """`plan` from a precomputed partition (pallas_kernels.ids_partition: owner, each
    lane's rank inside its owner's group, per-owner counts), the same Route."""
    lane = jnp.arange(owner.shape[0], dtype=jnp.int32)
    fits = valid & (rank < capacity)
    slot = jnp.where(fits, owner * capacity + rank, num_shards * capacity + lane)
    return Route(slot, jnp.any(valid & ~fits), jnp.max(counts[:num_shards]).astype(jnp.int32))


def mask(route: Route, keep: jax.Array, num_shards: int, capacity: int) -> Route:
    """The route with lanes where keep [N] (or a scalar) is False not sent."""
    lane = jnp.arange(route.slot.shape[0], dtype=jnp.int32)
    return route._replace(slot=jnp.where(keep, route.slot, num_shards * capacity + lane))


def send(route: Route, x: jax.Array, num_shards: int, capacity: int) -> jax.Array:
    """Scatters lanes x [N, ...] into a send buffer [num_shards, capacity, ...]
    (unused positions zero / False)."""
    buf = jnp.zeros((num_shards * capacity,) + x.shape[1:], x.dtype)
    buf = buf.at[route.slot].set(x, mode="drop", unique_indices=True)
    return buf.reshape((num_shards, capacity) + x.shape[1:])


def receive(route: Route, buf: jax.Array) -> jax.Array:
    """Inverse of `send`: lanes [N, ...] read back from buffer [num_shards, capacity, ...]
    at their route slots (zero / False for lanes not sent)."""
    m = buf.shape[0] * buf.shape[1]
    flat = buf.reshape((m,) + buf.shape[2:])
    sent = route.slot < m
    x = flat[jnp.where(sent, route.slot, 0)]
    return jnp.where(sent.reshape(sent.shape + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def all_to_all(buf: jax.Array, axis_name: str = AXIS) -> jax.Array:
    """Swaps buckets: out[j] = the bucket device j sent to this device. buf [n, cap, ...]."""
    return jax.lax.all_to_all(buf, axis_name, 0, 0, tiled=True)
