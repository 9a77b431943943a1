"""What to read from each column, and the conversion of arrow columns to batch arrays.

Two kinds of input feature, named as in RecIS's ColumnIO:

  FixedLenFeature  -> float32 (or int64) [B, dim]: numeric scalars or fixed-length numeric
                      lists; a null or empty list is *missing* and gets `default`.
  VarLenFeature    -> Ragged: ID lists (int64; uint64 kept as its exact bit pattern),
                      strings / string lists hashed on the host, lists of lists (2-level
                      sequences), float lists; a null is an empty row.

Every conversion error is a DataError naming the file, the column and the first bad row.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from recis_jax.io.files import DataError
from recis_jax.ragged import Ragged

HASH_TYPES = ("farm", "murmur")


@dataclasses.dataclass(frozen=True)
class FixedLenFeature:
    """A dense input: float32 (or int64) [B, dim].

    name: output name (and source column unless `column` is set).
    dim: values per row; a list column must hold exactly `dim` values (or none).
    default: value for a missing row (null, or an empty list).
    dtype: "float32" or "int64".
    nonfinite: NaN/inf in the data -> "error" (default), "default" (replace by
      `default`) or "keep".
    """

    name: str
    dim: int = 1
    default: float = 0.0
    dtype: str = "float32"
    column: str | None = None
    nonfinite: str = "error"

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"FixedLenFeature {self.name!r}: dim must be >= 1, got {self.dim}")
        if self.dtype not in ("float32", "int64"):
            raise ValueError(f"FixedLenFeature {self.name!r}: dtype must be float32 or int64, got {self.dtype!r}")
        if self.nonfinite not in ("error", "default", "keep"):
            raise ValueError(f"FixedLenFeature {self.name!r}: nonfinite must be error|default|keep")

    @property
    def source(self) -> str:
        return self.column or self.name


@dataclasses.dataclass(frozen=True)
class VarLenFeature:
    """A variable-length input: a `Ragged` per batch.

    name: output name (and source column unless `column` is set).
    dtype: "int64" (IDs), "float32" (float lists) or "bytes" (strings left unhashed, a
      numpy object array of bytes, for a host-side feature Hash op).
    hash_type: "farm" | "murmur" hashes string / string-list columns on the host; None
      means the column must be integer (strings are then an error).
    hash_bucket: as RecIS: 0 -> h & (2**63 - 1); b > 0 -> uint64(h) % b; None keeps
      all 64 bits.
    weight_column: optional list<float> column with the same row lengths -> weights.
    """

    name: str
    dtype: str = "int64"
    hash_type: str | None = None
    hash_bucket: int | None = 0
    column: str | None = None
    weight_column: str | None = None

    def __post_init__(self):
        if self.dtype not in ("int64", "float32", "bytes"):
            raise ValueError(f"VarLenFeature {self.name!r}: dtype must be int64, float32 or bytes, got {self.dtype!r}")
        if self.hash_type is not None and self.hash_type not in HASH_TYPES:
            raise ValueError(f"VarLenFeature {self.name!r}: hash_type must be one of {HASH_TYPES} or None")
        if self.hash_bucket is not None and self.hash_bucket < 0:
            raise ValueError(f"VarLenFeature {self.name!r}: hash_bucket must be >= 0 or None")

    @property
    def source(self) -> str:
        return self.column or self.name


Feature = FixedLenFeature | VarLenFeature


def source_columns(features: list[Feature]) -> list[str]:
    """The file columns a feature list reads, in first-use order."""
    cols: list[str] = []
    for f in features:
        for c in (f.source, getattr(f, "weight_column", None)):
            if c and c not in cols:
                cols.append(c)
    return cols


def check_schema(features: list[Feature], schema: pa.Schema, path: str) -> None:
    """Fails early, naming the file and column, if a column is absent or of a type the
    feature cannot take."""
    for f in features:
        for col in (f.source, getattr(f, "weight_column", None)):
            if col is None:
                continue
            if schema.get_field_index(col) < 0:
                raise DataError(f"{path}: column {col!r} (feature {f.name!r}) not in file; "
                                f"columns are {schema.names}")
            _leaf_kind(f, col, schema.field(col).type, path)


def _leaf_type(t: pa.DataType) -> tuple[pa.DataType, int]:
    depth = 0
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        t, depth = t.value_type, depth + 1
    return t, depth


def _is_string(t) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _leaf_kind(f: Feature, col: str, t: pa.DataType, path: str) -> str:
    """Validates a column type for a feature; returns "int", "uint", "float" or "string"."""
    leaf, depth = _leaf_type(t)
    where = f"{path}: column {col!r} (feature {f.name!r})"
    if pa.types.is_unsigned_integer(leaf):
        kind = "uint"
    elif pa.types.is_integer(leaf) or pa.types.is_boolean(leaf):
        kind = "int"
    elif pa.types.is_floating(leaf):
        kind = "float"
    elif _is_string(leaf):
        kind = "string"
    else:
        raise DataError(f"{where}: unsupported type {t}")
    if isinstance(f, FixedLenFeature) or col == getattr(f, "weight_column", None):
        if kind == "string":
            raise DataError(f"{where}: is {t}, a string column where numbers are expected")
        if depth > 1:
            raise DataError(f"{where}: is {t}; a dense feature takes a number or a list of numbers")
    elif f.dtype == "int64":
        if kind == "float":
            raise DataError(f"{where}: is {t}; float values cannot be IDs without losing bits "
                            "(store them as integers, or read them as dtype='float32')")
        if kind == "string" and f.hash_type is None:
            raise DataError(f"{where}: is {t}, a string column; set hash_type='farm' or 'murmur' "
                            "(or dtype='bytes' to hash later)")
        if depth > 2:
            raise DataError(f"{where}: is {t}; at most lists of lists are supported")
    elif f.dtype == "float32" and kind == "string":
        raise DataError(f"{where}: is {t}, a string column where floats are expected")
    elif f.dtype == "bytes" and kind != "string":
        raise DataError(f"{where}: is {t}; dtype='bytes' needs a string column")
    return kind


def convert_column(f: Feature, table: pa.Table, path: str, row_base: int):
    """Converts one feature's column(s) of a table to its batch form.

    Returns np.ndarray [n, dim] (FixedLenFeature) or a host Ragged with exact capacity
    (VarLenFeature). `row_base` (the table's first row within its file) makes error
    messages point at the file row.
    """
    col = table.column(f.source)
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    kind = _leaf_kind(f, f.source, arr.type, path)
    where = f"{path}: column {f.source!r} (feature {f.name!r})"
    if isinstance(f, FixedLenFeature):
        return _fixed(f, arr, kind, where, row_base)
    r = _varlen(f, arr, kind, where)
    if f.weight_column:
        r = _attach_weights(f, r, table, path, row_base)
    return r


def _fixed(f: FixedLenFeature, arr: pa.Array, kind: str, where: str, row_base: int) -> np.ndarray:
    n = len(arr)
    dt = np.float32 if f.dtype == "float32" else np.int64
    if _leaf_type(arr.type)[1] == 0:
        if f.dim != 1:
            raise DataError(f"{where}: is a scalar column but the feature has dim {f.dim}")
        missing = _null_mask(arr)
        vals = _numeric_numpy(arr.fill_null(0) if arr.null_count else arr, kind)
        out = vals.reshape(n, 1)
        lengths = np.where(missing, 0, 1)
    else:
        lengths = np.asarray(arr.value_lengths().fill_null(0), np.int64)
        bad = np.flatnonzero((lengths != 0) & (lengths != f.dim))
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{where}: row {row_base + i} has {lengths[i]} values, expected {f.dim} "
                            f"(or none for missing); {bad.size} such rows")
        child = arr.flatten()
        if child.null_count:
            raise DataError(f"{where}: {child.null_count} null values inside lists")
        vals = _numeric_numpy(child, kind)
        out = np.zeros((n, f.dim), vals.dtype)
        out[lengths == f.dim] = vals.reshape(-1, f.dim)
    out = out.astype(dt, copy=False)
    missing_rows = lengths == 0
    if f.dtype == "float32":
        nonfinite = ~np.isfinite(out)
        if nonfinite.any():
            if f.nonfinite == "error":
                i = int(np.flatnonzero(nonfinite.any(axis=1))[0])
                raise DataError(f"{where}: non-finite value {out[i][nonfinite[i]][0]} at row {row_base + i} "
                                "(set nonfinite='default' or 'keep' to accept it)")
            if f.nonfinite == "default":
                out = np.where(nonfinite, np.float32(f.default), out)
    if missing_rows.any():
        out = out.copy() if not out.flags.writeable else out
        out[missing_rows] = f.default
    return out


def _null_mask(arr: pa.Array) -> np.ndarray:
    if not arr.null_count:
        return np.zeros(len(arr), bool)
    return np.asarray(arr.is_null())


def _numeric_numpy(arr: pa.Array, kind: str) -> np.ndarray:
    vals = arr.to_numpy(zero_copy_only=False)
    if kind == "uint" and vals.dtype == np.uint64:
        return vals.view(np.int64)  # exact 64-bit pattern; never through float
    if vals.dtype == bool:
        return vals.astype(np.int64)
    return vals


def _varlen(f: VarLenFeature, arr: pa.Array, kind: str, where: str) -> Ragged:
    if _leaf_type(arr.type)[1] == 0:
        # A scalar column: one value per row, null -> empty row.
        n = len(arr)
        valid = ~_null_mask(arr)
        offsets = np.concatenate([[0], np.cumsum(valid)]).astype(np.int32)
        arr = pa.ListArray.from_arrays(pa.array(offsets), arr.filter(pa.array(valid)) if arr.null_count else arr)
        assert len(arr) == n

    def values_fn(child: pa.Array) -> np.ndarray:
        if child.null_count:
            raise DataError(f"{where}: {child.null_count} null values inside lists")
        if kind == "string":
            if f.dtype == "bytes":
                return np.asarray(child.cast(pa.binary()).to_pylist(), dtype=object)
            from recis_jax.features.string_hash import apply_buckets, hash_strings
            return apply_buckets(hash_strings(child, f.hash_type), f.hash_bucket)
        vals = _numeric_numpy(child, kind)
        return vals.astype(np.float32 if f.dtype == "float32" else np.int64, copy=False)

    try:
        return Ragged.from_arrow(arr, values_fn=values_fn)
    except ValueError as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: {e}") from None


def _attach_weights(f: VarLenFeature, r: Ragged, table: pa.Table, path: str, row_base: int) -> Ragged:
    wf = VarLenFeature(f.name, dtype="float32", column=f.weight_column)
    w = _varlen(wf, table.column(f.weight_column).combine_chunks(), "float",
                f"{path}: column {f.weight_column!r} (weights of feature {f.name!r})")
    if r.ragged_rank != 1:
        raise DataError(f"{path}: feature {f.name!r}: weights need a 1-level list column")
    diff = np.flatnonzero(np.asarray(r.row_lengths()) != np.asarray(w.row_lengths()))
    if diff.size:
        i = int(diff[0])
        raise DataError(f"{path}: columns {f.source!r} and {f.weight_column!r} differ in length at row "
                        f"{row_base + i} ({int(r.row_lengths()[i])} ids vs {int(w.row_lengths()[i])} weights)")
    return Ragged(r.values, r.row_splits, w.values.astype(np.float32, copy=False))
