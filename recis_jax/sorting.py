"""Lane sorts shared by the feature ops and the embedding dedup.

XLA:GPU runs a one-key sort of unsigned keys with one value operand as a CUB radix sort,
and any other sort (two keys, three operands, signed keys with values) as its own
comparison sort, 5-6x slower at millions of lanes. The sorts here are built from the
first kind.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sort_by_table_and_key(tables: jax.Array, keys: jax.Array):
    """Stable sort of lanes by (tables [N] int32 >= 0, keys [N] int64).

    Returns (sorted tables, sorted keys, order [N] int32: the lanes in sorted order).
    Two stable one-key sorts, least significant key first, rather than one two-key sort:
    XLA:GPU runs a one-key sort of unsigned keys with one value as a CUB radix sort but a
    two-key sort as its own comparison sort (14.3 -> 2.5 ms for 14M lanes on an H200,
    benchmarks/dedup_sort.py); on the CPU the two passes are also ~2x faster.
    """
    lane = jnp.arange(keys.shape[0], dtype=jnp.int32)
    # int64 -> uint64 keeping the order: flip the sign bit.
    k_u = jax.lax.bitcast_convert_type(keys, jnp.uint64) ^ jnp.uint64(1 << 63)
    _, by_key = jax.lax.sort((k_u, lane), num_keys=1, is_stable=True)
    _, order = jax.lax.sort((tables.astype(jnp.uint32)[by_key], by_key), num_keys=1, is_stable=True)
    return tables[order], keys[order], order
