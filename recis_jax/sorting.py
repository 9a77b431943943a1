"""Lane sorts shared by the feature ops, the embedding dedup and the hashtable insert.

XLA:GPU runs a one-key sort of unsigned keys with one value operand as a CUB radix sort,
and any other sort (two keys, three operands, signed keys with values) as its own
comparison sort, 5-6x slower at millions of lanes. The sorts here are built from the
first kind.

XLA:CPU sorts with `std::sort` through a compiled comparator: 5 ms for 106k uint64 lanes
and 14 ms for the two-pass (table, key) sort below, where NumPy's sort (SIMD on x86)
takes 0.6 ms per array. On the CPU the sorts therefore go through NumPy as a host
callback (the CPU is the host: no device transfer). Only single arrays are sorted so
(permutations ride in the low bits of the values), and a sorted array is the same
whatever the algorithm: bitwise what `lax.sort` returns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sort_u64(x: jax.Array) -> jax.Array:
    """`jnp.sort` of a uint64 [N] array: NumPy's sort on the CPU (module docstring),
    `lax.sort` elsewhere (a CUB radix sort on the GPU)."""
    if not _numpy_sorts() or x.shape[0] == 0:
        return jax.lax.sort(x)
    return jax.pure_callback(_np_sort, jax.ShapeDtypeStruct(x.shape, x.dtype), x)


def _numpy_sorts() -> bool:
    return jax.default_backend() == "cpu"


def _np_sort(x) -> np.ndarray:
    return np.sort(np.asarray(x))


def sort_by_table_and_key(tables: jax.Array, keys: jax.Array):
    """Stable sort of lanes by (tables [N] int32 >= 0, keys [N] int64).

    Returns (sorted tables, sorted keys, order [N] int32: the lanes in sorted order).
    Two stable one-key sorts, least significant key first, rather than one two-key sort:
    XLA:GPU runs a one-key sort of unsigned keys with one value as a CUB radix sort but a
    two-key sort as its own comparison sort (14.3 -> 2.5 ms for 14M lanes on an H200,
    benchmarks/dedup_sort.py). On the CPU: one host callback (`_np_table_key_order`).
    """
    # int64 -> uint64 keeping the order: flip the sign bit.
    k_u = jax.lax.bitcast_convert_type(keys, jnp.uint64) ^ jnp.uint64(1 << 63)
    if _numpy_sorts() and 0 < keys.shape[0] < (1 << 31):
        order = jax.pure_callback(_np_table_key_order, jax.ShapeDtypeStruct(keys.shape, jnp.int32),
                                  tables.astype(jnp.int32), k_u)
        return tables[order], keys[order], order
    lane = jnp.arange(keys.shape[0], dtype=jnp.int32)
    _, by_key = jax.lax.sort((k_u, lane), num_keys=1, is_stable=True)
    _, order = jax.lax.sort((tables.astype(jnp.uint32)[by_key], by_key), num_keys=1, is_stable=True)
    return tables[order], keys[order], order


def _np_table_key_order(tables, keys_u) -> np.ndarray:
    """int32 [N]: the lanes stably sorted by (tables int32 >= 0, keys_u uint64), N < 2**31.

    An LSD sort of the (table, key) number V = table * 2**64 + key in digits of 64 - p
    bits (p = the bits of N - 1): each pass sorts one array of distinct uint64 values
    `digit << p | position` (the lane's position after the previous pass), so NumPy's
    plain sort is stable here. Passes: ceil((64 + bits of the largest table) / (64 - p)),
    two while table bits + 2 p <= 64 (DeepFM: 106k lanes, 27 table values, 5 + 2 * 17;
    3 passes of 32-bit digits before, in 3 callbacks; a pass over 106k lanes is a 0.6 ms
    sort on an Intel Xeon, 4-5 ms on an AMD EPYC, plus ~0.9 ms per callback). Tables
    compare as uint32 (as on the GPU); INT32_MAX, dedup's invalid-lane sentinel, when it
    is the largest, is ranked one past the largest other table: the same order, fewer
    table bits.
    """
    t = np.asarray(tables).astype(np.uint32).astype(np.uint64)
    k = np.asarray(keys_u)
    n = k.shape[0]
    top = t == np.uint64(np.iinfo(np.int32).max)
    if top.any() and int(t.max()) == np.iinfo(np.int32).max:
        t = np.where(top, t[~top].max() + np.uint64(1) if not top.all() else np.uint64(0), t)
    pbits = max(1, (n - 1).bit_length())
    width = 64 - pbits
    total = 64 + int(t.max()).bit_length()
    pos = np.arange(n, dtype=np.uint64)
    low = np.uint64((1 << pbits) - 1)
    order = None
    for lo in range(0, total, width):
        kk, tt = (k, t) if order is None else (k[order], t[order])
        if lo >= 64:
            d = tt >> np.uint64(lo - 64)
        else:
            d = kk >> np.uint64(lo)
            if lo > 0:
                d = d | (tt << np.uint64(64 - lo))
        d = d & np.uint64((1 << width) - 1)
        perm = (np.sort(d << np.uint64(pbits) | pos) & low).astype(np.int64)
        order = perm if order is None else order[perm]
    return order.astype(np.int32)
