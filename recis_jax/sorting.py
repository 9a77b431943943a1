"""Lane sorts shared by the feature ops, the embedding dedup and the hashtable insert.

XLA:GPU runs a one-key sort of unsigned keys with one value operand as a CUB radix sort,
and any other sort (two keys, three operands, signed keys with values) as its own
comparison sort, 5-6x slower at millions of lanes. The sorts here are built from the
first kind.

XLA:CPU sorts with `std::sort` through a compiled comparator: 5 ms for 106k uint64 lanes
and 14 ms for the two-pass (table, key) sort below, where NumPy's sort (SIMD on x86)
takes 0.6 ms per array. On the CPU the sorts therefore go through NumPy as a host
callback (the CPU is the host: no device transfer). Only single arrays are sorted so
(permutations ride in the low 32 bits of the values), and a sorted array is the same
whatever the algorithm: bitwise what `lax.sort` returns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_LOW32 = np.uint64(0xFFFFFFFF)


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
    benchmarks/dedup_sort.py). On the CPU: three sorts of one packed uint64 array
    (`_packed_order`), 14 -> 4.8 ms for 106k lanes.
    """
    # int64 -> uint64 keeping the order: flip the sign bit.
    k_u = jax.lax.bitcast_convert_type(keys, jnp.uint64) ^ jnp.uint64(1 << 63)
    if _numpy_sorts() and 0 < keys.shape[0] < (1 << 31):
        t_u = tables.astype(jnp.uint32).astype(jnp.uint64)
        order = _packed_order([k_u & _LOW32, k_u >> np.uint64(32), t_u])
        return tables[order], keys[order], order
    lane = jnp.arange(keys.shape[0], dtype=jnp.int32)
    _, by_key = jax.lax.sort((k_u, lane), num_keys=1, is_stable=True)
    _, order = jax.lax.sort((tables.astype(jnp.uint32)[by_key], by_key), num_keys=1, is_stable=True)
    return tables[order], keys[order], order


def _packed_order(digits: list[jax.Array]) -> jax.Array:
    """int32 [N]: the lanes stably sorted by `digits` (uint64 [N] each, < 2**32, least
    significant first; N < 2**31). An LSD sort: each pass sorts `digit << 32 | position`
    (the lane's position after the previous pass), one array of distinct values."""
    pos = jnp.arange(digits[0].shape[0], dtype=jnp.uint64)
    order = None
    for d in digits:
        d = d if order is None else d[order]
        s = (sort_u64(d << np.uint64(32) | pos) & _LOW32).astype(jnp.int32)
        order = s if order is None else order[s]
    return order
