"""Partition IDs by owning shard: owner hash, per-owner counts, a stable grouping permutation.

    p = ids_partition(tables, keys, valid, num_shards)
    p.owner  [N] int32   owner of each lane, `recis_jax.sharding.mesh.owner_of` (murmur3
                         fmix64 of id + table * salt, mod num_shards); num_shards for an
                         invalid lane
    p.counts [num_shards] int32  valid lanes per owner
    p.starts [num_shards + 2] int32  exclusive offsets of the groups (bucket num_shards
                         holds the invalid lanes; starts[-1] = N)
    p.perm   [N] int32   lanes grouped by owner, lane order kept inside a group, invalid
                         lanes last: the lanes of owner k are perm[starts[k]:starts[k+1]]
    p.rank   [N] int32   each lane's position inside its group (perm[starts[owner] +
                         rank] = lane): the bucket slot `sharding.exchange.plan` computes

`ids_partition` dispatches (pallas_kernels.dispatch): Pallas-Triton on GPU,
`ids_partition_reference` (XLA: hash, stable sort by owner, scatter) elsewhere.

Kernel design (jax 0.11.2, Pallas-Triton): a stable counting sort, with the IDs read
once. Kernel 1 (one program per block of T lanes) hashes its keys, stores the owners and
the block's histogram over the NB = next_pow2(num_shards + 1) buckets (a [T, 16] one-hot
summed over lanes, 16 buckets at a time). XLA turns the [blocks, NB] histograms into
each block's first slot per bucket (cumsums over a few thousand numbers). Kernel 2
re-reads the owners (4 B/lane), ranks each lane inside its block and bucket with a
cumsum of the one-hot over lanes, and scatters lane ids to their slots. No atomics
(the integer atomic_add of 0.11.2 is lowered as a float add), so the result is exact and
deterministic. Per lane: 8 + 4 + 1 bytes read and 4 written by kernel 1; 4 read and
8 written (perm, rank) by kernel 2.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import dispatch

# recis_jax.sharding.mesh's constants as int64 bit patterns: the hash runs in int64
# arithmetic (multiplication wraps identically; shifts are logical), because Pallas-Triton
# on 0.11.2 cannot materialise a uint64 constant >= 2**63 (MLIR IntegerAttr bad_cast).
# A test checks owner == mesh.owner_of.
def _i64(v: int) -> np.int64:
    return np.int64(v - (1 << 64) if v >= 1 << 63 else v)


_OWNER_SALT = _i64(0xD6E8FEB86659FD93)
_M1 = _i64(0xFF51AFD7ED558CCD)
_M2 = _i64(0xC4CEB9FE1A85EC53)
_S33 = np.int64(33)
_ONE = np.int64(1)
_CHUNK = 16  # buckets per one-hot pass


class Partition(NamedTuple):
    owner: jax.Array
    counts: jax.Array
    starts: jax.Array
    perm: jax.Array
    rank: jax.Array


class Config(NamedTuple):
    block: int = 1024   # lanes per program (power of 2)
    num_warps: int = 4


def owner_hash(tables: jax.Array, keys: jax.Array, num_shards: int) -> jax.Array:
    """int32 owner of (tables [N] int32, keys [N] int64), as `mesh.owner_of` (fmix64 of
    id + table * salt, as unsigned 64-bit, mod num_shards), in int64 arithmetic."""
    x = keys.astype(jnp.int64) + tables.astype(jnp.int64) * _OWNER_SALT
    x = (x ^ lax.shift_right_logical(x, _S33)) * _M1
    x = (x ^ lax.shift_right_logical(x, _S33)) * _M2
    x = x ^ lax.shift_right_logical(x, _S33)
    # Unsigned x mod n from non-negative halves: x = 2 * (x >>> 1) + (x & 1).
    n = np.int64(num_shards)
    half = lax.shift_right_logical(x, _ONE)
    return (((half % n) * 2 + (x & _ONE)) % n).astype(jnp.int32)


def ids_partition_reference(tables: jax.Array, keys: jax.Array, valid: jax.Array,
                            num_shards: int) -> Partition:
    """XLA reference: hash, stable sort (owner, lane), scatter (as sharding.exchange.plan)."""
    n = keys.shape[0]
    lane = jnp.arange(n, dtype=jnp.int32)
    owner = jnp.where(valid, owner_hash(tables, keys, num_shards), num_shards).astype(jnp.int32)
    s_owner, perm = lax.sort((owner.astype(jnp.uint32), lane), num_keys=1, is_stable=True)  # unsigned: CUB on GPU
    s_owner = s_owner.astype(jnp.int32)
    fill = jnp.zeros(num_shards + 1, jnp.int32).at[owner].add(1)
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(fill, dtype=jnp.int32)])
    rank = jnp.zeros(n, jnp.int32).at[perm].set(lane - starts[s_owner])
    return Partition(owner, fill[:num_shards], starts, perm, rank)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _hash_kernel(tables_ref, keys_ref, valid_ref, owner_ref, hist_ref, *, n, num_shards, nb, t):
    local = lax.broadcasted_iota(jnp.int32, (t,), 0)
    lane = pl.program_id(0) * t + local
    ok = lane < n
    lc = jnp.where(ok, lane, 0)
    key = keys_ref[lc]
    tab = tables_ref[lc]
    live = ok & (valid_ref[lc] != 0)
    owner = jnp.where(live, owner_hash(tab, key, num_shards), num_shards)          # [T]
    owner = jnp.where(ok, owner, nb)  # lanes past the end: in no bucket
    plgpu.store(owner_ref.at[jnp.where(ok, lane, n + local)], owner, mask=ok)
    for c0 in range(0, nb, _CHUNK):
        ch = min(_CHUNK, nb)
        bucket = c0 + lax.broadcasted_iota(jnp.int32, (t, ch), 1)
        onehot = (owner[:, None] == bucket).astype(jnp.int32)                     # [T, ch]
        hist_ref[pl.program_id(0), pl.ds(c0, ch)] = jnp.sum(onehot, axis=0, dtype=jnp.int32)


def _place_kernel(owner_ref, base_ref, starts_ref, perm_ref, rank_ref, *, n, nb, t):
    local = lax.broadcasted_iota(jnp.int32, (t,), 0)
    lane = pl.program_id(0) * t + local
    ok = lane < n
    owner = jnp.where(ok, owner_ref[jnp.where(ok, lane, 0)], nb)                  # [T]
    dest = jnp.zeros((t,), jnp.int32)
    for c0 in range(0, nb, _CHUNK):
        ch = min(_CHUNK, nb)
        bucket = c0 + lax.broadcasted_iota(jnp.int32, (t, ch), 1)
        onehot = (owner[:, None] == bucket).astype(jnp.int32)                     # [T, ch]
        within = lax.cumsum(onehot, axis=0) - 1                                   # [T, ch]
        base = base_ref[pl.program_id(0), pl.ds(c0, ch)]                          # [ch]
        dest = dest + jnp.sum(onehot * (base[None, :] + within), axis=1, dtype=jnp.int32)
    start = starts_ref[jnp.minimum(owner, nb - 1)]
    target = jnp.where(ok, dest, n + local)  # distinct; masked lanes out of range
    plgpu.store(perm_ref.at[target], lane, mask=ok)
    plgpu.store(rank_ref.at[jnp.where(ok, lane, n + local)], dest - start, mask=ok)


@functools.partial(jax.jit, static_argnames=("num_shards", "config", "interpret"))
def _ids_partition_pallas(tables, keys, valid, *, num_shards, config, interpret):
    n = keys.shape[0]
    t = config.block
    nb = max(_CHUNK, _next_pow2(num_shards + 1))
    blocks = pl.cdiv(n, t)
    params = plgpu.CompilerParams(num_warps=config.num_warps)
    owner, hist = pl.pallas_call(
        functools.partial(_hash_kernel, n=n, num_shards=num_shards, nb=nb, t=t),
        out_shape=[jax.ShapeDtypeStruct((n,), jnp.int32),
                   jax.ShapeDtypeStruct((blocks, nb), jnp.int32)],
        grid=(blocks,),
        compiler_params=params,
        interpret=interpret,
        name="ids_partition_hash",
    )(tables.astype(jnp.int32), keys.astype(jnp.int64), valid.astype(jnp.int32))
    fill = jnp.sum(hist, axis=0, dtype=jnp.int32)                                 # [NB]
    starts_nb = jnp.cumsum(fill, dtype=jnp.int32) - fill                          # [NB]
    base = starts_nb[None, :] + jnp.cumsum(hist, axis=0, dtype=jnp.int32) - hist  # [blocks, NB]
    perm, rank = pl.pallas_call(
        functools.partial(_place_kernel, n=n, nb=nb, t=t),
        out_shape=[jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.int32)],
        grid=(blocks,),
        compiler_params=params,
        interpret=interpret,
        name="ids_partition_place",
    )(owner, base, starts_nb)
    starts = jnp.concatenate([starts_nb[:num_shards + 1], jnp.full((1,), n, jnp.int32)])
    return Partition(owner, fill[:num_shards], starts, perm, rank)


def ids_partition_pallas(tables, keys, valid, num_shards: int, *, interpret: bool = False,
                         config: Config | None = None) -> Partition:
    """The Pallas path of `ids_partition` (compiled on GPU, or interpret mode)."""
    keys = jnp.asarray(keys)
    n = keys.shape[0]
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if n == 0 or num_shards + 1 > 4096:
        return ids_partition_reference(jnp.asarray(tables), keys, jnp.asarray(valid), num_shards)
    cfg = config or Config()
    return _ids_partition_pallas(jnp.asarray(tables), keys, jnp.asarray(valid),
                                 num_shards=num_shards, config=cfg, interpret=interpret)


def ids_partition(tables: jax.Array, keys: jax.Array, valid: jax.Array, num_shards: int, *,
                  impl: str | None = None) -> Partition:
    """Owner, per-owner counts and a stable owner-grouping permutation of N lanes.

    Args:
      tables: [N] int32 table index of each key; keys: [N] int64 IDs (any value);
      valid: [N] bool, invalid lanes go to bucket num_shards (last); num_shards >= 1.
      impl: dispatch override.
    Returns:
      `Partition(owner, counts, starts, perm, rank)`; see the module docstring.
    """
    which = dispatch.resolve(impl)
    if which == "reference":
        return ids_partition_reference(tables, keys, valid, num_shards)
    return ids_partition_pallas(tables, keys, valid, num_shards, interpret=(which == "interpret"))
