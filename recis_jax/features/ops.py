"""Declarative feature ops with RecIS's names and keyword arguments, and `Feature`.

A `Feature` is a name plus a chain of ops: it starts with `SelectField` (one input
column) or `SelectFields` (several, for `FeatureCross`), then transforms:

    Feature("user_id").add_op(SelectField("user_id")).add_op(Mod(100_000))
    Feature("age_bucket", [SelectField("age"), FillMissing(0.0), Bucketize([18, 25, 35])])
    Feature("u_x_i", [SelectFields(["user_id", "item_id"]), FeatureCross(), Mod(10**6)])

Parameters are checked when an op joins a feature (`Feature(...)` or `add_op`), so a
bad value raises ValueError naming the feature; input dtypes are checked when the engine
first traces, raising TypeError naming the feature and its input column.

Ops work on the innermost values of their input: a dense array of any shape, a Ragged
(its padding stays zero), or a 2-level Ragged. Elementwise ops (`ValueOp`) also define
how to run several features' ops of the same kind as one call (see `FeatureEngine`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from recis_jax.features import functional as F
from recis_jax.ragged import Ragged


@dataclasses.dataclass(frozen=True)
class Context:
    """Where an op runs, for error messages: the feature and its input column(s)."""

    feature: str
    inputs: tuple[str, ...]

    def __str__(self) -> str:
        cols = ", ".join(repr(c) for c in self.inputs)
        return f"feature {self.feature!r} (input {cols})"


class Op:
    """Base of all ops. Subclasses are frozen dataclasses holding static parameters."""

    def validate(self, feature: str) -> None:
        """Raises ValueError naming `feature` if a parameter is bad."""

    def _fail(self, feature: str, msg: str):
        raise ValueError(f"feature {feature!r}: {type(self).__name__}: {msg}")


# -- structure helpers: ops transform the innermost values ----------------------------
def innermost(value) -> jax.Array:
    """The innermost values array of a dense array or a (nested) Ragged."""
    return value.flat_values if isinstance(value, Ragged) else value


def live_mask(value):
    """Innermost live-slot mask of a Ragged, None for a dense array."""
    if not isinstance(value, Ragged):
        return None
    while isinstance(value.values, Ragged):
        value = value.values
    return value.value_mask()


def replace_innermost(value, new):
    """`value` with its innermost values replaced by `new` (same shape); a Ragged's
    padding slots are set to zero, keeping the Ragged invariant."""
    if not isinstance(value, Ragged):
        return new
    if isinstance(value.values, Ragged):
        return Ragged(replace_innermost(value.values, new), value.row_splits, value.weights)
    return Ragged(jnp.where(value.value_mask(), new, jnp.zeros((), new.dtype)), value.row_splits, value.weights)


def value_dtype(value) -> np.dtype:
    """dtype of the innermost values (object for a pyarrow array)."""
    x = innermost(value)
    if isinstance(x, pa.Array):
        return np.dtype(object)
    return np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)


def _is_int(dtype: np.dtype) -> bool:
    return dtype != np.bool_ and np.issubdtype(dtype, np.integer)


def _is_real(dtype: np.dtype) -> bool:
    return _is_int(dtype) or np.issubdtype(dtype, np.floating)


def is_string_dtype(dtype: np.dtype) -> bool:
    return dtype == object or dtype.kind in "SU"


# -- inputs -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SelectField(Op):
    """Reads one input column (the first op of a feature).

    Args:
      name: the column in the batch dict.
      dtype: optional expected dtype of the (innermost) values, checked at trace.
      dim: optional RecIS rank: 2 for lists of IDs (1-level Ragged), 3 for lists of
        lists (2-level Ragged); checked at trace for Ragged inputs.
    """

    name: str
    dtype: Any = None
    dim: int | None = None

    def validate(self, feature):
        if not isinstance(self.name, str) or not self.name:
            self._fail(feature, f"name must be a non-empty str, got {self.name!r}")
        if self.dim is not None and self.dim not in (1, 2, 3):
            self._fail(feature, f"dim must be 1, 2 or 3, got {self.dim!r}")
        if self.dtype is not None:
            try:
                np.dtype(self.dtype)
            except TypeError:
                self._fail(feature, f"dtype {self.dtype!r} is not a numpy dtype")

    def check(self, value, ctx: Context) -> None:
        """TypeError naming the feature if the column's dtype or rank is not as declared."""
        if self.dtype is not None and value_dtype(value) != np.dtype(self.dtype):
            raise TypeError(f"{ctx}: SelectField expects dtype {np.dtype(self.dtype)}, got {value_dtype(value)}")
        if self.dim is not None and isinstance(value, Ragged) and value.ragged_rank + 1 != self.dim:
            raise TypeError(f"{ctx}: SelectField dim={self.dim} expects a Ragged of ragged_rank "
                            f"{self.dim - 1}, got ragged_rank {value.ragged_rank}")


@dataclasses.dataclass(frozen=True)
class SelectFields(Op):
    """Reads several columns as a list (RecIS takes a list of SelectField; plain column
    names are accepted too). Its only consumer is `FeatureCross`, which takes two."""

    input_list: tuple

    def __init__(self, input_list: Sequence):
        items = tuple(SelectField(x) if isinstance(x, str) else x for x in input_list)
        object.__setattr__(self, "input_list", items)

    def validate(self, feature):
        if len(self.input_list) < 1:
            self._fail(feature, "needs at least one field")
        for x in self.input_list:
            if not isinstance(x, SelectField):
                self._fail(feature, f"items must be SelectField or column names, got {x!r}")
            x.validate(feature)


# -- host op ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Hash(Op):
    """Hashes string IDs to int64 (RecIS Hash): "farm" = farmhash Fingerprint64,
    "murmur" = MurmurHash64A seed 0, the unsigned hash reinterpreted as int64.

    JAX has no strings, so this op runs on the host, in `FeatureEngine.host_transform`
    (vectorised numpy/pyarrow); it must come right after `SelectField`.
    """

    hash_type: str = "farm"

    def validate(self, feature):
        if self.hash_type not in F.HASH_KINDS:
            self._fail(feature, f"hash_type must be one of {F.HASH_KINDS}, got {self.hash_type!r}")

    def host_apply(self, value, ctx: Context):
        """Hashes a host column: a Ragged of strings (numpy object/bytes values or a
        pyarrow array), a pyarrow (list of) string array, or an array/list of strings.
        Returns the same structure with int64 values (a Ragged keeps row_splits,
        weights and capacity; padding hashes to 0)."""
        if isinstance(value, (pa.ChunkedArray, pa.Array)) and (
            pa.types.is_list(value.type) or pa.types.is_large_list(value.type)
        ):
            value = Ragged.from_arrow(value)
        if isinstance(value, Ragged):
            if isinstance(value.values, Ragged):
                return Ragged(self.host_apply(value.values, ctx), value.row_splits, value.weights)
            n = int(np.asarray(value.row_splits)[-1])
            live = value.values[:n] if isinstance(value.values, pa.Array) else np.asarray(value.values, object)[:n]
            out = np.zeros(value.capacity, np.int64)
            out[:n] = self._hash(live, ctx)
            return Ragged(out, np.asarray(value.row_splits), value.weights)
        if isinstance(value, (list, tuple)):
            value = np.asarray(value, dtype=object)
        return self._hash(value, ctx)

    def _hash(self, values, ctx):
        dtype = np.dtype(object) if isinstance(values, (pa.Array, pa.ChunkedArray)) else values.dtype
        if not is_string_dtype(dtype):
            raise TypeError(f"{ctx}: Hash expects strings (bytes or str), got dtype {dtype}")
        return F.hash_strings(values, self.hash_type)


# -- elementwise ops ------------------------------------------------------------------------
class ValueOp(Op):
    """An elementwise op on the innermost values, with static parameters.

    `compute(x, *params)` is one function used two ways: per feature with the op's own
    Python scalars (`params()`), which the compiler specialises (a remainder by a
    constant compiles to vector multiplies, no divide), or fused over several
    features' concatenated values with one parameter per value. Ops whose `fuse_key`
    agree can share one call.
    """

    input_kind: ClassVar[str] = "int"  # "int" | "real": accepted input dtypes
    # Whether FeatureEngine(fuse=None) fuses this kind: set from benchmarks/features.py
    # on CPU, where constant parameters per feature beat per-value parameter arrays.
    fuse_by_default: ClassVar[bool] = False

    def params(self) -> tuple:
        return ()

    def param_dtypes(self) -> tuple:
        return ()

    def compute(self, x: jax.Array, *params):
        raise NotImplementedError

    def check(self, value, ctx: Context) -> None:
        """TypeError naming the feature unless the input's dtype suits the op."""
        if isinstance(value, list):
            raise TypeError(f"{ctx}: {type(self).__name__} takes one input, got a list of {len(value)} (SelectFields)")
        dtype = value_dtype(value)
        ok = _is_int(dtype) if self.input_kind == "int" else _is_real(dtype)
        if not ok:
            want = "integer IDs" if self.input_kind == "int" else "a real numeric input"
            hint = " (strings need Hash first)" if is_string_dtype(dtype) else ""
            raise TypeError(f"{ctx}: {type(self).__name__} expects {want}, got dtype {dtype}{hint}")

    def fuse_key(self, value) -> tuple:
        """Ops with equal keys can run as one call over concatenated values."""
        return (type(self), value_dtype(value))

    def apply(self, value, ctx: Context):
        """Runs the op on one feature's value (dense or Ragged)."""
        self.check(value, ctx)
        out = self.compute(jnp.asarray(innermost(value)), *self.params())
        return self.rebuild(value, out)

    def rebuild(self, value, out):
        """Puts computed innermost values back into the input's structure (a dict of
        them for several outputs)."""
        if isinstance(out, tuple):
            return {k: replace_innermost(value, o) for k, o in zip(self.output_names(), out)}
        return replace_innermost(value, out)

    def output_names(self) -> tuple[str, ...]:
        """Names of several outputs (IDMultiHash: `{prefix}_{j}`); () for one output."""
        return ()

    @classmethod
    def apply_fused(cls, ops: Sequence["ValueOp"], values: Sequence, ctxs: Sequence[Context]) -> list:
        """Runs ops of one fuse_key over the concatenation of their features' values:
        one `compute` call with per-value parameter arrays, then splits the result."""
        for op, v, c in zip(ops, values, ctxs):
            op.check(v, c)
        flats = [jnp.asarray(innermost(v)).reshape(-1) for v in values]
        sizes = [f.shape[0] for f in flats]
        x = jnp.concatenate(flats)
        per_value = [
            jnp.concatenate([jnp.full((n,), op.params()[i], dt) for op, n in zip(ops, sizes)])
            for i, dt in enumerate(ops[0].param_dtypes())
        ]
        out = ops[0].compute(x, *per_value)
        return _split_rebuild(ops, values, out, sizes)


def _split_rebuild(ops, values, out, sizes) -> list:
    """Splits fused flat outputs back per feature and restores each one's structure."""
    outs = out if isinstance(out, tuple) else (out,)
    bounds = np.cumsum([0] + list(sizes))
    result = []
    for k, (op, v) in enumerate(zip(ops, values)):
        shape = jnp.shape(innermost(v))
        parts = tuple(o[bounds[k]:bounds[k + 1]].reshape(shape) for o in outs)
        result.append(op.rebuild(v, parts if isinstance(out, tuple) else parts[0]))
    return result


@dataclasses.dataclass(frozen=True)
class Mod(ValueOp):
    """int64(uint64(x) % mod_value) (RecIS Mod): negative IDs count as unsigned."""

    mod_value: int

    def validate(self, feature):
        try:
            F.check_modulus(self.mod_value, "mod_value")
        except ValueError as e:
            self._fail(feature, str(e))

    def params(self):
        return (int(self.mod_value),)

    def param_dtypes(self):
        return (jnp.int64,)

    def compute(self, x, m):
        return F.mod(x, m)


@dataclasses.dataclass(frozen=True)
class Bucketize(ValueOp):
    """Bucket ID of a numeric input: searchsorted(boundary, x, side="right") as int64;
    a value equal to a boundary goes up, NaN goes to len(boundary) (RecIS Bucketize).
    `boundary` must be sorted and finite."""

    boundary: tuple
    input_kind: ClassVar[str] = "real"
    # Fused measured ~1.3x faster than per feature on CPU (benchmarks/results/
    # features_cpu.md), but only through its search: the same branchless search run per
    # feature is as fast. Per feature goes through pallas_kernels.bucketize (the Pallas
    # kernel on GPU), so revisit this if its reference or GPU numbers change.
    fuse_by_default: ClassVar[bool] = True

    def __init__(self, boundary: Sequence[float]):
        vals = boundary.tolist() if isinstance(boundary, np.ndarray) else list(boundary)
        # floats when numeric (hashable, exact); anything else is kept for validate to reject
        b = tuple(float(v) if isinstance(v, (int, float, np.number)) else v for v in vals)
        object.__setattr__(self, "boundary", b)

    def validate(self, feature):
        try:
            F.check_boundaries(self.boundary, "boundary")
        except ValueError as e:
            self._fail(feature, str(e))

    def compute(self, x):
        return F.bucketize(x, self.boundary).astype(jnp.int64)

    def fuse_key(self, value):
        # Integer inputs stay per feature: they compare exactly against int64
        # ceil(boundary), which a float table cannot hold.
        dtype = value_dtype(value)
        return (type(self), dtype) if np.issubdtype(dtype, np.floating) else None

    @classmethod
    def apply_fused(cls, ops, values, ctxs):
        """One binary search for all features: boundaries in a [G, P] table padded with
        +inf (P a power of two > every count), each value searching its own row."""
        for op, v, c in zip(ops, values, ctxs):
            op.check(v, c)
        flats = [jnp.asarray(innermost(v)).reshape(-1) for v in values]
        sizes = [f.shape[0] for f in flats]
        x = F.check_real(jnp.concatenate(flats), "bucketize")
        counts = np.array([len(op.boundary) for op in ops])
        width = 1 << int(counts.max()).bit_length()  # > max count: a +inf always follows
        table = np.full((len(ops), width), np.inf)
        for g, op in enumerate(ops):
            table[g, : counts[g]] = op.boundary
        table = jnp.asarray(table.reshape(-1), x.dtype)
        row = jnp.concatenate([jnp.full((n,), g, jnp.int32) for g, n in enumerate(sizes)])
        base = row * width
        n = jnp.asarray(counts, jnp.int32)[row]
        count = jnp.zeros(x.shape, jnp.int32)
        step = width // 2
        while step:  # count = number of row entries <= x, found bit by bit
            probe = table[base + count + step - 1]
            count = jnp.where(probe <= x, count + step, count)
            step //= 2
        # +inf padding counts only for x = +inf; NaN compares false everywhere.
        out = jnp.where(jnp.isnan(x), n, jnp.minimum(count, n)).astype(jnp.int64)
        return _split_rebuild(ops, values, out, sizes)


@dataclasses.dataclass(frozen=True)
class IDMultiHash(ValueOp):
    """Up to 4 hashes of an int64 ID into num_buckets[j] buckets (RecIS IDMultiHash):
    h_j = (((x * mul_j) rem p_j) + p_j) rem p_j rem n_j, mul = [1, 3, 5, 7], p_j the
    largest prime <= [29, 47, 67, 83][j] * n_j. Outputs `{feature}_{prefix}_{j}`; it
    must be the last op of its feature."""

    num_buckets: tuple
    prefix: str = "multi_hash"

    def __init__(self, num_buckets: Sequence[int], prefix: str = "multi_hash"):
        nb = tuple(num_buckets) if isinstance(num_buckets, (list, tuple, np.ndarray)) else num_buckets
        object.__setattr__(self, "num_buckets", nb)
        object.__setattr__(self, "prefix", prefix)

    def validate(self, feature):
        try:
            F.multi_hash_primes(self.num_buckets, "num_buckets")
        except ValueError as e:
            self._fail(feature, str(e))
        if not isinstance(self.prefix, str) or not self.prefix:
            self._fail(feature, f"prefix must be a non-empty str, got {self.prefix!r}")

    def params(self):
        primes = F.multi_hash_primes(self.num_buckets)
        return tuple(v for p, n in zip(primes, self.num_buckets) for v in (p, int(n)))

    def param_dtypes(self):
        return (jnp.int64,) * (2 * len(self.num_buckets))

    def compute(self, x, *pn):
        x = x.astype(jnp.int64)
        return tuple(F.multi_hash_one(x, F.MULTI_HASH_MULS[j], pn[2 * j], pn[2 * j + 1]) for j in range(len(pn) // 2))

    def output_names(self):
        return tuple(f"{self.prefix}_{j}" for j in range(len(self.num_buckets)))

    def fuse_key(self, value):
        return (type(self), value_dtype(value), len(self.num_buckets), self.prefix)


def _check_float(feature, op, name, v, allow_none=True):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
        op._fail(feature, f"{name} must be a finite number{' or None' if allow_none else ''}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class FillMissing(ValueOp):
    """Dense: NaN (a missing value) -> `value`; output float32."""

    value: float = 0.0
    input_kind: ClassVar[str] = "real"

    def validate(self, feature):
        _check_float(feature, self, "value", self.value, allow_none=False)

    def params(self):
        return (float(self.value),)

    def param_dtypes(self):
        return (jnp.float32,)

    def compute(self, x, v):
        return F.fill_missing(x, v)


@dataclasses.dataclass(frozen=True)
class Clip(ValueOp):
    """Dense: clip to [min_value, max_value] (None = open); output float32."""

    min_value: float | None = None
    max_value: float | None = None
    input_kind: ClassVar[str] = "real"

    def validate(self, feature):
        _check_float(feature, self, "min_value", self.min_value)
        _check_float(feature, self, "max_value", self.max_value)
        if self.min_value is not None and self.max_value is not None and self.min_value > self.max_value:
            self._fail(feature, f"min_value {self.min_value} > max_value {self.max_value}")

    def params(self):
        return tuple(float(v) for v in (self.min_value, self.max_value) if v is not None)

    def param_dtypes(self):
        return (jnp.float32,) * len(self.params())

    def _bounds(self, p):
        it = iter(p)
        lo = next(it) if self.min_value is not None else None
        hi = next(it) if self.max_value is not None else None
        return lo, hi

    def compute(self, x, *p):
        return F.clip(x, *self._bounds(p))

    def fuse_key(self, value):
        return (type(self), value_dtype(value), self.min_value is None, self.max_value is None)


@dataclasses.dataclass(frozen=True)
class Log1p(Clip):
    """Dense: log(1 + clip(x, min_value, max_value)); default floor 0; float32."""

    min_value: float | None = 0.0
    max_value: float | None = None

    def compute(self, x, *p):
        return F.log1p_clipped(x, *self._bounds(p))


@dataclasses.dataclass(frozen=True)
class Standardize(ValueOp):
    """Dense: (x - mean) / std with configured statistics (std > 0); float32."""

    mean: float = 0.0
    std: float = 1.0
    input_kind: ClassVar[str] = "real"

    def validate(self, feature):
        _check_float(feature, self, "mean", self.mean, allow_none=False)
        _check_float(feature, self, "std", self.std, allow_none=False)
        if self.std <= 0:
            self._fail(feature, f"std must be > 0, got {self.std}")

    def params(self):
        return (float(self.mean), float(self.std))

    def param_dtypes(self):
        return (jnp.float32, jnp.float32)

    def compute(self, x, mean, std):
        return F.standardize(x, mean, std)


# -- structural ops -------------------------------------------------------------------------
def _as_id_ragged(value, ctx: Context, name: str) -> Ragged:
    """A FeatureCross input as a 1-level int Ragged; dense [B] / [B, n] IDs are packed
    (every entry live)."""
    if not isinstance(value, Ragged):
        dtype = value_dtype(value)
        if not _is_int(dtype) or jnp.ndim(value) not in (1, 2):
            raise TypeError(f"{ctx}: FeatureCross input {name!r} must be a Ragged or a [B] / [B, n] "
                            f"integer array, got dtype {dtype} and shape {jnp.shape(value)}")
        value = jnp.asarray(value)
        return Ragged.from_dense(value.reshape(value.shape[0], -1))
    if value.ragged_rank != 1 or not _is_int(value_dtype(value)):
        raise TypeError(f"{ctx}: FeatureCross input {name!r} must hold integer IDs in a 1-level Ragged, "
                        f"got ragged_rank {value.ragged_rank} and dtype {value_dtype(value)}")
    return value


@dataclasses.dataclass(frozen=True)
class FeatureCross(Op):
    """Crosses two ID inputs from `SelectFields([x, y])` (RecIS FeatureCross): per row,
    distinct x IDs times distinct y IDs, id = MurmurHash64A(le64(x)||le64(y)), weight =
    w_x * w_y, ordered x ascending then y.

    Args:
      capacity: static output capacity. None: x.capacity * y.capacity, exact (B**2 for
        two single-valued features: set a capacity for large batches). An int: the
        engine reports the pair count the exact result needs under
        `outputs[OVERFLOW_KEY][feature]`; it overflowed iff that exceeds capacity.
    """

    capacity: int | None = None

    def validate(self, feature):
        if self.capacity is not None and (not F.is_int(self.capacity) or self.capacity < 0):
            self._fail(feature, f"capacity must be None or a non-negative int, got {self.capacity!r}")

    def apply(self, value, ctx: Context):
        """Returns (Ragged, needed); needed is None when the capacity is exact."""
        if not isinstance(value, list) or len(value) != 2:
            raise TypeError(f"{ctx}: FeatureCross needs exactly two inputs from SelectFields")
        x = _as_id_ragged(value[0], ctx, ctx.inputs[0])
        y = _as_id_ragged(value[1], ctx, ctx.inputs[1])
        if x.nrows != y.nrows:
            raise ValueError(f"feature {ctx.feature!r}: FeatureCross inputs {ctx.inputs[0]!r} ({x.nrows} rows) and "
                             f"{ctx.inputs[1]!r} ({y.nrows} rows) must have the same batch size")
        if self.capacity is None:
            return F.feature_cross(x, y), None
        return F.feature_cross_capped(x, y, int(self.capacity))


@dataclasses.dataclass(frozen=True)
class SequenceTruncate(Op):
    """Truncates sequences to `seq_len` items (RecIS SequenceTruncate).

    Args:
      seq_len: positive int.
      check_length: RecIS asserts no sequence exceeds seq_len; a data-dependent assert
        cannot run inside jit, so only False is accepted (kept for config parity).
      truncate: False makes the op a no-op (as in RecIS).
      truncate_side: "left" keeps the latest seq_len items, "right" the first.
      n_dims: 2 for a 1-level Ragged of IDs, 3 for a 2-level Ragged (each sequence
        then has exactly seq_len items, padded at the end with empty lists).
      dtype: optional expected values dtype, checked at trace.
    """

    seq_len: int = 64
    check_length: bool = False
    truncate: bool = True
    truncate_side: str = "left"
    n_dims: int = 2
    dtype: Any = None

    def validate(self, feature):
        if not F.is_int(self.seq_len) or self.seq_len <= 0:
            self._fail(feature, f"seq_len must be a positive int, got {self.seq_len!r}")
        if self.truncate_side not in ("left", "right"):
            self._fail(feature, f"truncate_side must be 'left' or 'right', got {self.truncate_side!r}")
        if self.n_dims not in (2, 3):
            self._fail(feature, f"n_dims must be 2 or 3, got {self.n_dims!r}")
        if self.check_length:
            self._fail(feature, "check_length=True is not supported: a data-dependent assert cannot run "
                                "inside jit (truncation already bounds the length)")

    def apply(self, value, ctx: Context):
        if not isinstance(value, Ragged) or value.ragged_rank != self.n_dims - 1:
            got = f"a Ragged of ragged_rank {value.ragged_rank}" if isinstance(value, Ragged) else type(value).__name__
            raise TypeError(f"{ctx}: SequenceTruncate(n_dims={self.n_dims}) expects a Ragged of ragged_rank "
                            f"{self.n_dims - 1}, got {got}")
        if self.dtype is not None and value_dtype(value) != np.dtype(self.dtype):
            raise TypeError(f"{ctx}: SequenceTruncate expects dtype {np.dtype(self.dtype)}, got {value_dtype(value)}")
        if not self.truncate:
            return value
        return F.sequence_truncate(value, int(self.seq_len), self.truncate_side)


# -- features -------------------------------------------------------------------------------
OPS = {cls.__name__: cls for cls in (SelectField, SelectFields, Hash, Mod, Bucketize, IDMultiHash, FeatureCross,
                                      SequenceTruncate, FillMissing, Clip, Log1p, Standardize)}


class Feature:
    """A named feature: a chain of ops starting with SelectField / SelectFields.

    `Feature(name, ops)` or RecIS style `Feature(name).add_op(op).add_op(op)`. Each op
    is validated as it joins (ValueError naming the feature), and so is the chain:
    selects only first, Hash right after a single SelectField, FeatureCross right after
    a two-field SelectFields, nothing after IDMultiHash.
    """

    def __init__(self, name: str, ops: Sequence[Op] = ()):
        if not isinstance(name, str) or not name:
            raise ValueError(f"Feature: name must be a non-empty str, got {name!r}")
        self.name = name
        self.ops: list[Op] = []
        for op in ops:
            self.add_op(op)

    def add_op(self, op: Op) -> "Feature":
        """Validates `op` in this chain and appends it; returns self for chaining."""
        where = f"feature {self.name!r}"
        if not isinstance(op, Op):
            raise ValueError(f"{where}: ops must be feature ops, got {op!r}")
        op.validate(self.name)
        prev = self.ops[-1] if self.ops else None
        is_select = isinstance(op, (SelectField, SelectFields))
        if prev is None and not is_select:
            raise ValueError(f"{where}: the first op must be SelectField or SelectFields, got {type(op).__name__}")
        if prev is not None and is_select:
            raise ValueError(f"{where}: {type(op).__name__} may only be the first op")
        if isinstance(op, Hash) and not isinstance(prev, SelectField):
            raise ValueError(f"{where}: Hash runs on the host and must come right after a single SelectField")
        if isinstance(op, FeatureCross) and not (isinstance(prev, SelectFields) and len(prev.input_list) == 2):
            raise ValueError(f"{where}: FeatureCross must come right after SelectFields of exactly two fields")
        if isinstance(prev, SelectFields) and not isinstance(op, FeatureCross):
            raise ValueError(f"{where}: SelectFields must be followed by FeatureCross, got {type(op).__name__}")
        if isinstance(prev, IDMultiHash):
            raise ValueError(f"{where}: IDMultiHash must be the last op (it has several outputs)")
        self.ops.append(op)
        return self

    def finish(self) -> "Feature":
        """Checks the chain is complete (called by the engine); returns self."""
        if not self.ops:
            raise ValueError(f"feature {self.name!r}: no ops (start with SelectField)")
        if isinstance(self.ops[-1], SelectFields):
            raise ValueError(f"feature {self.name!r}: SelectFields must be followed by FeatureCross")
        return self

    @property
    def inputs(self) -> tuple[str, ...]:
        """The input column names."""
        first = self.ops[0] if self.ops else None
        if isinstance(first, SelectFields):
            return tuple(s.name for s in first.input_list)
        return (first.name,) if first is not None else ()

    @classmethod
    def from_config(cls, config) -> "Feature":
        """From a dict / ConfigDict: {"name": str, "ops": [{"op": "Mod", "mod_value": 10}, ...]}.

        SelectFields takes {"op": "SelectFields", "input_list": ["a", "b"]}.
        """
        ops = []
        for i, spec in enumerate(config["ops"]):
            spec = dict(spec)
            kind = spec.pop("op", None)
            if kind not in OPS:
                raise ValueError(f"feature {config['name']!r}: ops[{i}] has unknown op {kind!r}; known: {sorted(OPS)}")
            try:
                ops.append(OPS[kind](**spec))
            except TypeError as e:
                raise ValueError(f"feature {config['name']!r}: ops[{i}] ({kind}): {e}") from None
        return cls(config["name"], ops)

    def __repr__(self) -> str:
        return f"Feature({self.name!r}, {self.ops!r})"
