"""The CSR type used everywhere: `Ragged(values, row_splits, weights)`.

A `Ragged` holds `nrows` variable-length rows in compressed sparse row form:

    values      [capacity] (or a nested `Ragged` for 2-level sequences of lists)
    row_splits  [nrows + 1] int32 (int64 when the capacity needs it); row i owns
                values[row_splits[i]:row_splits[i + 1]]
    weights     optional [capacity] float32, aligned with values

`values` has a static *capacity*: slots at and beyond `row_splits[-1]` (the live count)
are padding and hold zeros. Capacities come from `capacity_bucket` (powers of two by
default), so a stream of batches compiles a handful of shapes instead of one per batch.

The same class serves the host (numpy arrays, built by IO) and the device (jax arrays,
inside jit): it is a registered pytree whose leaves are values, row_splits and weights.
Constructors named `from_*` run on the host and return numpy arrays; methods that
compute (`row_lengths`, `value_rowids`, `to_dense`, ...) work on either kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

INT32_MAX = np.iinfo(np.int32).max


def capacity_bucket(n: int, minimum: int = 16, ratio: float = 2.0) -> int:
    """The smallest bucket capacity >= n: minimum * ratio**k, rounded up to an int.

    With the default ratio 2 the buckets are powers of two (times `minimum`), so a batch
    stream with varying value counts compiles O(log(max/min)) shapes.
    """
    if n < 0:
        raise ValueError(f"capacity_bucket: n must be >= 0, got {n}")
    if ratio <= 1.0:
        raise ValueError(f"capacity_bucket: ratio must be > 1, got {ratio}")
    cap = max(int(minimum), 1)
    while cap < n:
        cap = max(cap + 1, int(np.ceil(cap * ratio)))
    return cap


def splits_dtype(capacity: int) -> np.dtype:
    """int32 row splits while they fit, int64 beyond 2**31 - 1 values."""
    return np.dtype(np.int32) if capacity <= INT32_MAX else np.dtype(np.int64)


def _is_numpy(x: Any) -> bool:
    return isinstance(x, np.ndarray)


@jax.tree_util.register_pytree_node_class
class Ragged:
    """Rows of variable length in CSR form with a static values capacity.

    Attributes:
      values: [capacity] array (any dtype), or a nested `Ragged` (2-level form: each
        outer row is a list of inner rows, e.g. a behaviour sequence of multi-ID items).
      row_splits: [nrows + 1] int32/int64, non-decreasing, row_splits[0] == 0,
        row_splits[-1] <= capacity.
      weights: None or [capacity] float32 aligned with values (only for 1-level).

    The constructor does not validate (pytree unflattening passes placeholders); call
    `validate()` on host data, which the `from_*` constructors do.
    """

    __slots__ = ("values", "row_splits", "weights")

    def __init__(self, values: Any, row_splits: Any, weights: Any = None):
        self.values = values
        self.row_splits = row_splits
        self.weights = weights

    # -- pytree ---------------------------------------------------------------------
    def tree_flatten(self):
        return (self.values, self.row_splits, self.weights), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(*children)

    # -- static structure -----------------------------------------------------------
    @property
    def nrows(self) -> int:
        """Number of rows (static)."""
        return self.row_splits.shape[0] - 1

    @property
    def capacity(self) -> int:
        """Static number of value slots (inner rows for the 2-level form)."""
        if isinstance(self.values, Ragged):
            return self.values.nrows
        return self.values.shape[0]

    @property
    def ragged_rank(self) -> int:
        """1 for lists, 2 for lists of lists."""
        return 1 + (self.values.ragged_rank if isinstance(self.values, Ragged) else 0)

    @property
    def flat_values(self) -> Any:
        """The innermost values array."""
        return self.values.flat_values if isinstance(self.values, Ragged) else self.values

    @property
    def dtype(self):
        return self.flat_values.dtype

    def __repr__(self) -> str:
        w = "" if self.weights is None else f", weights={self.weights!r}"
        return f"Ragged(values={self.values!r}, row_splits={self.row_splits!r}{w})"

    # -- computed views (numpy on the host, jax inside jit) -------------------------
    def num_values(self):
        """Live value count, row_splits[-1] (a scalar array)."""
        return self.row_splits[-1]

    def row_lengths(self):
        """[nrows] number of values (or inner rows) per row."""
        return self.row_splits[1:] - self.row_splits[:-1]

    def value_mask(self):
        """[capacity] bool, True for live slots."""
        xp = np if _is_numpy(self.row_splits) else jnp
        return xp.arange(self.capacity) < self.row_splits[-1]

    def value_rowids(self):
        """[capacity] int32 row index of each value slot; padding slots get `nrows`.

        Padding maps to the out-of-range segment `nrows`, so a segment_sum with
        `num_segments=nrows` drops it without a separate mask.
        """
        cap = self.capacity
        if _is_numpy(self.row_splits):
            ends = np.asarray(self.row_splits[1:], dtype=np.int64)
            return np.searchsorted(ends, np.arange(cap), side="right").astype(np.int32)
        # A scatter-add of row ends then a cumsum: exact integer arithmetic, no sort.
        counts = jnp.zeros(cap + 1, jnp.int32).at[self.row_splits[1:]].add(1, mode="drop")
        return jnp.cumsum(counts)[:cap].astype(jnp.int32)

    def to_dense(self, max_len: int, pad_value=0):
        """([nrows, max_len] values, [nrows, max_len] bool mask); keeps each row's first
        `max_len` values (use `features.functional.sequence_truncate` to keep the last).
        Weights are returned as a third array when present. 1-level only.
        """
        if self.ragged_rank != 1:
            raise ValueError("Ragged.to_dense: only ragged_rank 1 converts to a dense [B, L] array")
        xp = np if _is_numpy(self.row_splits) else jnp
        starts = self.row_splits[:-1]
        pos = xp.arange(max_len)
        mask = pos[None, :] < self.row_lengths()[:, None]
        idx = xp.clip(starts[:, None] + pos[None, :], 0, max(self.capacity - 1, 0))
        if self.capacity == 0:
            dense = xp.full((self.nrows, max_len), pad_value, dtype=self.values.dtype)
        else:
            dense = xp.where(mask, self.values[idx], xp.asarray(pad_value, self.values.dtype))
        if self.weights is None:
            return dense, mask
        w = xp.where(mask, self.weights[idx], 0) if self.capacity else xp.zeros(mask.shape, xp.float32)
        return dense, mask, w.astype(xp.float32)

    @classmethod
    def from_dense(cls, dense, mask=None, capacity: int | None = None, weights=None) -> "Ragged":
        """Packs the masked entries of a [B, L] array row by row (jit-compatible).

        Args:
          dense: [B, L] values.
          mask: [B, L] bool; None means every entry is live.
          capacity: values capacity, static; default B * L.
          weights: optional [B, L] float weights, packed alongside.
        Returns a Ragged with jax arrays (numpy in, numpy out).
        """
        xp = np if _is_numpy(dense) and (mask is None or _is_numpy(mask)) else jnp
        b, l = dense.shape
        cap = b * l if capacity is None else int(capacity)
        if mask is None:
            mask = xp.ones((b, l), bool)
        if cap < b * l and xp is np and int(mask.sum()) > cap:
            raise ValueError(f"Ragged.from_dense: {int(mask.sum())} live values exceed capacity {cap}")
        sdt = splits_dtype(cap)
        lengths = mask.sum(axis=1).astype(sdt)
        row_splits = xp.concatenate([xp.zeros(1, sdt), xp.cumsum(lengths).astype(sdt)])
        rank = xp.cumsum(mask, axis=1) - 1
        dest = xp.where(mask, row_splits[:-1, None] + rank, cap).reshape(-1)
        vals = _scatter(xp, xp.zeros(cap, dense.dtype), dest, dense.reshape(-1))
        w = None
        if weights is not None:
            w = _scatter(xp, xp.zeros(cap, xp.float32), dest, weights.reshape(-1).astype(xp.float32))
        return cls(vals, row_splits, w)

    # -- host constructors ------------------------------------------------------------
    @classmethod
    def from_lists(
        cls,
        rows: Sequence,
        dtype=np.int64,
        capacity: int | None = None,
        weights: Sequence | None = None,
        ragged_rank: int = 1,
        inner_capacity: int | None = None,
    ) -> "Ragged":
        """Builds a host Ragged from Python lists.

        Args:
          rows: a list of lists (ragged_rank 1) or of lists of lists (ragged_rank 2).
          dtype: values dtype.
          capacity: values capacity (ragged_rank 1) or inner-row capacity (2); default
            exactly the live count.
          weights: optional list of lists of floats aligned with `rows` (rank 1 only).
          inner_capacity: values capacity of the inner level (ragged_rank 2).
        """
        if ragged_rank == 2:
            outer = np.zeros(len(rows) + 1, np.int64)
            outer[1:] = np.cumsum([len(r) for r in rows])
            inner_rows = [list(x) for r in rows for x in r]
            inner = cls.from_lists(inner_rows, dtype, capacity=inner_capacity)
            inner = inner.pad(capacity if capacity is not None else len(inner_rows), axis="rows")
            return cls(inner, outer.astype(splits_dtype(inner.nrows)))
        if ragged_rank != 1:
            raise ValueError(f"Ragged.from_lists: ragged_rank must be 1 or 2, got {ragged_rank}")
        lengths = np.asarray([len(r) for r in rows], np.int64)
        n = int(lengths.sum())
        cap = n if capacity is None else int(capacity)
        if n > cap:
            raise ValueError(f"Ragged.from_lists: {n} values exceed capacity {cap}")
        vals = np.zeros(cap, dtype)
        if n:
            vals[:n] = np.concatenate([np.asarray(r, dtype).reshape(-1) for r in rows])
        w = None
        if weights is not None:
            if [len(x) for x in weights] != lengths.tolist():
                raise ValueError("Ragged.from_lists: weights must have the same row lengths as rows")
            w = np.zeros(cap, np.float32)
            if n:
                w[:n] = np.concatenate([np.asarray(x, np.float32).reshape(-1) for x in weights])
        splits = np.zeros(len(rows) + 1, splits_dtype(cap))
        splits[1:] = np.cumsum(lengths)
        return cls(vals, splits, w)

    @classmethod
    def from_arrow(cls, array, capacity: int | None = None, value_dtype=None, values_fn=None) -> "Ragged":
        """Builds a host Ragged from a pyarrow (Large)ListArray or ChunkedArray of lists.

        Null lists become empty rows (missing = empty). Null *values* inside a list are
        an error (ValueError), since no default could be right for every column; the IO
        layer catches it and names the file and column. The values buffer is shared with
        arrow (zero-copy) when the list is unsliced, has no nulls and no padding is asked.
        Lists of lists give the 2-level form (`capacity` then counts inner rows).
        `values_fn(child: pa.Array) -> np.ndarray`, if given, converts the innermost
        values (e.g. hashes strings); by default they become a numpy array.
        """
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
        if not pa.types.is_list(array.type) and not pa.types.is_large_list(array.type):
            raise TypeError(f"Ragged.from_arrow: expected a list array, got {array.type}")
        # offsets of a sliced array need not start at 0; .values is the whole child.
        offsets = np.asarray(array.offsets)  # zero-copy view, [n + 1]
        if array.null_count:
            # A null list's offsets may span garbage values: rebuild offsets from lengths.
            lengths = np.asarray(array.value_lengths().fill_null(0), np.int64)
            child = array.flatten()  # drops the values of null lists
            offsets = np.concatenate([[0], np.cumsum(lengths)])
        else:
            first, last = int(offsets[0]), int(offsets[-1])
            child = array.values.slice(first, last - first) if (first or last != len(array.values)) else array.values
            if first:
                offsets = offsets - first
        n = int(offsets[-1])
        if isinstance(child.type, (pa.ListType, pa.LargeListType)):
            inner = cls.from_arrow(child, value_dtype=value_dtype, values_fn=values_fn)
            cap = n if capacity is None else int(capacity)
            inner = inner.pad(cap, axis="rows")
            return cls(inner, offsets.astype(splits_dtype(cap)))
        if child.null_count:
            raise ValueError(f"Ragged.from_arrow: {child.null_count} null values inside lists")
        vals = child.to_numpy(zero_copy_only=False) if values_fn is None else values_fn(child)
        if value_dtype is not None and vals.dtype != np.dtype(value_dtype):
            vals = vals.astype(value_dtype)
        cap = n if capacity is None else int(capacity)
        r = cls(vals, offsets.astype(splits_dtype(cap), copy=False))
        return r.pad(cap) if cap != n else r

    # -- host utilities ---------------------------------------------------------------
    def pad(self, capacity: int, axis: str = "values") -> "Ragged":
        """Returns a copy whose values (or, with axis="rows", rows) are padded to a
        capacity. Rows padding appends empty rows; values padding appends zeros."""
        xp = np if _is_numpy(self.row_splits) else jnp
        if axis == "rows":
            extra = capacity - self.nrows
            if extra < 0:
                raise ValueError(f"Ragged.pad: {self.nrows} rows exceed capacity {capacity}")
            last = self.row_splits[-1:]
            splits = xp.concatenate([self.row_splits, xp.repeat(last, extra)])
            return Ragged(self.values, splits, self.weights)
        if axis != "values":
            raise ValueError(f"Ragged.pad: axis must be 'values' or 'rows', got {axis!r}")
        if isinstance(self.values, Ragged):
            return Ragged(self.values.pad(capacity, axis="rows"), self.row_splits)
        extra = capacity - self.capacity
        if extra < 0:
            raise ValueError(f"Ragged.pad: capacity {self.capacity} exceeds {capacity}")
        if _is_numpy(self.row_splits) and int(self.row_splits[-1]) > capacity:
            raise ValueError(f"Ragged.pad: {int(self.row_splits[-1])} values exceed capacity {capacity}")
        vals = xp.concatenate([self.values, xp.zeros(extra, self.values.dtype)])
        w = None if self.weights is None else xp.concatenate([self.weights, xp.zeros(extra, self.weights.dtype)])
        splits = self.row_splits.astype(splits_dtype(capacity)) if xp is np else self.row_splits
        return Ragged(vals, splits, w)

    def to_lists(self) -> list:
        """Python lists of the live rows (host; pulls device arrays)."""
        splits = np.asarray(self.row_splits)
        if isinstance(self.values, Ragged):
            inner = self.values.to_lists()
            return [inner[splits[i]:splits[i + 1]] for i in range(self.nrows)]
        vals = np.asarray(self.values)
        return [vals[splits[i]:splits[i + 1]].tolist() for i in range(self.nrows)]

    def validate(self, name: str = "ragged") -> "Ragged":
        """Checks the CSR invariants on host data; raises ValueError naming `name`."""
        s = np.asarray(self.row_splits)
        if s.ndim != 1 or s.shape[0] < 1:
            raise ValueError(f"{name}: row_splits must be 1-D with nrows + 1 entries, got shape {s.shape}")
        if s[0] != 0:
            raise ValueError(f"{name}: row_splits[0] must be 0, got {s[0]}")
        if np.any(np.diff(s) < 0):
            raise ValueError(f"{name}: row_splits must be non-decreasing")
        if s[-1] > self.capacity:
            raise ValueError(f"{name}: {s[-1]} live values exceed capacity {self.capacity}")
        if self.weights is not None and np.shape(self.weights) != (self.capacity,):
            raise ValueError(f"{name}: weights shape {np.shape(self.weights)} != ({self.capacity},)")
        if isinstance(self.values, Ragged):
            self.values.validate(name + ".values")
        return self


def _scatter(xp, out, dest, src):
    """out[dest] = src, dropping out-of-range dest (numpy and jax)."""
    if xp is np:
        keep = dest < out.shape[0]
        out[dest[keep]] = src[keep]
        return out
    return out.at[dest].set(src, mode="drop")


def slice_rows(r: Ragged, start: int, stop: int) -> Ragged:
    """Host: rows [start, stop) of a numpy Ragged, with exact capacity (a copy-free view
    of the values where possible)."""
    s = r.row_splits
    lo, hi = int(s[start]), int(s[stop])
    splits = s[start:stop + 1] - s.dtype.type(lo)
    if isinstance(r.values, Ragged):
        return Ragged(slice_rows(r.values, lo, hi), splits)
    w = None if r.weights is None else r.weights[lo:hi]
    return Ragged(r.values[lo:hi], splits, w)


def concat_rows(parts: Sequence[Ragged]) -> Ragged:
    """Host: stacks the rows of numpy Raggeds (live values only, exact capacity)."""
    if len(parts) == 1:
        return parts[0]
    counts = [int(p.row_splits[-1]) for p in parts]
    offsets = np.cumsum([0] + counts[:-1])
    splits = np.concatenate([np.zeros(1, np.int64)] + [
        np.asarray(p.row_splits[1:], np.int64) + o for p, o in zip(parts, offsets)])
    if isinstance(parts[0].values, Ragged):
        inner = concat_rows([slice_rows(p.values, 0, c) for p, c in zip(parts, counts)])
        return Ragged(inner, splits.astype(splits_dtype(inner.nrows)))
    vals = np.concatenate([p.values[:c] for p, c in zip(parts, counts)])
    w = None
    if parts[0].weights is not None:
        w = np.concatenate([p.weights[:c] for p, c in zip(parts, counts)])
    return Ragged(vals, splits.astype(splits_dtype(len(vals))), w)
