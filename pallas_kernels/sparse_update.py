"""Fused sparse optimizer update: touched rows and their slots read once, written once.

    embedding, slots = sparse_update(row_update, embedding, slots, rows, row_grads, mask,
                                     lr, t, clip_norm=None)
    embedding, slots, nonfinite = sparse_update(..., count_nonfinite=True)

`row_update(p, slot_rows, g, lr, t) -> (p, slot_rows)` is the per-row math of a
`recis_jax.optim.sparse` optimizer (Adam, AdamW, AdamW-TF, Adagrad, row-wise Adagrad,
SGD), on float32 `[U, dim]` rows (`[U]` for per-row slots). The semantics are those of
`SparseOptimizer.apply` (see recis_jax/optim/sparse.py): lanes with mask False, a row id
outside [0, R), or a non-finite gradient are neither read nor written; live row ids are
unique; with `clip_norm` each gradient row is scaled to at most that L2 norm first; the
math is float32 whatever the storage dtype (rows cast back with round-to-nearest).
With `count_nonfinite` it also returns the number of live lanes skipped for a non-finite
gradient (`recis_jax.optim.nonfinite_rows`), counted where the gradients are read anyway:
a separate count re-reads all of them (2 ms of a 40 ms DLRM-dcnv2 step on an H200).

Fused with the backward (`row_grads` a `SegmentGrads`): the gradients come as segment
sums, each row's the sum of some bag gradients (pooling's backward onto unique rows), and
the update is the epilogue of `embedding_bag`'s segment kernel: a row whose segment fits
one piece is summed and updated by the same program; a longer one leaves partial rows
that the combine kernel adds up (in slot order, as `segment_gather_sum` does) before it
updates the row. The [U, dim] gradient is never written; the sums are the two-pass
path's, in the same order.

`sparse_update_reference` is the XLA formulation (gather, math, one scatter per array
with `unique_indices`); `sparse_update` dispatches (pallas_kernels.dispatch): the
Pallas-Triton kernel on GPU, the reference elsewhere. `recis_jax.optim.sparse` calls it
with the backend's default (FUSED_UPDATE_BY_DEFAULT; on an H100 the kernel runs at
0.90-0.96 of copy bandwidth, benchmarks/results/ops_sparse_update_h100.md).

Kernel design (jax 0.11.2, Pallas-Triton): a 1-D grid over blocks of G lanes. Each
program gathers its G gradient rows, checks them (finite, live, in range), gathers the G
embedding rows and slot rows, runs `row_update` on [G, dim] tiles in registers and
stores the rows back with masked scatter stores into the same buffers
(`input_output_aliases`: under buffer donation the update is in place and the R - U
untouched rows are never copied). XLA's version writes each updated array to a
temporary and scatters it, moving about twice the bytes. Masked-off lanes store to a
distinct out-of-range row (masked on GPU; dropped by interpret mode's scatter), so no
two lanes of a store share a target. The learning rate and step enter as [1] arrays;
the per-row math (incl. Adam's bias correction, recomputed per program) is the same
Python function as the reference's, so results agree to float rounding (Triton may
contract a * b + c into an FMA where XLA does not, and vice versa).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import dispatch
from pallas_kernels import embedding_bag as eb

Slots = dict[str, jax.Array]
RowUpdate = Callable[..., tuple[jax.Array, Slots]]


class Config(NamedTuple):
    """Static launch configuration of the update kernel."""

    lanes: int = 32     # rows per program (power of 2)
    num_warps: int = 4


class SegmentGrads(NamedTuple):
    """Row gradients given as segment sums, not yet materialised:

        row_grads[u] = sum_{i in [splits[u], splits[u+1]), idx[i] >= 0} weights[i] * src[idx[i]]

    in float32 ([U, dim]; an empty segment is a zero gradient). The backward of pooling
    onto unique rows has this form (src: the pooled bags' gradient, idx: each lookup
    lane's bag in unique-row order); `sparse_update` takes it as `row_grads` and sums
    each row's gradient where it updates the row, so the [U, dim] gradient never goes
    through device memory.

    src [R_src, dim] float; splits [U + 1] int32, non-decreasing; idx [C] int32 (-1: no
    row); weights [C] float32 or None (1).
    """

    src: jax.Array
    splits: jax.Array
    idx: jax.Array
    weights: jax.Array | None = None

    def materialize(self, impl: str | None = None) -> jax.Array:
        """The [U, dim] float32 gradients (`embedding_bag.segment_gather_sum`)."""
        return eb.segment_gather_sum(self.src, self.splits, self.idx, self.weights, impl=impl, dtype=jnp.float32)


def _check_segments(row_grads, u: int, d: int) -> None:
    if isinstance(row_grads, SegmentGrads) and (row_grads.splits.shape != (u + 1,) or row_grads.src.ndim != 2
                                                or row_grads.src.shape[1] != d):
        raise ValueError(f"SegmentGrads for {u} rows of dim {d}: splits must be [{u + 1}] and src [R, {d}], "
                         f"got {row_grads.splits.shape} and {row_grads.src.shape}")


def as_array(row_grads, impl: str | None = None) -> jax.Array:
    """row_grads as a [U, dim] array (SegmentGrads materialised)."""
    return row_grads.materialize(impl) if isinstance(row_grads, SegmentGrads) else row_grads


def default_config(dim: int) -> Config:
    """About 2k elements per tile: 128 rows at dim 16, 32 at 64, 16 at 128."""
    return Config(lanes=max(1, min(256, 2048 // dim)), num_warps=4)


# ----------------------------------------------------------------------------- shared helpers
# (recis_jax.optim.sparse re-exports these; they are the reference's exact ops)

def row_index(rows: jax.Array, valid: jax.Array, num_rows: int) -> jax.Array:
    """Gather/scatter indices `[U]`: `rows` where valid, else distinct rows >= num_rows.

    Out-of-range indices read as zeros (gather mode "fill") and are dropped by the
    scatter (mode "drop"). Making them distinct (num_rows + lane) keeps all indices
    unique, so the scatter may promise `unique_indices`.
    """
    num_lanes = rows.shape[0]
    dtype = rows.dtype
    if num_rows + num_lanes > np.iinfo(dtype).max:
        dtype = jnp.int64
    rows = rows.astype(dtype)
    valid = valid & (rows >= 0) & (rows < num_rows)
    return jnp.where(valid, rows, num_rows + jnp.arange(num_lanes, dtype=dtype))


def gather_rows(table: jax.Array, index: jax.Array) -> jax.Array:
    return table.at[index].get(mode="fill", fill_value=0)


def scatter_rows(table: jax.Array, index: jax.Array, values: jax.Array) -> jax.Array:
    return table.at[index].set(values.astype(table.dtype), mode="drop", unique_indices=True)


def clip_rows(g: jax.Array, clip_norm: float) -> jax.Array:
    """Scale each row of `g [U, dim]` float32 to an L2 norm of at most `clip_norm`."""
    norm = jnp.sqrt(jnp.sum(g * g, axis=-1, keepdims=True))  # [U, 1]
    # clip / max(norm, clip) is 1 for small rows and never divides by zero.
    return g * (clip_norm / jnp.maximum(norm, clip_norm))


# ----------------------------------------------------------------------------- reference

def sparse_update_reference(row_update: RowUpdate, embedding: jax.Array, slots: Slots,
                            rows: jax.Array, row_grads: jax.Array, mask: jax.Array,
                            lr: jax.Array, t: jax.Array, *, clip_norm: float | None = None,
                            count_nonfinite: bool = False):
    """XLA reference of `sparse_update` (gather, math, scatter per array; SegmentGrads
    materialised first)."""
    num_rows = embedding.shape[0]
    g = as_array(row_grads, "reference").astype(jnp.float32)  # [U, dim]
    finite = jnp.all(jnp.isfinite(g), axis=-1)  # [U]
    index = row_index(rows, mask & finite, num_rows)  # [U]
    if clip_norm is not None:
        g = clip_rows(g, clip_norm)
    p = gather_rows(embedding, index).astype(jnp.float32)  # [U, dim]
    slot_rows = {name: gather_rows(slots[name], index) for name in slots}
    p, slot_rows = row_update(p, slot_rows, g, lr, t)
    embedding = scatter_rows(embedding, index, p)
    slots = {name: scatter_rows(slots[name], index, slot_rows[name]) for name in slots}
    if count_nonfinite:
        return embedding, slots, jnp.sum(mask & ~finite, dtype=jnp.int32)
    return embedding, slots


# ----------------------------------------------------------------------------- kernel

def _store(ref, target, val, mask):
    """ref[target[i]] = val[i] where mask[i] (target [G] distinct; val [G] or [G, D])."""
    if val.ndim == 1:
        plgpu.store(ref.at[target], val, mask=mask)
        return
    g, d = val.shape
    r = jnp.broadcast_to(target[:, None], (g, d))
    c = lax.broadcasted_iota(jnp.int32, (g, d), 1)
    plgpu.store(ref.at[r, c], val, mask=jnp.broadcast_to(mask[:, None], (g, d)))


def _load_rows(ref, rows, mask):
    """ref[rows[i], :] where mask[i], zeros elsewhere ([G, D]; masked lanes move no data)."""
    g, d = rows.shape[0], ref.shape[1]
    r = jnp.broadcast_to(rows[:, None], (g, d))
    c = lax.broadcasted_iota(jnp.int32, (g, d), 1)
    return plgpu.load(ref.at[r, c], mask=jnp.broadcast_to(mask[:, None], (g, d)), other=jnp.zeros((), ref.dtype))


def _load_state(r, live, emb_in, slot_in, *, per_row, num_rows):
    """(rc, ok, p, slot rows): the float32 rows r [G] of the embedding and the slots for
    the lanes `live` [G] with r in range (ok; rc: r there, 0 elsewhere; other lanes move
    no data). A kernel issues these loads before it sums the gradients: they do not
    depend on them, so their latency overlaps the gradient's loads."""
    ok = live & (r >= 0) & (r < num_rows)
    rc = jnp.where(ok, r, 0)
    p = _load_rows(emb_in, rc, ok).astype(jnp.float32)                             # [G, D]
    srows = {}
    for (name, ref), pr in zip(slot_in.items(), per_row):
        srows[name] = plgpu.load(ref.at[rc], mask=ok, other=np.float32(0)) if pr else _load_rows(ref, rc, ok)
    return rc, ok, p, srows


def _apply_rows(grad, state, live, lr, t, emb_out, slot_out, *, row_update, clip_norm, num_rows):
    """Updates the rows of `state` (`_load_state`'s) with their gradients grad [G, D]
    (float32, zeros on dead lanes) in place; returns the live lanes skipped for a
    non-finite gradient [G] bool."""
    rc, ok, p, srows = state
    bad = jnp.sum((~jnp.isfinite(grad)).astype(jnp.int32), axis=1, dtype=jnp.int32)   # [G]
    valid = ok & (bad == 0)
    if clip_norm is not None:
        grad = clip_rows(grad, clip_norm)
    p, srows = row_update(p, srows, grad, lr, t)
    local = lax.broadcasted_iota(jnp.int32, rc.shape, 0)
    target = jnp.where(valid, rc, num_rows + local)   # distinct; masked ones out of range
    _store(emb_out, target, p.astype(emb_out.dtype), valid)
    for name, ref in slot_out.items():
        _store(ref, target, srows[name].astype(ref.dtype), valid)
    return live & (bad > 0)


def _update_kernel(*refs, row_update, names, per_row, clip_norm, num_rows, num_lanes, g):
    n = len(names)
    rows_ref, mask_ref, grad_ref, lr_ref, t_ref, emb_in = refs[:6]
    slot_in = dict(zip(names, refs[6:6 + n]))
    emb_out = refs[6 + n]
    slot_out = dict(zip(names, refs[7 + n:7 + 2 * n]))
    skipped_out = refs[7 + 2 * n]  # [U] int8: live lanes skipped for a non-finite gradient

    lane = pl.program_id(0) * g + lax.broadcasted_iota(jnp.int32, (g,), 0)        # [G]
    lane_ok = lane < num_lanes
    lc = jnp.where(lane_ok, lane, 0)
    live = lane_ok & (mask_ref[lc] != 0)
    # Masked loads: a dead lane (padding: about half the lanes of a uniform-ID lookup)
    # moves no gradient bytes.
    state = _load_state(rows_ref[lc], live, emb_in, slot_in, per_row=per_row, num_rows=num_rows)
    grad = _load_rows(grad_ref, lc, live).astype(jnp.float32)                      # [G, D]
    skipped = _apply_rows(grad, state, live, lr_ref[0], t_ref[0], emb_out, slot_out, row_update=row_update,
                          clip_norm=clip_norm, num_rows=num_rows)
    # Lanes past the end store to distinct out-of-range indices (masked).
    plgpu.store(skipped_out.at[lane], skipped.astype(jnp.int8), mask=lane_ok)


@functools.partial(jax.jit, static_argnames=("row_update", "clip_norm", "config", "interpret"))
def _sparse_update_pallas(embedding, slots, rows, row_grads, mask, lr, t, *, row_update,
                          clip_norm, config, interpret):
    names = tuple(slots)
    r, d = embedding.shape
    u = rows.shape[0]
    per_row = tuple(slots[k].ndim == 1 for k in names)
    g = config.lanes
    inputs = [rows.astype(jnp.int32), mask.astype(jnp.int32), row_grads,
              jnp.reshape(lr, (1,)).astype(jnp.float32), jnp.reshape(t, (1,)).astype(jnp.int32),
              embedding] + [slots[k] for k in names]
    out_shape = [jax.ShapeDtypeStruct(embedding.shape, embedding.dtype)] + [
        jax.ShapeDtypeStruct(slots[k].shape, slots[k].dtype) for k in names] + [
        jax.ShapeDtypeStruct((u,), jnp.int8)]
    aliases = {5 + i: i for i in range(1 + len(names))}
    outs = pl.pallas_call(
        functools.partial(_update_kernel, row_update=row_update, names=names, per_row=per_row,
                          clip_norm=clip_norm, num_rows=r, num_lanes=u, g=g),
        out_shape=out_shape,
        grid=(pl.cdiv(u, g),),
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps),
        interpret=interpret,
        name="sparse_update",
    )(*inputs)
    return outs[0], dict(zip(names, outs[1:-1])), jnp.sum(outs[-1], dtype=jnp.int32)


def _segment_update_kernel(*refs, row_update, names, per_row, clip_norm, num_rows, num_seg, num_slots, config,
                           has_w):
    """embedding_bag's piece kernel over the row gradients' segments: a row whose
    segment is one piece is updated here with its sum; longer ones leave partials."""
    it = iter(refs)
    bounds_ref, splits_ref, slot_seg_ref, xoff_ref, idx_ref = (next(it) for _ in range(5))
    w_ref = next(it) if has_w else None
    src_ref, rows_ref, mask_ref, lr_ref, t_ref, emb_in = (next(it) for _ in range(6))
    slot_in = {name: next(it) for name in names}
    next(it)  # the skipped flags' zeros, aliased with skipped_out
    emb_out = next(it)
    slot_out = {name: next(it) for name in names}
    skipped_out, part_ref = next(it), next(it)

    # Programs whose lanes are all past the last live row and the last used slot
    # (about half of a uniform-ID dedup's lanes are padding) return at once.
    g = config.lanes
    lane0 = pl.program_id(0) * g
    busy = (lane0 < bounds_ref[0]) | ((lane0 + g > num_seg) & (lane0 < num_seg + bounds_ref[1]))

    @pl.when(busy)
    def _():
        pieces = eb.piece_lanes(splits_ref, slot_seg_ref, xoff_ref, lane0, num_seg=num_seg, num_slots=num_slots,
                                config=config)
        segc = pieces.segc
        short = pieces.valid & ~pieces.long
        live = short & (mask_ref[segc] != 0)
        state = _load_state(rows_ref[segc], live, emb_in, slot_in, per_row=per_row, num_rows=num_rows)
        acc, _ = eb.piece_sums(pieces, idx_ref, w_ref, src_ref, config=config, mean=False)
        skipped = _apply_rows(acc, state, live, lr_ref[0], t_ref[0], emb_out, slot_out, row_update=row_update,
                              clip_norm=clip_norm, num_rows=num_rows)
        local = lax.broadcasted_iota(jnp.int32, (g,), 0)
        plgpu.store(skipped_out.at[jnp.where(short, segc, num_seg + local)], skipped.astype(jnp.int8), mask=short)
        eb.store_partials(part_ref, pieces, acc, num_slots)


def _segment_update_combine_kernel(*refs, row_update, names, per_row, clip_norm, num_rows, num_seg, config):
    """One program per slot: the first slot of a long segment sums the segment's partial
    rows and updates its row (slots past the last used one return at once)."""
    n = len(names)
    bounds_ref, splits_ref, slot_seg_ref, xoff_ref, part_ref, rows_ref, mask_ref, lr_ref, t_ref, emb_in = refs[:10]
    slot_in = dict(zip(names, refs[10:10 + n]))
    # refs[10 + n]: the skipped flags, aliased with skipped_out
    emb_out = refs[11 + n]
    slot_out = dict(zip(names, refs[12 + n:12 + 2 * n]))
    skipped_out = refs[12 + 2 * n]

    x = pl.program_id(0)

    @pl.when(x < bounds_ref[1])
    def _():
        acc, _, segc, lead = eb.combine_sum(splits_ref, slot_seg_ref, xoff_ref, part_ref, None, x, num_seg=num_seg,
                                            config=config)
        lead1 = jnp.reshape(lead, (1,))
        live = lead1 & (jnp.reshape(mask_ref[segc], (1,)) != 0)
        state = _load_state(jnp.reshape(rows_ref[segc], (1,)), live, emb_in, slot_in, per_row=per_row,
                            num_rows=num_rows)
        skipped = _apply_rows(acc[None], state, live, lr_ref[0], t_ref[0], emb_out, slot_out,
                              row_update=row_update, clip_norm=clip_norm, num_rows=num_rows)
        plgpu.store(skipped_out.at[jnp.where(lead1, jnp.reshape(segc, (1,)), num_seg)], skipped.astype(jnp.int8),
                    mask=lead1)


@functools.partial(jax.jit, static_argnames=("row_update", "clip_norm", "config", "interpret"))
def _segment_update_pallas(embedding, slots, rows, seg, mask, lr, t, *, row_update, clip_norm, config, interpret):
    names = tuple(slots)
    n = len(names)
    u = rows.shape[0]
    c = seg.idx.shape[0]
    splits = jnp.clip(seg.splits.astype(jnp.int32), 0, c)
    slot_seg, xoff, x_cap, used = eb.plan(splits, c, config.piece)
    has_w = seg.weights is not None
    lr = jnp.reshape(lr, (1,)).astype(jnp.float32)
    t = jnp.reshape(t, (1,)).astype(jnp.int32)
    rows, mask = rows.astype(jnp.int32), mask.astype(jnp.int32)
    # [one past the last live lane, the slots in use]: the kernels skip the rest.
    lanes = jnp.arange(u, dtype=jnp.int32)
    bounds = jnp.stack([jnp.max(jnp.where(mask != 0, lanes + 1, 0)), used])
    tables = [embedding] + [slots[k] for k in names]
    table_shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in tables]
    kw = dict(row_update=row_update, names=names, per_row=tuple(slots[k].ndim == 1 for k in names),
              clip_norm=clip_norm, num_rows=embedding.shape[0], num_seg=u, config=config)
    inputs = ([bounds, splits, slot_seg, xoff, seg.idx.astype(jnp.int32)]
              + ([seg.weights.astype(jnp.float32)] if has_w else []) + [seg.src, rows, mask, lr, t] + tables
              + [jnp.zeros((u,), jnp.int8)])
    first = len(inputs) - len(tables) - 1
    outs = pl.pallas_call(
        functools.partial(_segment_update_kernel, num_slots=x_cap, has_w=has_w, **kw),
        out_shape=table_shapes + [jax.ShapeDtypeStruct((u,), jnp.int8),
                                  jax.ShapeDtypeStruct((x_cap, embedding.shape[1]), jnp.float32)],
        grid=(pl.cdiv(u + x_cap, config.lanes),),
        input_output_aliases={first + i: i for i in range(len(tables) + 1)},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps),
        interpret=interpret,
        name="segment_update_pieces",
    )(*inputs)
    tables, skipped, part = list(outs[:1 + n]), outs[1 + n], outs[2 + n]
    outs = pl.pallas_call(
        functools.partial(_segment_update_combine_kernel, **kw),
        out_shape=table_shapes + [jax.ShapeDtypeStruct((u,), jnp.int8)],
        grid=(x_cap,),
        input_output_aliases={9 + i: i for i in range(2 + n)},
        compiler_params=plgpu.CompilerParams(num_warps=min(config.num_warps, 4)),
        interpret=interpret,
        name="segment_update_combine",
    )(bounds, splits, slot_seg, xoff, part, rows, mask, lr, t, *tables, skipped)
    return outs[0], dict(zip(names, outs[1:1 + n])), jnp.sum(outs[-1], dtype=jnp.int32)


def segment_config(dim: int, avg_items: float) -> eb.Config:
    """The fused update's launch configuration: embedding_bag's for the segments
    (`eb.default_config`) in programs of at most 2048 elements per [G, K, dim] tile and 4
    warps. Latency bound (a chain of dependent loads per lane: its range, items, bag
    rows; the table row's load is issued first and overlaps them), it wants many loads
    in flight: the DLRM-dcnv2 backward + row-wise Adagrad (14M lanes, dim 128) on an
    H200 took 4.58 ms at 16 lanes x 4 warps, 4.93 ms at 8 x 2, 4.98 ms at 4 x 2, 5.24 ms
    at 4 x 1, 6.10 ms at 2 x 1, and 7.92 ms as two passes (benchmarks/pooling_dcnv2.py
    --update-only; before the table row's load was issued first, 4 x 2 was the fastest)."""
    cfg = eb.default_config(dim, avg_items)
    return cfg._replace(lanes=max(1, min(cfg.lanes, 2048 // (cfg.rows * dim))), num_warps=4)


def _is_pow2(v: int) -> bool:
    return v >= 1 and (v & (v - 1)) == 0


def sparse_update_pallas(row_update: RowUpdate, embedding, slots, rows, row_grads, mask, lr, t, *,
                         clip_norm: float | None = None, count_nonfinite: bool = False,
                         interpret: bool = False, config: Config | None = None):
    """The Pallas path of `sparse_update`. Falls back to the reference for a dim that is
    not a power of 2, float64 storage, more than 2**31 - 1 rows, or no lanes (with
    SegmentGrads summed by `segment_gather_sum`'s kernel first)."""
    r, d = embedding.shape
    u = rows.shape[0]
    ok = (_is_pow2(d) and u > 0 and r > 0 and r + u < 2**31
          and embedding.dtype in (jnp.float32, jnp.bfloat16, jnp.float16)
          and all(v.dtype == jnp.float32 and v.shape[0] == r for v in slots.values()))
    _check_segments(row_grads, u, d)
    if not ok:
        return sparse_update_reference(row_update, embedding, slots, rows,
                                       as_array(row_grads, "interpret" if interpret else "pallas"), mask, lr, t,
                                       clip_norm=clip_norm, count_nonfinite=count_nonfinite)
    if isinstance(row_grads, SegmentGrads):
        sg = row_grads
        if sg.idx.shape[0] == 0 or sg.src.shape[0] == 0 or sg.src.dtype == jnp.float64:
            return sparse_update_reference(row_update, embedding, slots, rows, row_grads, mask, lr, t,
                                           clip_norm=clip_norm, count_nonfinite=count_nonfinite)
        emb, slots, nonfinite = _segment_update_pallas(
            embedding, dict(slots), rows, sg, mask, jnp.asarray(lr, jnp.float32), jnp.asarray(t, jnp.int32),
            row_update=row_update, clip_norm=clip_norm, interpret=interpret,
            config=segment_config(d, sg.idx.shape[0] / u))
        return (emb, slots, nonfinite) if count_nonfinite else (emb, slots)
    cfg = config if config is not None else default_config(d)
    emb, slots, nonfinite = _sparse_update_pallas(
        embedding, dict(slots), rows, row_grads, mask, jnp.asarray(lr, jnp.float32),
        jnp.asarray(t, jnp.int32), row_update=row_update, clip_norm=clip_norm, config=cfg,
        interpret=interpret)
    return (emb, slots, nonfinite) if count_nonfinite else (emb, slots)


def sparse_update(row_update: RowUpdate, embedding: jax.Array, slots: Slots, rows: jax.Array,
                  row_grads: jax.Array, mask: jax.Array, lr: jax.Array, t: jax.Array, *,
                  clip_norm: float | None = None, count_nonfinite: bool = False,
                  impl: str | None = None):
    """Applies `row_update` to the touched rows of `embedding` and `slots`.

    Args:
      row_update: `(p, slot_rows, g, lr, t) -> (p, slot_rows)`, float32 per-row math
        (hashable: it is a static argument of the kernel's jit).
      embedding: [R, dim] float32 / bfloat16 (donate it for an in-place update).
      slots: {name: [R, dim] or [R] float32} (donate them too).
      rows: [U] int row ids, unique among live lanes.
      row_grads: [U, dim] summed gradient per row, or a SegmentGrads that gives them
        as segment sums: the kernel then sums each row's gradient where it updates
        the row (one pass instead of a [U, dim] gradient written and read again).
      mask: [U] bool, False lanes are neither read nor written.
      lr: float32 scalar learning rate; t: int32 scalar step (after its increment).
      clip_norm: per-row gradient clipping, or None.
      count_nonfinite: also return the int32 count of live lanes (mask True) left
        unchanged because their gradient has a NaN or an infinity.
      impl: dispatch override.
    Returns:
      (embedding, slots), same shapes and dtypes; (embedding, slots, nonfinite) with
      count_nonfinite.
    """
    which = dispatch.resolve(impl)
    if which == "reference":
        _check_segments(row_grads, rows.shape[0], embedding.shape[1])
        return sparse_update_reference(row_update, embedding, slots, rows, row_grads, mask, lr, t,
                                       clip_norm=clip_norm, count_nonfinite=count_nonfinite)
    return sparse_update_pallas(row_update, embedding, slots, rows, row_grads, mask, lr, t,
                                clip_norm=clip_norm, count_nonfinite=count_nonfinite,
                                interpret=(which == "interpret"))
