"""Feature transforms as plain functions: the semantics every op and the engine share.

Everything here except `hash_strings` is jit-compatible with static shapes and runs on
CPU and GPU. IDs are int64 (x64 is enabled by `import recis_jax`); dense outputs are
float32. Semantics follow RecIS (see docs/ARCHITECTURE.md, "RecIS semantics"):

  bucketize(x, b)          searchsorted(b, x, side="right"); NaN -> len(b)
  mod(x, m)                int64(uint64(x) % m)
  hash_strings(v, kind)    farmhash Fingerprint64 / MurmurHash64A(seed 0), as int64 (host)
  multi_hash(x, n)         h_j = ((x*mul_j rem p_j) + p_j) rem p_j rem n_j, up to 4 hashes
  cross_ids(x, y)          int64(MurmurHash64A(le64(x) || le64(y), seed 0))
  feature_cross(x, y)      per row: distinct x IDs times distinct y IDs, crossed
  sequence_truncate(r, n)  keep the latest (side="left") or first n items of each row
  fill_missing, clip, log1p_clipped, standardize   numeric transforms for dense inputs
  table_id_pairs(...)      (table index, id) pairs for merged embedding tables

Validation raises ValueError for bad parameters and TypeError for bad dtypes, with
messages that name the function; the declarative ops (`features.ops`) add the feature.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import recis_jax  # noqa: F401  (enables x64: IDs are int64)
from pallas_kernels import bucketize as _bucketize_kernel
from recis_jax.ragged import Ragged, splits_dtype
from recis_jax.sorting import sort_by_table_and_key

HASH_KINDS = ("farm", "murmur")
MULTI_HASH_MULS = (1, 3, 5, 7)
MULTI_HASH_MODS = (29, 47, 67, 83)
MAX_MULTI_HASH = len(MULTI_HASH_MULS)
# t + p in multi_hash must not wrap: t is in (-p, p), so p < 2**62 keeps t + p < 2**63.
_MAX_MULTI_HASH_PRIME = 2**62

_MURMUR_M = 0xC6A4A7935BD1E995
_MURMUR_R = 47
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


# -- checks shared with the ops ---------------------------------------------------------
def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def is_int(v) -> bool:
    """True for a Python / numpy integer scalar (bool excluded: True is not a count)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_boundaries(boundaries, where: str = "bucketize") -> np.ndarray:
    """Returns boundaries as a float64 numpy array after checking them.

    Raises ValueError unless they are a non-empty 1-D sequence of finite numbers in
    non-decreasing order (equal neighbours are allowed: they only make an empty bucket).
    """
    b = np.asarray(boundaries)
    if b.dtype == object or not (np.issubdtype(b.dtype, np.number) and not np.issubdtype(b.dtype, np.complexfloating)):
        raise ValueError(f"{where}: boundaries must be real numbers, got dtype {b.dtype}")
    b = b.astype(np.float64)
    if b.ndim != 1 or b.size == 0:
        raise ValueError(f"{where}: boundaries must be a non-empty 1-D list, got shape {b.shape}")
    if not np.all(np.isfinite(b)):
        raise ValueError(f"{where}: boundaries must be finite, got {b[~np.isfinite(b)].tolist()}")
    if np.any(np.diff(b) < 0):
        i = int(np.argmax(np.diff(b) < 0))
        raise ValueError(f"{where}: boundaries must be sorted ascending, but b[{i}]={b[i]} > b[{i + 1}]={b[i + 1]}")
    return b


def check_modulus(m, where: str = "mod") -> int:
    """Returns m as an int after checking 0 < m < 2**63 (ValueError otherwise)."""
    if not is_int(m):
        raise ValueError(f"{where}: the modulus must be an int, got {m!r}")
    if not 0 < int(m) <= _INT64_MAX:
        raise ValueError(f"{where}: the modulus must be in [1, 2**63 - 1], got {int(m)}")
    return int(m)


def check_integer(x, where: str) -> jax.Array:
    """x as an int64 array; TypeError unless its dtype is an integer type (not bool)."""
    dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
    if dtype == np.bool_ or not np.issubdtype(dtype, np.integer):
        raise TypeError(f"{where}: expected integer IDs, got dtype {dtype}")
    return jnp.asarray(x).astype(jnp.int64)


def check_real(x, where: str) -> jax.Array:
    """x as a float (>= 32-bit) or integer array; TypeError for bool, complex, strings."""
    dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
    if dtype == np.bool_ or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise TypeError(f"{where}: expected a real numeric array, got dtype {dtype}")
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
        x = x.astype(jnp.float32)  # bf16/f16 would round the boundaries
    return x


def _as_float32(x, where: str) -> jax.Array:
    return check_real(x, where).astype(jnp.float32)


# -- bucketize --------------------------------------------------------------------------
def bucketize(x, boundaries) -> jax.Array:
    """Bucket index of each value: the number of boundaries <= x.

    Args:
      x: float or integer array, any shape.
      boundaries: [n] sorted, finite numbers (a list or numpy array; checked when
        concrete).
    Returns:
      int32 array shaped like x; a value equal to a boundary goes up (side="right"),
      NaN goes to n. Float inputs are compared in their own dtype (float32 inputs
      against float32-rounded boundaries), integer inputs exactly (against
      ceil(boundary)). Dispatches to `pallas_kernels.bucketize` (Pallas on GPU).
    """
    x = check_real(x, "bucketize")
    if _is_tracer(boundaries) or isinstance(boundaries, jax.Array):
        return _bucketize_kernel.bucketize(x, boundaries)
    b = check_boundaries(boundaries)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return _bucketize_kernel.bucketize(x, jnp.asarray(b, x.dtype))
    # Integer x: b <= x  <=>  ceil(b) <= x. Boundaries beyond the int64 range are
    # always (below) or never (above) <= x, so they become a constant offset.
    below = int(np.sum(b < _INT64_MIN))
    inside = b[(b >= _INT64_MIN) & (b < 2.0**63)]
    x = x.astype(jnp.int64)
    if inside.size == 0:
        return jnp.full(x.shape, below, jnp.int32)
    fb = np.ceil(inside).astype(np.int64)
    return _bucketize_kernel.bucketize(x, jnp.asarray(fb)) + jnp.int32(below)


# -- mod ----------------------------------------------------------------------------------
def mod(x, m) -> jax.Array:
    """int64(uint64(x) % m): negative IDs are taken as unsigned 64-bit (RecIS `Mod`).

    Args:
      x: integer array, any shape (cast to int64).
      m: the modulus, a Python int in [1, 2**63 - 1], or an integer array
        broadcastable to x with positive entries (the fused engine passes one m per
        value; entries are not checked inside jit).
    Returns:
      int64 array shaped like x, in [0, m).
    """
    x = check_integer(x, "mod")
    if isinstance(m, (np.ndarray, jax.Array)):
        m = check_integer(m, "mod (modulus)").astype(jnp.uint64)
    else:
        m = jnp.uint64(check_modulus(m))
    u = lax.bitcast_convert_type(x, jnp.uint64)
    return lax.bitcast_convert_type(lax.rem(u, m), jnp.int64)


# -- string hashing (host) ----------------------------------------------------------------
def hash_strings(values, kind: str) -> np.ndarray:
    """Hashes strings on the host (JAX has no strings).

    Args:
      values: a list/array (any shape) of bytes or str, or a pyarrow string array;
        str is encoded as UTF-8.
      kind: "farm" (farmhash Fingerprint64) or "murmur" (MurmurHash64A, seed 0).
    Returns:
      int64 numpy array (the unsigned hash reinterpreted), shaped like `values`.
    """
    if kind not in HASH_KINDS:
        raise ValueError(f"hash_strings: kind must be one of {HASH_KINDS}, got {kind!r}")
    from recis_jax.features import string_hash  # noqa: PLC0415  (host-only dependency)

    if isinstance(values, np.ndarray) and values.ndim > 1:
        return string_hash.hash_strings(values.reshape(-1), kind=kind).reshape(values.shape)
    return np.asarray(string_hash.hash_strings(values, kind=kind), np.int64)


# -- multi-hash -------------------------------------------------------------------------
def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (covers every int64)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in small:
        y = pow(a, d, n)
        if y in (1, n - 1):
            continue
        for _ in range(s - 1):
            y = y * y % n
            if y == n - 1:
                break
        else:
            return False
    return True


@functools.lru_cache(maxsize=None)
def _largest_prime_at_most(n: int) -> int:
    while not _is_prime(n):
        n -= 1
    return n


def multi_hash_primes(num_buckets: Sequence[int], where: str = "multi_hash") -> tuple[int, ...]:
    """The primes p_j = largest prime <= MULTI_HASH_MODS[j] * num_buckets[j] (host).

    Raises ValueError unless 1 <= len(num_buckets) <= 4 and every bucket count is a
    positive int small enough that p_j < 2**62 (so the int64 arithmetic cannot wrap).
    """
    if isinstance(num_buckets, (int, np.integer)) or not isinstance(num_buckets, Sequence | np.ndarray):
        raise ValueError(f"{where}: num_buckets must be a list of 1 to {MAX_MULTI_HASH} ints, got {num_buckets!r}")
    n = list(num_buckets)
    if not 1 <= len(n) <= MAX_MULTI_HASH:
        raise ValueError(f"{where}: num_buckets must hold 1 to {MAX_MULTI_HASH} bucket counts, got {len(n)}")
    primes = []
    for j, nj in enumerate(n):
        if not is_int(nj) or nj <= 0:
            raise ValueError(f"{where}: num_buckets[{j}] must be a positive int, got {nj!r}")
        bound = MULTI_HASH_MODS[j] * int(nj)
        if bound >= _MAX_MULTI_HASH_PRIME:
            raise ValueError(f"{where}: num_buckets[{j}]={nj} is too large ({MULTI_HASH_MODS[j]} * n must be < 2**62)")
        primes.append(_largest_prime_at_most(bound))
    return tuple(primes)


def multi_hash_one(x: jax.Array, mul, prime, n) -> jax.Array:
    """One multi-hash: ((x*mul rem p) + p) rem p rem n, int64 with wrap-around multiply.

    `rem` is C's truncated remainder (lax.rem), not Python's floored `%`: that is what
    RecIS computes for negative x. mul, prime and n are scalars or arrays broadcastable
    to x (the fused engine passes one per value).
    """
    p = jnp.asarray(prime, jnp.int64)
    t = lax.rem(x * jnp.asarray(mul, jnp.int64), p)
    t = lax.rem(t + p, p)
    return lax.rem(t, jnp.asarray(n, jnp.int64))


def multi_hash(x, num_buckets: Sequence[int]) -> list[jax.Array]:
    """RecIS IDMultiHash: up to 4 independent bucketings of int64 IDs.

    Args:
      x: integer array, any shape (cast to int64).
      num_buckets: 1 to 4 positive bucket counts n_j (static Python ints).
    Returns:
      a list of len(num_buckets) int64 arrays shaped like x, the j-th in [0, n_j):
      h_j = (((x * mul_j) rem p_j) + p_j) rem p_j rem n_j with mul = [1, 3, 5, 7] and
      p_j the largest prime <= [29, 47, 67, 83][j] * n_j.
    """
    primes = multi_hash_primes(num_buckets)
    x = check_integer(x, "multi_hash")
    return [multi_hash_one(x, MULTI_HASH_MULS[j], p, int(n)) for j, (p, n) in enumerate(zip(primes, num_buckets))]


# -- cross ----------------------------------------------------------------------------
def _murmur_mix(k: jax.Array) -> jax.Array:
    m = jnp.uint64(_MURMUR_M)
    k = k * m
    k = k ^ (k >> jnp.uint64(_MURMUR_R))
    return k * m


def cross_ids(x, y) -> jax.Array:
    """Elementwise cross ID of two aligned int64 arrays.

    id = int64(MurmurHash64A(le64(x) || le64(y), seed 0)): the 16-byte key is two
    8-byte blocks, so the hash is two block mixes and the final avalanche, in uint64
    arithmetic (which wraps, as in C). Shapes broadcast; returns int64.
    """
    x = lax.bitcast_convert_type(check_integer(x, "cross_ids"), jnp.uint64)
    y = lax.bitcast_convert_type(check_integer(y, "cross_ids"), jnp.uint64)
    m = jnp.uint64(_MURMUR_M)
    r = jnp.uint64(_MURMUR_R)
    h = jnp.uint64((16 * _MURMUR_M) % 2**64)  # seed 0 ^ (len * m)
    h = (h ^ _murmur_mix(x)) * m
    h = (h ^ _murmur_mix(y)) * m
    h = h ^ (h >> r)
    h = h * m
    h = h ^ (h >> r)
    return lax.bitcast_convert_type(h, jnp.int64)


def _value_rowids(splits, capacity: int) -> jax.Array:
    """[capacity] int32 row of each slot for these row splits (padding -> nrows).

    `Ragged.value_rowids` only reads the values' static shape, so a shape stand-in
    avoids materialising a values array.
    """
    return Ragged(jax.ShapeDtypeStruct((capacity,), jnp.int8), splits).value_rowids()


def _row_distinct(r: Ragged):
    """Per-row distinct values of a 1-level int Ragged, ascending, first weight kept.

    Returns (values [cap] int64 compacted row by row, weights [cap] float32 or None,
    counts [nrows] int32 distinct per row, starts [nrows] int32 exclusive offsets).
    A stable sort on (row, value) keeps duplicates in their original order, so the
    first of each run is the first occurrence and carries the kept weight.
    """
    cap, nrows = r.capacity, r.nrows
    rows = r.value_rowids()  # padding -> nrows, so it sorts after every live value
    vals = r.values.astype(jnp.int64)
    s_rows, s_vals, order = sort_by_table_and_key(rows, vals)
    new_run = jnp.concatenate([jnp.ones(1, bool), (s_rows[1:] != s_rows[:-1]) | (s_vals[1:] != s_vals[:-1])])
    first = new_run & (s_rows < nrows)
    dest = jnp.where(first, jnp.cumsum(first) - 1, cap)  # cap = dropped
    out_vals = jnp.zeros(cap, jnp.int64).at[dest].set(s_vals, mode="drop")
    out_w = None if r.weights is None else jnp.zeros(cap, jnp.float32).at[dest].set(
        r.weights.astype(jnp.float32)[order], mode="drop")
    counts = jax.ops.segment_sum(first.astype(jnp.int32), s_rows, num_segments=nrows)
    starts = jnp.cumsum(counts) - counts
    return out_vals, out_w, counts, starts


def _as_cross_input(r, name: str) -> Ragged:
    if not isinstance(r, Ragged):
        raise TypeError(f"feature_cross: {name} must be a Ragged, got {type(r).__name__}")
    if r.ragged_rank != 1:
        raise TypeError(f"feature_cross: {name} must be a 1-level Ragged (lists of IDs), "
                        f"got ragged_rank {r.ragged_rank}")
    check_integer(r.values, f"feature_cross ({name})")
    return r


def feature_cross_capped(x: Ragged, y: Ragged, capacity: int) -> tuple[Ragged, jax.Array]:
    """`feature_cross` into a fixed output capacity, with the overflow reported.

    Args:
      x, y: 1-level Ragged int IDs with the same nrows (optional float32 weights).
      capacity: static output capacity (number of crossed values).
    Returns:
      (out, needed): `out` is a valid Ragged whose rows hold the first `capacity`
      crossed pairs in order (rows past the cut are truncated or empty); `needed` is
      the int64 scalar total number of pairs the exact result has. The output
      overflowed iff needed > capacity: nothing is dropped unless the caller ignores
      `needed`. See `feature_cross` for the semantics.
    """
    _as_cross_input(x, "x")
    _as_cross_input(y, "y")
    if x.nrows != y.nrows:
        raise ValueError(f"feature_cross: x has {x.nrows} rows but y has {y.nrows}; the batch sizes must match")
    if not is_int(capacity) or capacity < 0:
        raise ValueError(f"feature_cross: capacity must be a non-negative int, got {capacity!r}")
    capacity = int(capacity)
    nrows = x.nrows
    sdt = splits_dtype(capacity)
    has_w = x.weights is not None or y.weights is not None
    if nrows == 0 or x.capacity == 0 or y.capacity == 0:  # every row is empty
        w = jnp.zeros(capacity, jnp.float32) if has_w else None
        return Ragged(jnp.zeros(capacity, jnp.int64), jnp.zeros(nrows + 1, sdt), w), jnp.int64(0)
    xv, xw, xn, xs = _row_distinct(x)
    yv, yw, yn, ys = _row_distinct(y)
    ends = jnp.cumsum(xn.astype(jnp.int64) * yn.astype(jnp.int64))
    needed = ends[-1]
    splits = jnp.concatenate([jnp.zeros(1, jnp.int64), jnp.minimum(ends, capacity)]).astype(sdt)
    # Output slot k of row r is pair number j = k - splits[r] of that row: x index
    # j // ny, y index j % ny, which enumerates x ascending, then y.
    row = _value_rowids(splits, capacity)  # padding -> nrows
    live = row < nrows
    row_c = jnp.minimum(row, nrows - 1)
    local = jnp.arange(capacity, dtype=jnp.int64) - splits[row_c].astype(jnp.int64)
    ny = jnp.maximum(yn[row_c], 1).astype(jnp.int64)  # a row with no y owns no slots
    xi = jnp.clip(xs[row_c] + local // ny, 0, x.capacity - 1)
    yi = jnp.clip(ys[row_c] + local % ny, 0, y.capacity - 1)
    ids = jnp.where(live, cross_ids(xv[xi], yv[yi]), 0)
    w = None
    if has_w:  # a side without weights counts as weight 1
        wx = xw[xi] if xw is not None else jnp.float32(1.0)
        wy = yw[yi] if yw is not None else jnp.float32(1.0)
        w = jnp.where(live, wx * wy, jnp.float32(0))
    return Ragged(ids, splits, w), needed


def feature_cross(x: Ragged, y: Ragged) -> Ragged:
    """Cross features (RecIS FeatureCross), exactly.

    Per row i: the distinct IDs of x (ascending; a duplicate keeps its first weight)
    times the distinct IDs of y, in order x ascending then y ascending; each pair gets
    id = cross_ids(x, y) (int64 MurmurHash64A of le64(x)||le64(y)) and weight
    w_x * w_y (weights default to 1; the output has weights iff an input does). An
    empty side gives an empty row.

    Args:
      x, y: 1-level Ragged int IDs with the same nrows.
    Returns:
      Ragged of int64 with capacity x.capacity * y.capacity, which bounds the pair
      count of any input, so nothing can be dropped. That bound is B**2 for two
      single-valued features of batch B: for large batches use
      `feature_cross_capped(x, y, capacity)` and check its `needed` count.
    """
    out, _ = feature_cross_capped(x, y, _as_cross_input(x, "x").capacity * _as_cross_input(y, "y").capacity)
    return out


# -- sequence truncation ------------------------------------------------------------------
def _gather_rows(r: Ragged, src_start, lengths, capacity: int) -> Ragged:
    """New 1-level Ragged whose row i is r.values[src_start[i] : src_start[i] + lengths[i]].

    The rows must fit: sum(lengths) <= capacity (the callers guarantee it).
    """
    nrows = lengths.shape[0]
    sdt = splits_dtype(capacity)
    splits = jnp.concatenate([jnp.zeros(1, sdt), jnp.cumsum(lengths).astype(sdt)])
    vals = jnp.zeros(capacity, r.values.dtype)
    w = None if r.weights is None else jnp.zeros(capacity, r.weights.dtype)
    if r.capacity == 0 or nrows == 0 or capacity == 0:
        return Ragged(vals, splits, w)
    row = _value_rowids(splits, capacity)
    live = row < nrows
    row_c = jnp.minimum(row, nrows - 1)
    src = src_start[row_c].astype(jnp.int64) + jnp.arange(capacity, dtype=jnp.int64) - splits[row_c].astype(jnp.int64)
    src = jnp.clip(src, 0, r.capacity - 1)
    vals = jnp.where(live, r.values[src], vals)
    if w is not None:
        w = jnp.where(live, r.weights[src], w)
    return Ragged(vals, splits, w)


def sequence_truncate(r: Ragged, seq_len: int, side: str = "left") -> Ragged:
    """Truncates every sequence to at most `seq_len` items (RecIS SequenceTruncate).

    Args:
      r: a 1-level Ragged (n_dims=2: each row is a sequence of IDs) or a 2-level
        Ragged (n_dims=3: each row is a sequence of items, each item a list of IDs).
      seq_len: static positive int.
      side: "left" drops items from the left, keeping the latest `seq_len`;
        "right" keeps the first `seq_len`.
    Returns:
      1-level input: a Ragged with rows of min(len, seq_len) items and values capacity
      min(r.capacity, nrows * seq_len). 2-level input: every sequence has exactly
      `seq_len` items (outer row_splits = i * seq_len); sequences shorter than that are
      padded at the end with empty items; the inner values keep their capacity.
      Weights follow their values.
    """
    if not isinstance(r, Ragged):
        raise TypeError(f"sequence_truncate: expected a Ragged, got {type(r).__name__}")
    if not is_int(seq_len) or seq_len <= 0:
        raise ValueError(f"sequence_truncate: seq_len must be a positive int, got {seq_len!r}")
    if side not in ("left", "right"):
        raise ValueError(f"sequence_truncate: side must be 'left' or 'right', got {side!r}")
    seq_len = int(seq_len)
    lengths = r.row_lengths()
    keep = jnp.minimum(lengths, seq_len)
    start = r.row_splits[:-1] + (lengths - keep if side == "left" else 0)
    if r.ragged_rank == 1:
        return _gather_rows(r, start, keep, min(r.capacity, r.nrows * seq_len))
    if r.ragged_rank != 2:
        raise TypeError(f"sequence_truncate: ragged_rank must be 1 or 2, got {r.ragged_rank}")
    # 2-level: item j of sequence i comes from inner row start[i] + j if j < keep[i],
    # else it is an empty padding item.
    inner = r.values
    if inner.ragged_rank != 1:
        raise TypeError("sequence_truncate: the inner level of a 2-level Ragged must be 1-level")
    j = jnp.arange(seq_len)
    src_item = (start[:, None] + j[None, :]).reshape(-1)  # [nrows * seq_len]
    is_item = (j[None, :] < keep[:, None]).reshape(-1)
    src_item = jnp.clip(src_item, 0, max(inner.nrows - 1, 0))
    inner_len = jnp.where(is_item, inner.row_lengths()[src_item] if inner.nrows else 0, 0)
    inner_start = inner.row_splits[:-1][src_item] if inner.nrows else jnp.zeros_like(src_item)
    new_inner = _gather_rows(inner, inner_start, inner_len, inner.capacity)
    outer = (jnp.arange(r.nrows + 1) * seq_len).astype(splits_dtype(r.nrows * seq_len))
    return Ragged(new_inner, outer)


# -- numeric transforms for dense features --------------------------------------------------
def fill_missing(x, value=0.0) -> jax.Array:
    """float32 x with NaN replaced by `value` (missing dense values arrive as NaN)."""
    x = _as_float32(x, "fill_missing")
    return jnp.where(jnp.isnan(x), jnp.asarray(value, jnp.float32), x)


def clip(x, min_value=None, max_value=None) -> jax.Array:
    """float32 x clipped to [min_value, max_value] (None = unbounded); NaN stays NaN."""
    x = _as_float32(x, "clip")
    if min_value is not None:
        x = jnp.where(x < min_value, jnp.asarray(min_value, jnp.float32), x)
    if max_value is not None:
        x = jnp.where(x > max_value, jnp.asarray(max_value, jnp.float32), x)
    return x


def log1p_clipped(x, min_value=0.0, max_value=None) -> jax.Array:
    """float32 log(1 + clip(x, min_value, max_value)); the default floor 0 keeps the
    log defined for the negative counts that appear in Criteo-style dense columns."""
    return jnp.log1p(clip(x, min_value, max_value))


def standardize(x, mean, std) -> jax.Array:
    """float32 (x - mean) / std with configured (not batch) statistics; std > 0.

    mean and std are scalars or arrays broadcastable to x (e.g. per column [n]).
    """
    x = _as_float32(x, "standardize")
    s = np.asarray(std) if not _is_tracer(std) else None
    if s is not None and (not np.all(np.isfinite(s)) or np.any(s <= 0)):
        raise ValueError(f"standardize: std must be finite and > 0, got {std!r}")
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# -- merged tables ------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TableIdPairs:
    """IDs of several features that share one merged embedding table (a pytree;
    `slices` is static, so it survives jit).

    Attributes:
      table: [N] int32, the feature-table index of each value.
      ids: [N] int64, the IDs, untouched (all 64 bits).
      mask: [N] bool, True for live values (padding of a Ragged is False).
      slices: static ((name, start, stop), ...): the block of each feature in the
        concatenation, in the order of the input dict, to split looked-up rows back.
    """

    table: jax.Array
    ids: jax.Array
    mask: jax.Array
    slices: tuple = dataclasses.field(metadata=dict(static=True))


def table_id_pairs(features: Mapping[str, Any], table_index: Mapping[str, int]) -> TableIdPairs:
    """(table index, id) pairs for a merged table, keyed exactly.

    RecIS merges tables by encoding the table index into the high bits of a 52-bit
    truncated ID (`ids_encode`), so distinct IDs can collide. Here a merged table keys
    on the pair itself: two values are the same row iff both their table index and
    their full int64 ID are equal (e.g. dedup with
    `lax.sort((table, ids), num_keys=2)` and compare both arrays).

    Args:
      features: name -> Ragged of int IDs (its flat values, padding included) or a
        dense int array (every entry live). 2-level Ragged use their innermost values.
      table_index: name -> index of that feature's sub-table inside the merged table;
        several names may share an index (features that share one embedding).
    Returns:
      TableIdPairs over the concatenation of the features' values.
    """
    tables, ids, masks, slices, start = [], [], [], [], 0
    for name, value in features.items():
        if name not in table_index:
            raise KeyError(f"table_id_pairs: feature {name!r} has no entry in table_index")
        if isinstance(value, Ragged):
            flat = check_integer(value.flat_values, f"table_id_pairs ({name})")
            inner = value
            while isinstance(inner.values, Ragged):
                inner = inner.values
            mask = inner.value_mask()
        else:
            flat = check_integer(value, f"table_id_pairs ({name})").reshape(-1)
            mask = jnp.ones(flat.shape, bool)
        n = flat.shape[0]
        tables.append(jnp.full((n,), table_index[name], jnp.int32))
        ids.append(flat)
        masks.append(jnp.asarray(mask))
        slices.append((name, start, start + n))
        start += n
    if not ids:
        return TableIdPairs(jnp.zeros(0, jnp.int32), jnp.zeros(0, jnp.int64), jnp.zeros(0, bool), ())
    return TableIdPairs(jnp.concatenate(tables), jnp.concatenate(ids), jnp.concatenate(masks), tuple(slices))


__all__ = [
    "HASH_KINDS",
    "MAX_MULTI_HASH",
    "MULTI_HASH_MODS",
    "MULTI_HASH_MULS",
    "TableIdPairs",
    "bucketize",
    "check_boundaries",
    "check_integer",
    "check_modulus",
    "check_real",
    "clip",
    "cross_ids",
    "feature_cross",
    "feature_cross_capped",
    "fill_missing",
    "hash_strings",
    "is_int",
    "log1p_clipped",
    "mod",
    "multi_hash",
    "multi_hash_one",
    "multi_hash_primes",
    "sequence_truncate",
    "standardize",
    "table_id_pairs",
]
