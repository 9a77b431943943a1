"""Lane sorts shared by the feature ops, the embedding dedup and the hashtable insert.

XLA:GPU runs a one-key sort of unsigned keys with one value operand as a CUB radix sort,
and any other sort (two keys, three operands, signed keys with values) as its own
comparison sort, 5-6x slower at millions of lanes. The sorts here are built from the
first kind.

XLA:CPU sorts with `std::sort` through a compiled comparator: 5 ms for 106k uint64 lanes
and 14 ms for the two-pass (table, key) sort below, where NumPy's sort (SIMD on x86)
takes 0.6 ms per array on an Intel Xeon (4 ms on the 2-core AMD EPYC with NumPy's
AVX-512 sort; 1 ms with NPY_DISABLE_CPU_FEATURES=AVX512_ICL,X86_V4). On the CPU the sorts
therefore go through NumPy as a host callback (the CPU is the host: no device
transfer), long ones split over two threads (`_sort_inplace`). Only single arrays are
sorted so (permutations ride in the low bits of the values), and a sorted array is the
same whatever the algorithm: bitwise what `lax.sort` returns.
"""

from __future__ import annotations

import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor

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
    return _sort_inplace(np.array(x))


# Arrays at least this long are sorted as two halves on two threads (`_sort_inplace`).
_SPLIT_MIN = 1 << 15
_HALF_SORTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recis-sort")


def _sort_inplace(v: np.ndarray) -> np.ndarray:
    """Sorts the uint64 array v in place and returns it.

    A long one is sorted as two halves, one on a helper thread (NumPy's sort releases the
    GIL), then merged by a stable sort, which is timsort for uint64 and merges the two
    runs in one pass: 4.1 -> 2.4 ms at 106k lanes on the 2-core AMD EPYC, where the step
    leaves the other core idle while it waits for the sort. The result is the same
    sorted array either way."""
    n = v.shape[0]
    if n < _SPLIT_MIN or (os.cpu_count() or 1) < 2:
        _sort_part(v)
        return v
    upper = _HALF_SORTER.submit(_sort_part, v[n // 2:])
    _sort_part(v[:n // 2])
    upper.result()
    v.sort(kind="stable")
    return v


# np.sort of rows this short runs sorting networks, without partition passes.
_ROW = 256


def _sort_part(v: np.ndarray) -> None:
    """Sorts v in place: by NumPy's sort, or where that is faster (`_rows_then_merge`) as
    rows of _ROW values, each sorted, merged by timsort."""
    if v.shape[0] >= 4 * _ROW and _rows_then_merge():
        _sort_rows_and_merge(v)
    else:
        v.sort()


def _sort_rows_and_merge(v: np.ndarray) -> None:
    """Sorts v in place as rows of _ROW values (a tail shorter than a row stays as it
    is), then merges all runs with timsort."""
    m = v.shape[0] // _ROW * _ROW
    v[:m].reshape(-1, _ROW).sort(axis=1)
    v.sort(kind="stable")


@functools.cache
def _rows_then_merge() -> bool:
    """Whether sorted rows merged by timsort beat NumPy's sort here (timed once, 64k
    values): on the 2-core AMD EPYC its AVX-512 quicksort partitions slowly and they do
    (53k lanes: 2.2 -> 1.6 ms), on an Intel Xeon its sort takes 0.3 ms and they would not.
    Either way the sorted array is the same."""
    x = np.random.default_rng(0).integers(0, 2**63, 1 << 16, dtype=np.uint64)

    def best(sort):
        times = []
        for _ in range(3):
            y = x.copy()
            t0 = time.perf_counter()
            sort(y)
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(_sort_rows_and_merge) < best(np.ndarray.sort)


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

    Sorts the (table, key) number V = table' * 2**kb + key' (table' = table - min table,
    key' = key - min key: the same order, only the bits that vary; kb = the bits of the
    largest key') with the lane's position packed into the low p bits (p = the bits of
    N - 1), so each sort is of distinct uint64 values and NumPy's plain sort is stable
    here. When V has at most 64 - p bits that is the whole sort (one pass). Otherwise the
    one pass sorts by V's top 64 - p bits, and only lanes tied there on distinct V are
    sorted again, by (tie group, low bits of V, position) in one more sort of just them:
    with well-mixed 64-bit IDs (DeepFM: 106k lanes, 27 tables, 5 + 64 + 17 bits) no lanes
    are, since equal top bits come from equal keys, which stay in lane order. A sort of
    106k uint64 takes 4-5 ms on this AMD EPYC (NumPy's AVX-512 sort; 0.6 ms on an Intel
    Xeon), so the second pass of the old LSD sort cost ~5 ms a step; that LSD sort
    (`_lsd_order`) remains for inputs where the retie sort would not fit 64 bits.
    Tables compare as uint32 (as on the GPU); INT32_MAX, dedup's invalid-lane sentinel,
    when it is the largest, is ranked one past the largest other table: the same order,
    fewer table bits.
    """
    t = np.asarray(tables).view(np.uint32)
    k = np.asarray(keys_u)
    n = k.shape[0]
    top = t == np.uint32(np.iinfo(np.int32).max)
    if top.any() and int(t.max()) == np.iinfo(np.int32).max:
        t = np.where(top, t[~top].max() + np.uint32(1) if not top.all() else np.uint32(0), t)
    tmin, kmin = t.min(), k.min()
    tb, kb = int(t.max() - tmin).bit_length(), int(k.max() - kmin).bit_length()
    pbits = max(1, (n - 1).bit_length())
    width = 64 - pbits
    lbits = max(0, tb + kb - width)  # V's low bits, below the `width` bits of the first pass
    # In place where it can be: on this 2-core VM each fresh [N] array costs page faults
    # (~0.2 ms at 106k lanes), as much as the arithmetic.
    v = np.subtract(k, kmin)
    hi_t = np.subtract(t, tmin, dtype=np.uint64)
    if lbits <= kb:
        v >>= np.uint64(lbits)
        hi_t <<= np.uint64(kb - lbits)
    else:
        v[:] = 0
        hi_t >>= np.uint64(lbits - kb)
    v |= hi_t
    v <<= np.uint64(pbits)
    v |= np.arange(n, dtype=np.uint64)
    _sort_inplace(v)
    low = np.uint64((1 << pbits) - 1)
    # Lanes tied on the first pass's bits: pairs of sorted neighbours (i, i + 1).
    np.bitwise_xor(v[1:], v[:-1], out=hi_t[:-1])
    tie = np.flatnonzero(hi_t[:-1] <= low)
    v &= low
    order = v.astype(np.int32)
    if lbits == 0 or tie.shape[0] == 0:
        return order

    def low_bits(lanes):  # V's low lbits bits of the given lanes
        kk = k[lanes] - kmin
        if lbits <= kb:
            return kk & np.uint64((1 << lbits) - 1)
        tt = (t[lanes] - tmin).astype(np.uint64) & np.uint64((1 << (lbits - kb)) - 1)
        return tt << np.uint64(kb) | kk

    retie = tie[low_bits(order[tie]) != low_bits(order[tie + 1])]
    if retie.shape[0] == 0:
        return order
    # Re-sort the tie groups that hold distinct V: (group, low bits, position) packed.
    is_tie = np.zeros(n, bool)
    is_tie[tie + 1] = True  # sorted position i + 1 is in i's group
    group = np.cumsum(~is_tie)
    bad = np.zeros(group[-1] + 1, bool)
    bad[group[retie]] = True
    idx = np.flatnonzero(bad[group])
    m = idx.shape[0]
    g = np.concatenate([[0], np.cumsum(group[idx][1:] != group[idx][:-1])]).astype(np.uint64)
    gb, ib = int(g.max()).bit_length(), max(1, (m - 1).bit_length())
    if gb + lbits + ib > 64:
        t64 = (t - tmin).astype(np.uint64)
        return _lsd_order(t64, k - kmin, tb, kb, pbits)
    ls = low_bits(order[idx])
    sub = np.sort(g << np.uint64(lbits + ib) | ls << np.uint64(ib) | np.arange(m, dtype=np.uint64))
    order[idx] = order[idx[(sub & np.uint64((1 << ib) - 1)).astype(np.int64)]]
    return order


def _lsd_order(t, k, tb, kb, pbits) -> np.ndarray:
    """`_np_table_key_order`'s order by an LSD sort of V = t * 2**kb + k in digits of
    64 - p bits: each pass sorts `digit << p | position after the previous pass`."""
    n = k.shape[0]
    width = 64 - pbits
    pos = np.arange(n, dtype=np.uint64)
    low = np.uint64((1 << pbits) - 1)
    order = None
    for lo in range(0, tb + kb, width):
        kk, tt = (k, t) if order is None else (k[order], t[order])
        d = kk >> np.uint64(lo) if lo < kb else np.zeros_like(kk)
        if lo + width > kb:  # the digit reaches into the table bits
            d = d | (tt << np.uint64(kb - lo) if lo <= kb else tt >> np.uint64(lo - kb))
        d = d & np.uint64((1 << width) - 1)
        perm = (np.sort(d << np.uint64(pbits) | pos) & low).astype(np.int64)
        order = perm if order is None else order[perm]
    return order.astype(np.int32)
