"""Sparse optimizers: update only the embedding rows a step touched.

An embedding table keeps its rows in a slab, `embedding [R, dim]` (float32, or bfloat16
storage), with optimizer slots aligned row by row (`m [R, dim]`, `acc [R]`, ...). A
lookup step yields the unique touched row ids `rows [U]`, their summed gradients
`row_grads [U, dim]` and a lane mask `mask [U]` (the buffers have a static capacity U,
so trailing lanes are padding). An optimizer here gathers the U rows and their slots,
computes in float32 and scatters them back: the work is proportional to U, never to R,
and under buffer donation the scatters are in place. A fused Pallas-Triton kernel
(pallas_kernels/sparse_update.py: each touched row and its slots read once and written
once, same per-row math) is the default on GPU (FUSED_UPDATE_BY_DEFAULT): on an H100 it
ran at 0.90-0.96 of copy bandwidth, 1.9x the XLA path and 4.7-6.3x eager torch
(benchmarks/results/ops_sparse_update_h100.md). The optimizers know nothing about
the hashtable; they see the slab and row indices only.

Each factory returns a `SparseOptimizer(init, apply, slot_names, reset)`:

    slots = opt.init(num_rows, dim, storage_dtype)
    embedding, slots = opt.apply(embedding, slots, rows, row_grads, mask, step,
                                 lr_step=global_step)

Steps. `step` is the table's own step counter *after* its increment (t >= 1); the Adam
bias correction uses it, so a table that joins training late, or is touched on every
step, gets the correction for the number of updates it has actually had (RecIS's
counter never advanced). A learning-rate schedule is a function of the *global* step,
shared with the dense optimizer: pass it as `lr_step`. Without `lr_step` the schedule
is evaluated at `step`. The schedule receives the step as a float32 scalar (exact up to
2**24 steps): optax schedules given an int32 count compute in float64 under x64 (e.g.
`cosine_decay_schedule`), and nothing on the device may be float64. A caller that
already has the learning rate (one value for the whole model) passes `lr=` instead,
which overrides the schedule.

Masks. Lanes with mask False are never read or written: their scatter index points at a
distinct out-of-range row (R + lane), which the scatter drops, so padding lanes may hold
any row id, including one a live lane uses or a negative one. A masked-True row id
outside [0, R) is dropped too (never wrapped). Row ids must be unique among the
masked-True lanes (the caller dedups); that uniqueness is what allows the
`unique_indices` hint, which lets XLA write the rows without atomics.

Non-finite gradients. A touched row whose gradient holds a NaN or an infinity is left
unchanged (embedding and slots), as if its lane were masked: writing it would poison the
row and its moments forever. `nonfinite_rows(row_grads, mask)` counts those rows so the
caller can report them (or stop); `apply` itself does not fail.

Precision. All math is in float32, whatever the storage dtype: rows are cast up after
the gather and cast back (round to nearest) before the scatter. Slots are always
float32: in bfloat16 (8 mantissa bits) `v = 0.999 v + 0.001 g^2` stops moving.

Per-row clipping. With `clip_norm`, each row's gradient is scaled by
`min(1, clip_norm / ||g_row||_2)` before the update (after the non-finite check).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch, sparse_update
from pallas_kernels.sparse_update import clip_rows

Slots = dict[str, jax.Array]
# A float, or an optax-style schedule: a function of the (float32) step -> learning rate.
LearningRate = float | Callable[[jax.Array], Any]
# The per-row math: (p [U, dim] f32, slot rows {name: [U, dim] | [U]} f32, g [U, dim] f32,
# lr f32 [], t int32 []) -> (new p, new slot rows).
RowUpdate = Callable[[jax.Array, Slots, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Slots]]


class SlotSpec(NamedTuple):
    """One optimizer slot: `[R, dim]` (or `[R]` when `per_row`) float32, filled with `init`."""

    init: float
    per_row: bool = False


class SparseOptimizer(NamedTuple):
    """An optimizer for row slabs, updating only the rows a step touched (optax-style).

    Attributes:
      init: `(num_rows, dim, storage_dtype=float32) -> slots`, a dict of float32 arrays
        `[num_rows, dim]` (or `[num_rows]` for per-row slots), keyed by `slot_names`.
        `storage_dtype` is the embedding's dtype; the slots stay float32 regardless.
      apply: `(embedding, slots, rows, row_grads, mask, step, *, lr_step=None, lr=None)
        -> (embedding, slots)`; see the module docstring and `apply`'s own docstring.
      slot_names: the keys of `slots`, in a fixed order (for checkpoints).
      reset: `(slots, rows, mask) -> slots`, writing the initial slot values into
        `rows` (masked lanes dropped): for a row that is (re)assigned to a new ID.
    """

    init: Callable[..., Slots]
    apply: Callable[..., tuple[jax.Array, Slots]]
    slot_names: tuple[str, ...]
    reset: Callable[[Slots, jax.Array, jax.Array], Slots]


def nonfinite_rows(row_grads: jax.Array, mask: jax.Array) -> jax.Array:
    """The number of live lanes whose gradient has a NaN or an infinity.

    Args:
      row_grads: `[U, dim]` gradients of the touched rows (any float dtype).
      mask: `[U]` bool, True for live lanes.

    Returns:
      An int32 scalar. `apply` leaves exactly these rows unchanged.
    """
    bad = jnp.logical_not(jnp.all(jnp.isfinite(row_grads), axis=-1))
    return jnp.sum(jnp.logical_and(mask, bad), dtype=jnp.int32)


def learning_rate_at(learning_rate: LearningRate, count: jax.Array) -> jax.Array:
    """`learning_rate` as a float32 scalar, a schedule evaluated at `count` (as float32)."""
    if callable(learning_rate):
        # A float32 count keeps optax schedules in float32 (an int count makes some of
        # them, e.g. cosine_decay_schedule, compute in float64 under x64).
        return jnp.asarray(learning_rate(jnp.asarray(count).astype(jnp.float32)), jnp.float32)
    return jnp.asarray(learning_rate, jnp.float32)


# Whether `apply` takes the fused Pallas kernel by default on GPU. Off until a GPU
# benchmark shows it is not slower than this XLA path (benchmarks/ops.py --ops sparse,
# section "update": H100, 1M touched rows of 8M, Adam d64 715 us vs 1380 us XLA).
# False keeps XLA unless asked per call (`impl=`) or by RECIS_KERNELS.
FUSED_UPDATE_BY_DEFAULT = True


def _update_impl(impl: str | None) -> str | None:
    if impl is not None or FUSED_UPDATE_BY_DEFAULT:
        return impl
    if os.environ.get(dispatch.ENV_VAR, "auto").strip().lower() != "auto":
        return None  # an explicit RECIS_KERNELS choice applies
    return "reference"


# The gather/scatter helpers and clip_rows live beside the fused kernel, so that its
# reference path (the XLA formulation) is these exact ops.
_row_index = sparse_update.row_index
_gather = sparse_update.gather_rows
_scatter = sparse_update.scatter_rows


def _check_positive(name: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if not (value > 0 or (allow_zero and value == 0)) or not math.isfinite(value):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value}")


def _build(
    learning_rate: LearningRate,
    specs: dict[str, SlotSpec],
    row_update: RowUpdate,
    clip_norm: float | None,
) -> SparseOptimizer:
    """A SparseOptimizer from its slots and per-row math; gathers, masks and scatters."""
    if not callable(learning_rate):
        _check_positive("lr", float(learning_rate), allow_zero=True)
    _check_positive("clip_norm", clip_norm)
    slot_names = tuple(specs)

    def init(num_rows: int, dim: int, dtype: Any = jnp.float32) -> Slots:
        if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
            raise ValueError(f"embedding storage dtype must be floating, got {dtype}")
        return {
            name: jnp.full((num_rows,) if s.per_row else (num_rows, dim), s.init, jnp.float32)
            for name, s in specs.items()
        }

    def reset(slots: Slots, rows: jax.Array, mask: jax.Array) -> Slots:
        out = dict(slots)
        for name, s in specs.items():
            index = _row_index(rows, mask, slots[name].shape[0])
            fill = jnp.full((rows.shape[0],) + slots[name].shape[1:], s.init, jnp.float32)
            out[name] = _scatter(slots[name], index, fill)
        return out

    def apply(
        embedding: jax.Array,
        slots: Slots,
        rows: jax.Array,
        row_grads: jax.Array,
        mask: jax.Array,
        step: jax.Array | int,
        *,
        lr_step: jax.Array | int | None = None,
        lr: jax.Array | float | None = None,
        count_nonfinite: bool = False,
        impl: str | None = None,
    ):
        """Update the touched rows of `embedding` and `slots`; all other rows untouched.

        Args:
          embedding: `[R, dim]` float32 or bfloat16 (donate it for an in-place update).
          slots: from `init` (donate them too).
          rows: `[U]` int32 row ids; unique among the lanes where `mask` is True.
          row_grads: `[U, dim]` summed gradient per row (cast to float32), or a
            `SegmentGrads` (pallas_kernels.sparse_update) giving them as segment sums,
            which the fused kernel adds up where it updates each row.
          mask: `[U]` bool; False lanes are neither read nor written.
          step: int32 scalar, the table's step counter after its increment (t >= 1);
            used for the bias correction.
          lr_step: the step a learning-rate schedule is evaluated at (the global step);
            defaults to `step`. Ignored for a constant learning rate.
          lr: a learning rate (float32 scalar) that overrides the factory's.
          count_nonfinite: also return `nonfinite_rows(row_grads, mask)`, counted by
            the update itself (the fused kernel reads each gradient once).
          impl: "reference" (XLA) | "pallas" (the fused kernel, GPU) | "interpret"; the
            default follows the backend (the kernel on a GPU; FUSED_UPDATE_BY_DEFAULT).

        Returns:
          `(embedding, slots)`, same shapes and dtypes, or `(embedding, slots,
          nonfinite)` with count_nonfinite. Rows whose gradient is not finite are
          left unchanged.
        """
        if lr is not None:
            lr_value = jnp.asarray(lr, jnp.float32)
        else:
            lr_value = learning_rate_at(learning_rate, step if lr_step is None else lr_step)
        t = jnp.asarray(step, jnp.int32)
        # Gather, per-row math, scatter in XLA; or one fused Pallas kernel that reads and
        # writes each touched row and its slots once (pallas_kernels/sparse_update.py).
        return sparse_update.sparse_update(
            row_update, embedding, {name: slots[name] for name in slot_names}, rows, row_grads,
            mask, lr_value, t, clip_norm=clip_norm, count_nonfinite=count_nonfinite,
            impl=_update_impl(impl))

    return SparseOptimizer(init=init, apply=apply, slot_names=slot_names, reset=reset)


def _one_minus_pow(b: float, t: jax.Array) -> jax.Array:
    """`1 - b**t` in float32 for int32 t >= 1, as `-expm1(t log b)`.

    The direct form loses digits when b**t is near 1 (b2 = 0.999 at small t: 1 - b2 is
    1e-3 and float32's 0.999 is off by 3e-8, a 3e-5 relative error in the step size).
    """
    if b == 0.0:
        return jnp.float32(1.0)
    return -jnp.expm1(t.astype(jnp.float32) * np.float32(math.log(b)))


def _adam_family(
    learning_rate: LearningRate,
    b1: float,
    b2: float,
    eps: float,
    decay: Callable[[jax.Array], jax.Array | float] | None,
    clip_norm: float | None,
) -> SparseOptimizer:
    for name, b in (("b1", b1), ("b2", b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {b}")
    _check_positive("eps", eps, allow_zero=True)

    def row_update(p, s, g, lr, t):
        if decay is not None:
            p = p * decay(lr)  # decoupled decay, applied before the Adam step
        m = b1 * s["m"] + (1.0 - b1) * g
        v = b2 * s["v"] + (1.0 - b2) * (g * g)
        step_size = lr * jnp.sqrt(_one_minus_pow(b2, t)) / _one_minus_pow(b1, t)
        p = p - step_size * (m / (jnp.sqrt(v) + eps))
        return p, {"m": m, "v": v}

    specs = {"m": SlotSpec(0.0), "v": SlotSpec(0.0)}
    return _build(learning_rate, specs, row_update, clip_norm)


def sparse_adam(
    lr: LearningRate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    clip_norm: float | None = None,
) -> SparseOptimizer:
    """Adam on touched rows, TensorFlow-style epsilon (RecIS `SparseAdam`).

    Per touched row, with g the row's summed gradient and t the table's step:

        m = b1 m + (1 - b1) g
        v = b2 v + (1 - b2) g^2
        p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

    eps is added to sqrt(v) before the bias correction is folded into the step size
    (TF's "epsilon hat"), which differs slightly from optax.adam's eps.

    Args:
      lr: a float, or a schedule evaluated at `apply`'s `lr_step` (default `step`).
      b1, b2: moment decay rates in [0, 1).
      eps: added to sqrt(v).
      clip_norm: if set, clip each row's gradient to this L2 norm first.

    Slots: `m`, `v`, both `[R, dim]` float32, initialised to 0.
    """
    return _adam_family(lr, b1, b2, eps, None, clip_norm)


def sparse_adamw(
    lr: LearningRate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    *,
    clip_norm: float | None = None,
) -> SparseOptimizer:
    """AdamW on touched rows (RecIS `SparseAdamW`): decay scaled by the learning rate.

    Per touched row (the decay multiplies p *before* the Adam step; untouched rows do
    not decay):

        p *= 1 - lr * weight_decay
        m = b1 m + (1 - b1) g
        v = b2 v + (1 - b2) g^2
        p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

    Args: as `sparse_adam`, plus `weight_decay` (>= 0).
    Slots: `m`, `v`, both `[R, dim]` float32, initialised to 0.
    """
    _check_positive("weight_decay", weight_decay, allow_zero=True)
    return _adam_family(lr, b1, b2, eps, lambda lr_: 1.0 - lr_ * weight_decay, clip_norm)


def sparse_adamw_tf(
    lr: LearningRate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    *,
    clip_norm: float | None = None,
) -> SparseOptimizer:
    """AdamW on touched rows, TF variant (RecIS `SparseAdamWTF`): decay not scaled by lr.

    Per touched row:

        p *= 1 - weight_decay
        m = b1 m + (1 - b1) g
        v = b2 v + (1 - b2) g^2
        p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

    Args: as `sparse_adam`, plus `weight_decay` in [0, 1].
    Slots: `m`, `v`, both `[R, dim]` float32, initialised to 0.
    """
    if not 0.0 <= weight_decay <= 1.0:
        raise ValueError(f"weight_decay must be in [0, 1], got {weight_decay}")
    return _adam_family(lr, b1, b2, eps, lambda lr_: 1.0 - weight_decay, clip_norm)


def sparse_adagrad(
    lr: LearningRate,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-10,
    *,
    clip_norm: float | None = None,
) -> SparseOptimizer:
    """Adagrad on touched rows, one accumulator per element.

    Per touched row:

        acc += g^2
        p -= lr * g / (sqrt(acc) + eps)

    Args:
      lr: a float or a schedule (see `sparse_adam`).
      initial_accumulator_value: the starting value of acc (>= 0).
      eps: added to sqrt(acc).
      clip_norm: if set, clip each row's gradient to this L2 norm first.

    Slots: `acc` `[R, dim]` float32, initialised to `initial_accumulator_value`.
    """
    _check_positive("initial_accumulator_value", initial_accumulator_value, allow_zero=True)
    _check_positive("eps", eps, allow_zero=True)

    def row_update(p, s, g, lr, t):
        del t
        acc = s["acc"] + g * g
        return p - lr * g / (jnp.sqrt(acc) + eps), {"acc": acc}

    return _build(lr, {"acc": SlotSpec(initial_accumulator_value)}, row_update, clip_norm)


def rowwise_adagrad(
    lr: LearningRate,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    *,
    clip_norm: float | None = None,
) -> SparseOptimizer:
    """Row-wise Adagrad (TorchRec/FBGEMM `EXACT_ROWWISE_ADAGRAD`): one accumulator per row.

    Per touched row (the mean is over the dim elements of the row):

        acc += mean(g^2)
        p -= lr * g / (sqrt(acc) + eps)

    A dim-times smaller slot than `sparse_adagrad`, at the price of one step size per row.

    Args: as `sparse_adagrad` (default initial accumulator 0).
    Slots: `acc` `[R]` float32, initialised to `initial_accumulator_value`.
    """
    _check_positive("initial_accumulator_value", initial_accumulator_value, allow_zero=True)
    _check_positive("eps", eps, allow_zero=True)

    def row_update(p, s, g, lr, t):
        del t
        acc = s["acc"] + jnp.mean(g * g, axis=-1)  # [U]
        return p - lr * g / (jnp.sqrt(acc)[:, None] + eps), {"acc": acc}

    specs = {"acc": SlotSpec(initial_accumulator_value, per_row=True)}
    return _build(lr, specs, row_update, clip_norm)


def sparse_sgd(lr: LearningRate, *, clip_norm: float | None = None) -> SparseOptimizer:
    """Plain SGD on touched rows: `p -= lr * g`. No slots.

    Args:
      lr: a float or a schedule (see `sparse_adam`).
      clip_norm: if set, clip each row's gradient to this L2 norm first.
    """

    def row_update(p, s, g, lr, t):
        del s, t
        return p - lr * g, {}

    return _build(lr, {}, row_update, clip_norm)


OPTIMIZERS: dict[str, Callable[..., SparseOptimizer]] = {
    "adam": sparse_adam,
    "adamw": sparse_adamw,
    "adamw_tf": sparse_adamw_tf,
    "adagrad": sparse_adagrad,
    "rowwise_adagrad": rowwise_adagrad,
    "sgd": sparse_sgd,
}


def make(name: str, **kwargs: Any) -> SparseOptimizer:
    """The optimizer `OPTIMIZERS[name](**kwargs)`, for configs (`make("adamw", lr=1e-3)`)."""
    try:
        factory = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown sparse optimizer {name!r}; known: {sorted(OPTIMIZERS)}") from None
    return factory(**kwargs)
