"""Embedding bag: gather rows and pool them per bag, and the segment sum behind its backward.

One core op serves the forward and the backward of the sparse path:

    segment_gather_sum(src [R, D], splits [S + 1], idx [C] | None, weights [C] | None)
      out[s] = sum_{i in [splits[s], splits[s+1]), idx[i] >= 0} w[i] * src[idx[i]]     [S, D]

* forward pooling (sum / mean): src = the table (or the unique rows of a lookup),
  idx = each item's row, splits = the bags' row_splits;
* pooling of already gathered occurrence rows (the engine's `pool`): idx = None;
* backward onto unique rows: src = per-bag (or per-occurrence) gradients, idx = the
  item -> gradient-row map in the order of the items sorted by unique row, splits = the
  unique rows' ranges in that order (`dedup.unique_keys` gives order/sorted_segment).

`embedding_bag` (sum / mean / tile) is the user-facing op with a custom VJP whose
backward is the same kernel. Each public function dispatches through
`pallas_kernels.dispatch.resolve`: the Pallas-Triton kernel on a GPU, the pure-jnp
reference elsewhere.

Kernel design (jax 0.11.2, Pallas-Triton), deterministic (no float atomics):

* Work is cut into *pieces* of at most `piece` (L) items of one segment, so a bag of
  100k items is spread over many programs while a bag of 32 is one piece. Program
  lanes: the first S lanes are the segments' first pieces (lane = segment, no lookup
  needed); then 2 * ceil(C / L) "slot" lanes for the further pieces of long segments.
* A program owns `lanes` (G) pieces and loops over their items `rows` (K) at a time:
  a [G, K] index load, a [G, K, D] row gather, a weighted sum over K. The loop runs to
  the longest piece of the program (<= L / K steps).
* A segment of one piece (len <= L, the common case) is written straight to the output.
  The pieces of a long segment write float32 partial rows into contiguous slots, and a
  second kernel (one program per long segment) adds them up in slot order.
* The plan (which slots belong to which long segment) is a few O(S + C / L) integer
  ops in XLA: lengths, an exclusive cumsum, a scatter and a cummax.
* `piece_lanes`, `piece_sums`, `store_partials`, `combine_sum` and `plan` are the
  kernels' parts; `pallas_kernels.sparse_update` builds its fused backward-and-update
  from them (the row's sum goes to the optimizer's row math instead of the output).
* Loads and stores are masked gathers/scatters with full integer indexers (lanes past a
  piece's end move no data; no partial blocks). A masked store's dead lanes point at
  distinct out-of-range rows, because interpret mode implements a masked store as a
  read-modify-write scatter where two lanes sharing a row would race. All vector shapes
  are powers of 2: a row width D that is not one (DeepFM's 8 + 1 with a fused bias)
  runs in tiles of the next power of 2 with the columns >= D masked.
* Measured on an H100 (benchmarks/results/ops_sparse_h100.md; 8M-row tables, 4M
  lookups): 85-89% of copy bandwidth at dim 64/128 for bags of 32 and 1k-100k items,
  1.24x torch's EmbeddingBag for uniform ids, 1.6x for Zipf, 47x for long bags; 6x the
  deterministic XLA path (sorted-segment scan), level with XLA's atomic segment_sum.

The summation order differs from the reference's (a tree over K, then sequential over
the K-blocks and pieces), so results agree to float tolerance, not bitwise; the kernel
itself is deterministic for a fixed Config.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import dispatch

# Typed constants: a Python float in jnp.where enters the jaxpr as a float64 scalar.
_F0 = np.float32(0)
_F1 = np.float32(1)

COMBINERS = ("sum", "mean", "tile")


class Config(NamedTuple):
    """Static launch configuration of the segment kernels."""

    rows: int = 32          # K: items per lane per loop step (power of 2)
    lanes: int = 2          # G: pieces per program (power of 2)
    piece: int = 512        # L: most items one lane reduces (a multiple of `rows`)
    num_warps: int = 4
    combine_rows: int = 32  # partial rows per step of the combine kernel (power of 2)


def default_config(dim: int, avg_items: float = 32.0) -> Config:
    """The configuration for rows of `dim` and about `avg_items` items per segment
    (static: C / S).

    K (items per lane and step) follows the segment length, up to 32: pooling bags of
    32 gather [G, 32, D] tiles, while one-item bags and the backward's segments (unique
    rows, about 1-2 occurrences each for uniform ids, and the padding's empty ones) use
    K = 1 and many lanes, instead of masking 31 of 32 rows. G (lanes) keeps G * K * D
    at 4096 for D <= 128; a piece is 16 steps, 64 for K = 1 (fewer partial rows for the
    hot IDs' long segments). The DLRM-dcnv2 backward (14M lanes, dim 128) on an H200:
    7.6 ms with K = 2, 4.9 ms with K = 1 and pieces of 16, 4.0 ms with pieces of 64.
    """
    dim = _next_pow2(dim)  # the tile width
    k = 1
    while k < 32 and k < avg_items:
        k *= 2
    if dim > 128:
        k = max(1, min(k, 32 * 128 // dim))
    g = max(1, min(64, 4096 // (k * dim)))
    return Config(rows=k, lanes=g, piece=16 * k if k > 1 else 64, num_warps=4, combine_rows=32)


def _is_pow2(v: int) -> bool:
    return v >= 1 and (v & (v - 1)) == 0


def _next_pow2(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- reference

def count_below(keys: jax.Array, n: int) -> jax.Array:
    """int32 [n + 1]: for each r in 0..n the number of keys < r (int keys [C], any
    order), i.e. `searchsorted(sorted(keys), arange(n + 1), side="left")`: a histogram
    (keys < 0 in bin 0, keys >= n past the end) and a prefix sum, O(C + n), where the
    search is log2(C) gather passes (8x faster on the CPU at 106k lanes)."""
    bins = jnp.clip(keys.astype(jnp.int32), -1, n) + 1
    return jnp.cumsum(jnp.zeros(n + 2, jnp.int32).at[bins].add(1)[:n + 1], dtype=jnp.int32)


def segment_of_positions(splits: jax.Array, c: int) -> jax.Array:
    """int32 [C]: `searchsorted(splits, arange(c), side="right") - 1`, the number of
    splits <= p minus 1 for each position p < c (for non-decreasing splits [S + 1]: p's
    segment, -1 before splits[0], S from splits[S] on)."""
    return count_below(splits, c)[1:] - 1


@functools.partial(jax.jit, static_argnames=("mean", "num_out", "skip_empty", "dtype"))
def segment_gather_sum_reference(src: jax.Array, splits: jax.Array, idx: jax.Array | None = None,
                                 weights: jax.Array | None = None, *, mean: bool = False,
                                 out_rows: jax.Array | None = None, out: jax.Array | None = None,
                                 num_out: int | None = None, skip_empty: bool = False,
                                 dtype=None) -> jax.Array:
    """Pure-jnp reference of `segment_gather_sum` (same arguments, same result; rows
    that no segment writes are zeros)."""
    from recis_jax.embedding.dedup import sorted_segment_sum  # noqa: PLC0415 - avoid a cycle

    src = jnp.asarray(src)
    splits = jnp.asarray(splits).astype(jnp.int32)
    s = splits.shape[0] - 1
    c = src.shape[0] if idx is None else idx.shape[0]
    seg = segment_of_positions(splits, c)  # [C] in [-1, S]
    ok = (seg >= 0) & (seg < s)
    if idx is None:
        rows = src.astype(jnp.float32)
    else:
        idx = idx.astype(jnp.int32)
        ok = ok & (idx >= 0)
        rows = src[jnp.where(ok, idx, 0)].astype(jnp.float32)
    w = jnp.ones((c,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    x = jnp.where(ok[:, None], rows * w[:, None], 0)
    # Still non-decreasing (sorted_segment_sum needs it): items before splits[0] join
    # segment 0 as zeros, items past splits[S] are segment S (dropped).
    seg = jnp.clip(seg, 0, s)
    total = sorted_segment_sum(x, seg, s)
    if mean:
        den = sorted_segment_sum(jnp.where(ok, w, 0), seg, s)
        total = jnp.where(den[:, None] != 0, total / jnp.where(den == 0, 1, den)[:, None], 0)
    dtype = src.dtype if dtype is None else jnp.dtype(dtype)
    total = total.astype(dtype)
    if out_rows is None and out is None and num_out is None and not skip_empty:
        return total
    base = out if out is not None else jnp.zeros((s if num_out is None else num_out, src.shape[1]), dtype)
    tgt = jnp.arange(s, dtype=jnp.int32) if out_rows is None else out_rows.astype(jnp.int32)
    if skip_empty:
        tgt = jnp.where(splits[1:] > splits[:-1], tgt, base.shape[0])
    return base.at[tgt].set(total, mode="drop")


# ----------------------------------------------------------------------------- kernels

class _Pieces(NamedTuple):
    """A program's G piece lanes (see `piece_lanes`)."""

    segc: jax.Array   # [G] the lane's segment (clipped into [0, S))
    valid: jax.Array  # [G] the lane holds a piece
    long: jax.Array   # [G] its segment has more than one piece (partial rows)
    n: jax.Array      # [G] its segment's item count
    slot: jax.Array   # [G] its partial row's slot (for long segments)
    a: jax.Array      # [G] its first item
    b: jax.Array      # [G] one past its last item


def piece_lanes(splits_ref, slot_seg_ref, xoff_ref, lane0, *, num_seg, num_slots, config) -> _Pieces:
    """The pieces of the G lanes from lane0 (the program's first, `pl.program_id(0) * G`,
    read by the caller: interpret mode has no program id inside a `pl.when`): the first
    S lanes are the segments' first pieces, the next X the further pieces of long
    segments (their slots)."""
    g, big_l = config.lanes, config.piece
    s, x_cap = num_seg, num_slots
    lane = lane0 + lax.broadcasted_iota(jnp.int32, (g,), 0)                       # [G]
    is_seg = lane < s
    x = jnp.clip(lane - s, 0, x_cap - 1)
    seg = jnp.where(is_seg, lane, slot_seg_ref[x])                                # [G]
    segc = jnp.clip(seg, 0, s - 1)
    s0 = splits_ref[segc]
    e = splits_ref[segc + 1]
    n = jnp.maximum(e - s0, 0)
    npieces = jnp.maximum((n + (big_l - 1)) // big_l, 1)
    xo = xoff_ref[segc]
    j = jnp.where(is_seg, 0, lane - s - xo)
    valid = (lane < s + x_cap) & (seg >= 0) & (is_seg | ((j >= 1) & (j < npieces)))
    j = jnp.where(valid, j, 0)
    a = s0 + j * big_l
    b = jnp.where(valid, jnp.minimum(a + big_l, e), a)
    return _Pieces(segc, valid, npieces > 1, n, xo + j, a, b)


def piece_sums(pieces: _Pieces, idx_ref, w_ref, src_ref, *, config, mean: bool):
    """(acc [G, Dp] float32, wacc [G]): each lane's weighted sum of src rows over its
    piece's items (Dp = src's width rounded up to a power of 2, columns >= D zero), and
    its weight sum (with `mean`)."""
    g, k = config.lanes, config.rows
    a, b = pieces.a, pieces.b
    steps = jnp.max((b - a + (k - 1)) // k)
    col = lax.broadcasted_iota(jnp.int32, (g, k), 1)
    d = src_ref.shape[1]
    dp = _next_pow2(d)  # Triton tiles are powers of 2: columns >= d are masked
    cols = lax.broadcasted_iota(jnp.int32, (g, k, dp), 2)

    def body(t, carry):
        acc, wacc = carry
        pos = a[:, None] + t * k + col                                            # [G, K]
        m = pos < b[:, None]
        # Masked loads: lanes past a piece's end move no data (interpret mode reads
        # clamped / wrapped indices and then replaces them with `other`).
        if idx_ref is not None:
            ids = plgpu.load(idx_ref.at[pos], mask=m, other=jnp.int32(-1))        # [G, K]
            m = m & (ids >= 0)
        else:
            ids = pos
        r3 = jnp.broadcast_to(ids[:, :, None], (g, k, dp))
        if dp == d:
            m3, c3 = jnp.broadcast_to(m[:, :, None], (g, k, d)), cols
        else:
            m3, c3 = m[:, :, None] & (cols < d), jnp.minimum(cols, d - 1)
        rows = plgpu.load(src_ref.at[r3, c3], mask=m3,
                          other=jnp.zeros((), src_ref.dtype)).astype(jnp.float32)  # [G, K, Dp]
        if w_ref is not None:
            w = plgpu.load(w_ref.at[pos], mask=m, other=_F0)                      # [G, K]
            xv = rows * w[:, :, None]
        else:
            w = m.astype(jnp.float32)
            xv = rows
        acc = acc + jnp.sum(xv, axis=1)                                           # [G, D]
        if mean:
            wacc = wacc + jnp.sum(w, axis=1)                                      # [G]
        return acc, wacc

    return lax.fori_loop(0, steps, body, (jnp.zeros((g, dp), jnp.float32), jnp.zeros((g,), jnp.float32)))


def store_partials(part_ref, pieces: _Pieces, acc, num_slots):
    """The pieces of long segments store their float32 partial rows in their slots."""
    lane_local = lax.broadcasted_iota(jnp.int32, (acc.shape[0],), 0)
    to_part = pieces.valid & pieces.long
    slot = jnp.where(to_part, pieces.slot, num_slots + lane_local)
    _store_rows(part_ref, slot, acc, to_part)
    return slot, to_part


def _piece_kernel(*refs, num_seg, num_slots, config, has_idx, has_w, mean, has_out_rows, has_out,
                  skip_empty):
    it = iter(refs)
    splits_ref, slot_seg_ref, xoff_ref = next(it), next(it), next(it)
    idx_ref = next(it) if has_idx else None
    w_ref = next(it) if has_w else None
    out_rows_ref = next(it) if has_out_rows else None
    src_ref = next(it)
    if has_out:
        next(it)  # aliased with out_ref
    out_ref, part_ref = next(it), next(it)
    pw_ref = next(it) if mean else None

    pieces = piece_lanes(splits_ref, slot_seg_ref, xoff_ref, pl.program_id(0) * config.lanes, num_seg=num_seg,
                         num_slots=num_slots, config=config)
    acc, wacc = piece_sums(pieces, idx_ref, w_ref, src_ref, config=config, mean=mean)
    final = acc
    if mean:
        final = jnp.where(wacc[:, None] != 0, acc / jnp.where(wacc == 0, _F1, wacc)[:, None], _F0)
    # Masked stores go through full integer indexers with a distinct target per lane
    # (masked lanes point past the end): interpret mode implements masked stores as a
    # read-modify-write scatter, where two lanes sharing a target would race.
    lane_local = lax.broadcasted_iota(jnp.int32, (config.lanes,), 0)
    segc = pieces.segc
    to_out = pieces.valid & ~pieces.long
    if skip_empty:
        to_out = to_out & (pieces.n > 0)
    dst = out_rows_ref[segc] if has_out_rows else segc
    _store_rows(out_ref, jnp.where(to_out, dst, out_ref.shape[0] + lane_local), final.astype(out_ref.dtype),
                to_out)
    slot, to_part = store_partials(part_ref, pieces, acc, num_slots)
    if mean:
        plgpu.store(pw_ref.at[slot], wacc, mask=to_part)


def _store_rows(ref, rows, val, mask):
    """ref[rows[i], :D] = val[i, :D] where mask[i]; rows [G] distinct (masked ones may be
    out of range), val [G, Dp] with Dp (a power of 2) >= D, the width of ref. Dead elements
    (masked lanes, columns >= D) point at distinct out-of-range rows, as the lanes do."""
    g, dp = val.shape
    d = ref.shape[1]
    c = lax.broadcasted_iota(jnp.int32, (g, dp), 1)
    if dp == d:
        plgpu.store(ref.at[jnp.broadcast_to(rows[:, None], (g, d)), c], val,
                    mask=jnp.broadcast_to(mask[:, None], (g, d)))
        return
    live = mask[:, None] & (c < d)
    dead_row = ref.shape[0] + lax.broadcasted_iota(jnp.int32, (g, dp), 0) * dp + c
    r = jnp.where(live, rows[:, None], dead_row)
    plgpu.store(ref.at[r, jnp.minimum(c, d - 1)], val, mask=live)


def combine_sum(splits_ref, slot_seg_ref, xoff_ref, part_ref, pw_ref, x, *, num_seg, config):
    """(acc [Dp] float32, wacc, segc, lead) of slot x (the program's, read by the caller):
    where x is the first slot of a long segment (lead), the sum of that segment's partial
    rows in slot order (and of its partial weights with pw_ref); zeros elsewhere."""
    k2, big_l = config.combine_rows, config.piece
    seg = slot_seg_ref[x]
    segc = jnp.clip(seg, 0, num_seg - 1)
    s0 = splits_ref[segc]
    e = splits_ref[segc + 1]
    n = jnp.maximum(e - s0, 0)
    npieces = jnp.maximum((n + (big_l - 1)) // big_l, 1)
    xo = xoff_ref[segc]
    lead = (seg >= 0) & (xo == x) & (npieces > 1)
    count = jnp.where(lead, npieces, 0)
    steps = (count + (k2 - 1)) // k2
    d = part_ref.shape[1]  # the padded width (a power of 2)
    r = lax.broadcasted_iota(jnp.int32, (k2,), 0)
    cols = lax.broadcasted_iota(jnp.int32, (k2, d), 1)

    def body(t, carry):
        acc, wacc = carry
        idx = t * k2 + r                                                          # [K2]
        m = idx < count
        rowi = xo + idx
        r2 = jnp.broadcast_to(rowi[:, None], (k2, d))
        m2 = jnp.broadcast_to(m[:, None], (k2, d))
        rows = plgpu.load(part_ref.at[r2, cols], mask=m2, other=_F0)             # [K2, D]
        acc = acc + jnp.sum(rows, axis=0)
        if pw_ref is not None:
            wacc = wacc + jnp.sum(plgpu.load(pw_ref.at[rowi], mask=m, other=_F0))
        return acc, wacc

    acc, wacc = lax.fori_loop(0, steps, body, (jnp.zeros((d,), jnp.float32), jnp.float32(0)))
    return acc, wacc, segc, lead


def _combine_kernel(*refs, num_seg, num_slots, config, mean, has_out_rows):
    del num_slots
    it = iter(refs)
    splits_ref, slot_seg_ref, xoff_ref, part_ref = next(it), next(it), next(it), next(it)
    pw_ref = next(it) if mean else None
    out_rows_ref = next(it) if has_out_rows else None
    _out_in = next(it)  # aliased with out_ref
    out_ref = next(it)

    acc, wacc, segc, lead = combine_sum(splits_ref, slot_seg_ref, xoff_ref, part_ref, pw_ref, pl.program_id(0),
                                        num_seg=num_seg, config=config)
    d = part_ref.shape[1]
    if mean:
        acc = jnp.where(wacc != 0, acc / jnp.where(wacc == 0, _F1, wacc), _F0)

    dst = out_rows_ref[segc] if has_out_rows else segc
    if out_ref.shape[1] == d:
        @pl.when(lead)
        def _():
            out_ref[dst, :] = acc.astype(out_ref.dtype)
    else:  # padded partial rows: store the first out_ref.shape[1] columns
        _store_rows(out_ref, jnp.reshape(dst, (1,)), acc[None].astype(out_ref.dtype), jnp.reshape(lead, (1,)))


def plan(splits: jax.Array, num_items: int, piece: int):
    """(slot_seg [X], xoff [S], X, used): the slots of long segments (more than `piece`
    items); used (int32 scalar) counts the slots given out, slots from there on are unused.

    A long segment s with np pieces owns slots xoff[s] .. xoff[s] + np - 1 (exclusive
    cumsum over long segments); slot_seg[x] is the segment owning slot x, -1 for a slot
    before the first long one. X = 2 * ceil(C / piece) bounds the slots needed: a long
    segment of n items has ceil(n / L) < 2 n / L pieces.
    """
    s = splits.shape[0] - 1
    n = jnp.maximum(splits[1:] - splits[:-1], 0)
    npieces = jnp.maximum((n + (piece - 1)) // piece, 1)
    nslots = jnp.where(npieces > 1, npieces, 0).astype(jnp.int32)
    ends = jnp.cumsum(nslots, dtype=jnp.int32)
    xoff = (ends - nslots).astype(jnp.int32)
    x_cap = max(1, 2 * _cdiv(num_items, piece))
    marks = jnp.full((x_cap,), -1, jnp.int32).at[jnp.where(nslots > 0, xoff, x_cap)].set(
        jnp.arange(s, dtype=jnp.int32), mode="drop", unique_indices=True)
    slot_seg = lax.cummax(marks, axis=0)
    return slot_seg, xoff, x_cap, ends[-1] if s else jnp.int32(0)


@functools.partial(jax.jit, static_argnames=("mean", "config", "interpret", "num_out", "skip_empty", "dtype"))
def _segment_gather_sum_pallas(src, splits, idx, weights, out_rows=None, out=None, *, mean, config, interpret,
                               num_out=None, skip_empty=False, dtype=None):
    s = splits.shape[0] - 1
    c = src.shape[0] if idx is None else idx.shape[0]
    d = src.shape[1]
    slot_seg, xoff, x_cap, _ = plan(splits, c, config.piece)
    has_idx, has_w = idx is not None, weights is not None
    has_out_rows, has_out = out_rows is not None, out is not None
    m = out.shape[0] if has_out else (num_out if num_out is not None else s)
    inputs = [splits, slot_seg, xoff]
    if has_idx:
        inputs.append(idx)
    if has_w:
        inputs.append(weights)
    if has_out_rows:
        inputs.append(out_rows)
    inputs.append(src)
    if has_out:
        inputs.append(out)
    dtype = src.dtype if dtype is None else dtype
    out_shapes = [jax.ShapeDtypeStruct((m, d), dtype),
                  jax.ShapeDtypeStruct((x_cap, _next_pow2(d)), jnp.float32)]
    if mean:
        out_shapes.append(jax.ShapeDtypeStruct((x_cap,), jnp.float32))
    lanes = s + x_cap
    params = plgpu.CompilerParams(num_warps=config.num_warps)
    outs = pl.pallas_call(
        functools.partial(_piece_kernel, num_seg=s, num_slots=x_cap, config=config,
                          has_idx=has_idx, has_w=has_w, mean=mean, has_out_rows=has_out_rows,
                          has_out=has_out, skip_empty=skip_empty),
        out_shape=out_shapes,
        grid=(_cdiv(lanes, config.lanes),),
        input_output_aliases={len(inputs) - 1: 0} if has_out else {},
        compiler_params=params,
        interpret=interpret,
        name="embedding_bag_pieces",
    )(*inputs)
    out, part = outs[0], outs[1]
    combine_inputs = ([splits, slot_seg, xoff, part] + ([outs[2]] if mean else [])
                      + ([out_rows] if has_out_rows else []) + [out])
    return pl.pallas_call(
        functools.partial(_combine_kernel, num_seg=s, num_slots=x_cap, config=config, mean=mean,
                          has_out_rows=has_out_rows),
        out_shape=jax.ShapeDtypeStruct((m, d), dtype),
        grid=(x_cap,),
        input_output_aliases={len(combine_inputs) - 1: 0},
        compiler_params=plgpu.CompilerParams(num_warps=min(config.num_warps, 4)),
        interpret=interpret,
        name="embedding_bag_combine",
    )(*combine_inputs)


def segment_gather_sum_pallas(src, splits, idx=None, weights=None, *, mean: bool = False,
                              interpret: bool = False, config: Config | None = None,
                              out_rows: jax.Array | None = None, out: jax.Array | None = None,
                              num_out: int | None = None, skip_empty: bool = False, dtype=None) -> jax.Array:
    """The Pallas path of `segment_gather_sum` (compiled on GPU, or interpret mode).

    Falls back to the reference for float64 sources and degenerate shapes."""
    src = jnp.asarray(src)
    splits = jnp.asarray(splits)
    if src.ndim != 2:
        raise ValueError(f"src must be [R, D], got {src.shape}")
    s = splits.shape[0] - 1
    d = src.shape[1]
    c = src.shape[0] if idx is None else idx.shape[0]
    if s < 0:
        raise ValueError("splits must have at least one element")
    dtype = jnp.dtype(src.dtype if dtype is None else dtype)
    placed = dict(out_rows=out_rows, out=out, num_out=num_out, skip_empty=skip_empty, dtype=dtype)
    if out is not None and (out.ndim != 2 or out.shape[1] != d or out.dtype != dtype):
        raise ValueError(f"out must be [M, {d}] {dtype}, got {out.shape} {out.dtype}")
    if out_rows is not None and out_rows.shape != (s,):
        raise ValueError(f"out_rows must be [{s}] (one row per segment), got {out_rows.shape}")
    if (src.dtype == jnp.float64 or not jnp.issubdtype(src.dtype, jnp.floating) or s == 0 or c == 0
            or src.shape[0] == 0):
        return segment_gather_sum_reference(src, splits, idx, weights, mean=mean, **placed)
    if mean and (out_rows is not None or out is not None or num_out is not None or skip_empty
                 or dtype != src.dtype):
        raise ValueError("segment_gather_sum_pallas: mean writes a new [S, D] array in src's dtype (no "
                         "out_rows / out / num_out / skip_empty / dtype)")
    cfg = config if config is not None else default_config(d, c / s)
    if not (_is_pow2(cfg.rows) and _is_pow2(cfg.lanes) and _is_pow2(cfg.combine_rows)
            and cfg.piece % cfg.rows == 0):
        raise ValueError(f"bad config {cfg}")
    splits = jnp.clip(splits.astype(jnp.int32), 0, c)
    idx = None if idx is None else jnp.asarray(idx).astype(jnp.int32)
    weights = None if weights is None else jnp.asarray(weights).astype(jnp.float32)
    if mean:
        # The kernel's own `mean` gave wrong results compiled on the H100 (with item
        # indices and weights; interpret mode passes), so a mean is two sum passes: the
        # weighted rows, and the weights themselves as a [R, 1] source of ones.
        total = _segment_gather_sum_pallas(src, splits, idx, weights, mean=False, config=cfg, interpret=interpret)
        ones = jnp.ones((src.shape[0], 1), src.dtype)
        den = _segment_gather_sum_pallas(ones, splits, idx, weights, mean=False, config=default_config(1, c / s),
                                         interpret=interpret)[:, 0].astype(jnp.float32)
        out = jnp.where(den[:, None] != 0, total.astype(jnp.float32) / jnp.where(den == 0, 1, den)[:, None], 0)
        return out.astype(src.dtype)
    out_rows = None if out_rows is None else jnp.asarray(out_rows).astype(jnp.int32)
    return _segment_gather_sum_pallas(src, splits, idx, weights, out_rows, out, mean=False, config=cfg,
                                      interpret=interpret, num_out=num_out, skip_empty=skip_empty, dtype=dtype)


def segment_gather_sum(src: jax.Array, splits: jax.Array, idx: jax.Array | None = None,
                       weights: jax.Array | None = None, *, mean: bool = False,
                       impl: str | None = None, out_rows: jax.Array | None = None,
                       out: jax.Array | None = None, num_out: int | None = None,
                       skip_empty: bool = False, dtype=None) -> jax.Array:
    """Weighted sum of gathered rows per segment.

    Args:
      src: [R, D] float rows (float32 or bfloat16; accumulation is float32).
      splits: [S + 1] int, non-decreasing, values in [0, C]: segment s covers items
        splits[s] .. splits[s+1] - 1; items outside [splits[0], splits[S]) are ignored.
      idx: [C] int32 row of src for each item (-1: the item contributes nothing), or
        None for item i = row i (C = R).
      weights: [C] float per-item weights, or None (1).
      mean: divide each segment's sum by its weight sum (0 where that is 0, e.g. an
        empty segment).
      impl: dispatch override (see pallas_kernels.dispatch).
      out_rows: [S] int32 distinct output row of each segment (default: row s). With
        `out`, lets several calls fill one array (e.g. bags in sample-major order).
      out: [M, D] array in the output's dtype to write into: rows no segment writes
        keep its values (the kernel writes in place when out is donated or dead).
      num_out: without `out`, the rows of the new output (default S); rows no segment
        writes are then unspecified (zeros in the reference).
      skip_empty: empty segments write nothing (their rows are as if unwritten): the
        backward onto unique rows skips the padding's rows.
      dtype: the output's dtype (default src's): the float32 sums are rounded to it
        once, e.g. bfloat16 rows for a bfloat16 model, or float32 gradients of
        bfloat16 ones.
    Returns:
      [S, D] in `dtype` ([M, D] / [num_out, D] with out / num_out).
    """
    placed = dict(out_rows=out_rows, out=out, num_out=num_out, skip_empty=skip_empty, dtype=dtype)
    which = dispatch.resolve(impl)
    if which == "reference":
        return segment_gather_sum_reference(src, splits, idx, weights, mean=mean, **placed)
    return segment_gather_sum_pallas(src, splits, idx, weights, mean=mean,
                                     interpret=(which == "interpret"), **placed)


# ----------------------------------------------------------------------------- tile

def _tile_kernel(*refs, num_bags, length, lp, g, has_w):
    it = iter(refs)
    splits_ref, idx_ref = next(it), next(it)
    w_ref = next(it) if has_w else None
    src_ref, out_ref = next(it), next(it)
    bag = pl.program_id(0) * g + lax.broadcasted_iota(jnp.int32, (g,), 0)          # [G]
    bok = bag < num_bags
    bc = jnp.where(bok, bag, 0)
    s0 = splits_ref[bc]
    n = jnp.where(bok, jnp.minimum(jnp.maximum(splits_ref[bc + 1] - s0, 0), length), 0)
    jj = lax.broadcasted_iota(jnp.int32, (g, lp), 1)                              # [G, Lp]
    m = jj < n[:, None]
    posc = jnp.where(m, s0[:, None] + jj, 0)
    ids = idx_ref[posc]
    m = m & (ids >= 0)
    rows = src_ref[jnp.where(m, ids, 0), :].astype(jnp.float32)                   # [G, Lp, D]
    if has_w:
        rows = rows * jnp.where(m, w_ref[posc], _F0)[:, :, None]
    rows = jnp.where(m[:, :, None], rows, _F0)
    keep = bok[:, None] & (jj < length)                                           # [G, Lp]
    lane = lax.broadcasted_iota(jnp.int32, (g, lp), 0) * lp + jj
    dst = jnp.where(keep, bc[:, None] * length + jj, num_bags * length + lane)    # distinct
    d = rows.shape[2]
    r = jnp.broadcast_to(dst[:, :, None], (g, lp, d))
    c = lax.broadcasted_iota(jnp.int32, (g, lp, d), 2)
    plgpu.store(out_ref.at[r, c], rows.astype(out_ref.dtype),
                mask=jnp.broadcast_to(keep[:, :, None], (g, lp, d)))


@functools.partial(jax.jit, static_argnames=("length", "interpret"))
def _tile_pallas(src, splits, idx, weights, *, length, interpret):
    b = splits.shape[0] - 1
    d = src.shape[1]
    lp = 1 << max(0, (length - 1).bit_length())
    g = max(1, min(64, 4096 // (lp * d)))
    inputs = [splits, idx] + ([weights] if weights is not None else []) + [src]
    out = pl.pallas_call(
        functools.partial(_tile_kernel, num_bags=b, length=length, lp=lp, g=g,
                          has_w=weights is not None),
        out_shape=jax.ShapeDtypeStruct((b * length, d), src.dtype),
        grid=(_cdiv(b, g),),
        compiler_params=plgpu.CompilerParams(num_warps=4),
        interpret=interpret,
        name="embedding_bag_tile",
    )(*inputs)
    return out.reshape(b, length * d)


def _tile_reference(rows, indices, row_splits, weights, length):
    b = row_splits.shape[0] - 1
    pos = jnp.arange(length)
    lengths = row_splits[1:] - row_splits[:-1]
    m = pos[None, :] < lengths[:, None]
    at = jnp.where(m, row_splits[:-1, None] + pos[None, :], 0)
    ids = indices[at]
    m = m & (ids >= 0)
    x = rows[jnp.where(m, ids, 0)].astype(jnp.float32)
    if weights is not None:
        x = x * weights.astype(jnp.float32)[at][..., None]
    return jnp.where(m[..., None], x, 0).astype(rows.dtype).reshape(b, length * rows.shape[1])


# ----------------------------------------------------------------------------- embedding_bag

@functools.partial(jax.jit, static_argnames=("combiner", "length"))
def embedding_bag_reference(rows: jax.Array, indices: jax.Array, row_splits: jax.Array,
                            weights: jax.Array | None = None, combiner: str = "sum",
                            length: int = 1) -> jax.Array:
    """Pure-jnp reference of `embedding_bag` (differentiable by plain autodiff)."""
    if combiner not in COMBINERS:
        raise ValueError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
    row_splits = jnp.asarray(row_splits).astype(jnp.int32)
    indices = jnp.asarray(indices).astype(jnp.int32)
    if combiner == "tile":
        return _tile_reference(rows, indices, row_splits, weights, length)
    return segment_gather_sum_reference(rows, row_splits, indices, weights, mean=combiner == "mean")


def _occurrence_bags(row_splits, c):
    """[C] bag of each item, -1 for items outside [splits[0], splits[B])."""
    b = row_splits.shape[0] - 1
    bag = segment_of_positions(row_splits, c)
    return jnp.where((bag >= 0) & (bag < b), bag, -1)


def sort_by_row(indices: jax.Array, num_rows: int, valid: jax.Array | None = None):
    """(order [C], splits [num_rows + 1]) grouping items by row, stably: the items of row
    u are order[splits[u] : splits[u+1]] (items with index < 0 or not valid are last,
    outside every range). What the backward of `embedding_bag` needs; `dedup.unique_keys`
    already gives it for the engine (see `splits_from_sorted_segment`)."""
    c = indices.shape[0]
    indices = indices.astype(jnp.int32)
    ok = (indices >= 0) & (indices < num_rows)
    if valid is not None:
        ok = ok & valid
    key = jnp.where(ok, indices, num_rows)
    s_key, order = lax.sort((key.astype(jnp.uint32), jnp.arange(c, dtype=jnp.int32)), num_keys=1, is_stable=True)
    s_key = s_key.astype(jnp.int32)  # sorted as unsigned (keys >= 0): a CUB radix sort on the GPU
    return order, count_below(s_key, num_rows)


def splits_from_sorted_segment(sorted_segment: jax.Array, num_segments: int) -> jax.Array:
    """[num_segments + 1] item ranges from non-decreasing segment ids (ids >= num_segments
    mark invalid items, sorted last), e.g. `Unique.sorted_segment`. Segments must be
    gap-free from 0 (true for dedup output): one unique-index scatter, no search."""
    c = sorted_segment.shape[0]
    seg = sorted_segment.astype(jnp.int32)
    pos = jnp.arange(c, dtype=jnp.int32)
    first = jnp.concatenate([jnp.ones((min(c, 1),), bool), seg[1:] != seg[:-1]])
    live = seg < num_segments
    nlive = jnp.sum(live, dtype=jnp.int32)
    tgt = jnp.where(first & live, seg, num_segments + 1)
    return jnp.full((num_segments + 1,), nlive, jnp.int32).at[tgt].set(
        pos, mode="drop", unique_indices=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _bag(rows, indices, row_splits, weights, combiner, length, interpret):
    return _bag_fwd(rows, indices, row_splits, weights, combiner, length, interpret)[0]


def _bag_fwd(rows, indices, row_splits, weights, combiner, length, interpret):
    if combiner == "tile":
        if _is_pow2(rows.shape[1]) and indices.shape[0] > 0 and row_splits.shape[0] > 1:
            out = _tile_pallas(rows, row_splits, indices, weights, length=length, interpret=interpret)
        else:
            out = _tile_reference(rows, indices, row_splits, weights, length)
    else:
        out = segment_gather_sum_pallas(rows, row_splits, indices, weights,
                                        mean=combiner == "mean", interpret=interpret)
    return out, (rows, indices, row_splits, weights, out)


def _bag_bwd(combiner, length, interpret, res, g):
    rows, indices, row_splits, weights, out = res
    u, d = rows.shape
    c = indices.shape[0]
    b = row_splits.shape[0] - 1
    g = g.astype(jnp.float32)
    bag = _occurrence_bags(row_splits, c)                                        # [C]
    ok = (bag >= 0) & (indices >= 0)
    w = jnp.ones((c,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    if combiner == "tile":
        start = jnp.where(ok, row_splits[jnp.maximum(bag, 0)], 0)
        jpos = jnp.arange(c, dtype=jnp.int32) - start
        ok = ok & (jpos < length)
        g_src = g.reshape(b * length, d)
        src_row = jnp.where(ok, jnp.maximum(bag, 0) * length + jpos, -1)
    else:
        if combiner == "mean":
            den = jnp.zeros((b,), jnp.float32).at[jnp.where(ok, bag, b)].add(
                jnp.where(ok, w, 0), mode="drop")
            g_src = jnp.where(den[:, None] != 0, g / jnp.where(den == 0, 1, den)[:, None], 0)
        else:
            g_src = g
        src_row = jnp.where(ok, bag, -1)
    order, splits = sort_by_row(indices, u, ok)
    g_rows = segment_gather_sum_pallas(g_src, splits, src_row[order], w[order],
                                       interpret=interpret).astype(rows.dtype)
    g_w = None
    if weights is not None:
        # d out / d w_i = <g_src[src_row_i], rows[idx_i]> (minus the mean's own share);
        # XLA drops this when nobody asks for weight gradients.
        e = rows[jnp.where(ok, indices, 0)].astype(jnp.float32)
        gi = g_src[jnp.maximum(src_row, 0)]
        g_w = jnp.sum(gi * e, axis=-1)
        if combiner == "mean":
            g_w = g_w - jnp.sum(gi * out.astype(jnp.float32)[jnp.maximum(bag, 0)], axis=-1)
        g_w = jnp.where(ok, g_w, 0).astype(weights.dtype)
    return g_rows, None, None, g_w


_bag.defvjp(_bag_fwd, _bag_bwd)


def embedding_bag(rows: jax.Array, indices: jax.Array, row_splits: jax.Array,
                  weights: jax.Array | None = None, combiner: str = "sum", length: int = 1,
                  *, impl: str | None = None) -> jax.Array:
    """Gathers rows per item and pools them per bag (CSR), differentiable in rows/weights.

    Args:
      rows: [U, D] float rows (a table, or the unique rows of a lookup).
      indices: [C] int row of each item (-1: the item is skipped).
      row_splits: [B + 1] int CSR bag boundaries (items past row_splits[B] are padding).
      weights: [C] float per-item weights or None (1).
      combiner: "sum": sum_i w_i rows[idx_i] -> [B, D];
        "mean": that sum / sum_i w_i (0 for an empty bag or a zero weight sum) -> [B, D];
        "tile": the first `length` items of each bag, w_i rows[idx_i], zero-padded
        -> [B, length * D].
      impl: dispatch override.

    The kernel path's backward w.r.t. rows sorts the items by row (one XLA sort) and
    reduces with the same segment kernel: d rows[u] = sum over items of u of
    w_i * g[bag_i] (/ weight sum for mean). Deterministic.
    """
    if combiner not in COMBINERS:
        raise ValueError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
    if combiner == "tile" and length < 1:
        raise ValueError(f"tile needs length >= 1, got {length}")
    which = dispatch.resolve(impl)
    if which == "reference":
        return embedding_bag_reference(rows, indices, row_splits, weights, combiner, length)
    rows = jnp.asarray(rows)
    if not jnp.issubdtype(rows.dtype, jnp.floating) or rows.dtype == jnp.float64:
        return embedding_bag_reference(rows, indices, row_splits, weights, combiner, length)
    row_splits = jnp.clip(jnp.asarray(row_splits).astype(jnp.int32), 0, jnp.asarray(indices).shape[0])
    indices = jnp.asarray(indices).astype(jnp.int32)
    weights = None if weights is None else jnp.asarray(weights).astype(jnp.float32)
    return _bag(rows, indices, row_splits, weights, combiner, length, which == "interpret")
