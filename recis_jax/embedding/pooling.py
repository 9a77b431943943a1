"""Differentiable expand (unique rows -> occurrences) and bag pooling, deterministic.

`expand` gathers each occurrence's row from the unique rows; its backward is the sum of
occurrence gradients per unique row, computed with a sorted-segment scan (no float
atomics), so training is bitwise reproducible. `pool` reduces occurrences into bags
(CSR rows); its backward is a plain gather. `pool_unique` does both for sum/mean bags
in one pass each way, without the occurrence rows (what the engine uses for them).

Kernels: where `KERNEL_OPS` says so and `pallas_kernels.dispatch` resolves to the kernel
(on GPU by default; RECIS_KERNELS=interpret runs it on CPU), the expand backward and the
sum/mean pooling use `pallas_kernels.embedding_bag.segment_gather_sum` (one pass,
deterministic, float32 accumulation in a different order than the scan, so GPU results
differ from the XLA path's by float rounding). Off GPU the XLA code below runs unchanged.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch
from pallas_kernels import embedding_bag as eb
from pallas_kernels.sparse_update import SegmentGrads, as_array
from recis_jax.embedding.dedup import sorted_segment_sum

COMBINERS = ("sum", "mean", "tile", "none")

# Engine ops that take the Pallas kernel when dispatch allows. Measured on an H100
# (benchmarks/results/ops_sparse_h100.md, 4M occurrences, dim 64): the expand backward
# 1.24 ms vs 4.34 ms for the sorted-scan path below; pooling gathered rows into bags of
# 32 0.44 ms vs 2.90 ms.
KERNEL_OPS = {"expand_bwd": True, "pool": True}


def _kernel_impl(op: str) -> str | None:
    """The kernel impl ("pallas" | "interpret") for `op`, or None for the XLA path."""
    if not KERNEL_OPS.get(op, False):
        return None
    which = dispatch.resolve(None)
    return None if which == "reference" else which


@partial(jax.custom_vjp, nondiff_argnums=())
def expand(unique_rows, inverse, order, sorted_segment):
    """occ [C, dim] = unique_rows [U, dim][inverse [C]].

    order [C] / sorted_segment [C] (from `dedup.unique_keys`) give the occurrences
    sorted by unique index, used by the backward pass."""
    return unique_rows[inverse]


def _expand_fwd(unique_rows, inverse, order, sorted_segment):
    return unique_rows[inverse], (unique_rows.shape[0], order, sorted_segment, inverse)


def _expand_bwd(res, g):
    u, order, sorted_segment, inverse = res
    impl = _kernel_impl("expand_bwd")
    if impl is not None:
        # One pass: gather g[order] per unique row's range and sum (no g[order] copy).
        splits = eb.splits_from_sorted_segment(sorted_segment, u)
        g_unique = eb.segment_gather_sum(g, splits, order, impl=impl)
    else:
        g_unique = sorted_segment_sum(g[order], sorted_segment, u)
    return g_unique, None, None, None


expand.defvjp(_expand_fwd, _expand_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _segment_pool(occ, rowids, num_bags):
    return sorted_segment_sum(occ, rowids, num_bags)


def _pool_fwd(occ, rowids, num_bags):
    return sorted_segment_sum(occ, rowids, num_bags), rowids


def _pool_bwd(num_bags, rowids, g):
    # Each occurrence belongs to one bag: its gradient is the bag's (0 for padding).
    g_pad = jnp.concatenate([g, jnp.zeros((1,) + g.shape[1:], g.dtype)])
    return g_pad[jnp.minimum(rowids, num_bags)], None


_segment_pool.defvjp(_pool_fwd, _pool_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _kernel_pool(occ, w, row_splits, rowids, impl):
    """sum_i w_i occ_i per bag with the segment kernel (w None = 1)."""
    return eb.segment_gather_sum(occ, row_splits, None, w, impl=impl)


def _kernel_pool_fwd(occ, w, row_splits, rowids, impl):
    return _kernel_pool(occ, w, row_splits, rowids, impl), (occ, w, rowids, row_splits.shape[0] - 1)


def _kernel_pool_bwd(impl, res, g):
    occ, w, rowids, b = res
    g_pad = jnp.concatenate([g, jnp.zeros((1,) + g.shape[1:], g.dtype)])
    gi = g_pad[jnp.minimum(rowids, b)]  # [C, dim], 0 for padding
    if w is None:
        return gi, None, None, None
    return gi * w[:, None], jnp.sum(gi * occ, axis=-1), None, None


_kernel_pool.defvjp(_kernel_pool_fwd, _kernel_pool_bwd)


def pool_unique(unique_rows: jax.Array, inverse: jax.Array, order: jax.Array, splits: jax.Array,
                bags: list[tuple[jax.Array, jax.Array, jax.Array | None]],
                table: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                dtype=jnp.float32) -> list[jax.Array]:
    """Sum-pools several features' bags straight from their unique rows.

    Args:
      unique_rows: [U, dim] float32, the rows of one lookup's unique keys (`Lookup.rows`).
      inverse, order [N], splits [N + 1]: int32 from `dedup.unique_keys` over lanes that
        are the features' values concatenated in `bags` order.
      bags: per feature (row_splits [B + 1] from 0, rowids [cap] (padding lanes = B),
        weights [cap] float32 or None), the caps summing to N.
      table: optional (embedding [R, dim] float32, row_ids int32 [U], live bool [U]) with
        unique_rows == where(live, embedding[row_ids], 0): the forward then reads the
        table's rows directly and unique_rows only carries the gradient (its values are
        never read, so XLA drops the [U, dim] gather that made them: 3 ms of a DLRM-dcnv2
        step on an H200). The caller guarantees the identity (`EmbeddingEngine.pool_vjp`).
      dtype: of the pooled sums, rounded once from float32 (bfloat16 for a model that
        reads them in bfloat16: half the bytes of the pooled array, its model-side cast
        and its gradient; the same numbers as a float32 output cast by the model).
    Returns:
      per feature [B, dim] `dtype`: sum_i w_i unique_rows[inverse_i] over each bag.

    The same sums as `pool(expand(...))` without the [N, dim] occurrence rows: the
    forward gathers unique rows into the features' bags, the backward gathers bag
    gradients into unique rows (`segment_gather_sum`, deterministic). In a DLRM-dcnv2
    step (14M lanes, dim 128) the occurrence rows and their gradient were 7 GB each and
    ~16 ms of a 57 ms step on an H200. With the kernel, the forward runs one call per
    group of features with the same kernel configuration (bags of about the same
    length), so bags of 1 and of 100 items each get a tile that fits them.

    With the kernel, when all features have the same B (a batch's columns do), the bags
    are laid out sample-major, [B, F, dim]: every kernel call writes its features' bags
    into one array, whose per-feature slices a model stacking the features back into
    [B, F, dim] (DLRM, DeepFM) reads without a copy, and the backward takes that stack's
    gradient as it is (feature-major, it concatenated the F gradients: 1.1 ms of the
    DLRM-dcnv2 step on an H200).
    """
    args = _prepare(unique_rows, inverse, order, splits, bags, table, dtype)
    return list(_pool_unique(*args))


def pool_unique_segments(unique_rows: jax.Array, inverse: jax.Array, order: jax.Array, splits: jax.Array,
                         bags: list[tuple[jax.Array, jax.Array, jax.Array | None]],
                         table: tuple[jax.Array, jax.Array, jax.Array] | None = None, dtype=jnp.float32):
    """`pool_unique`'s forward, and its backward as segment sums: (pooled, grads) with
    `grads(gs) -> SegmentGrads`, the gradient w.r.t. unique_rows for the pooled outputs'
    gradients gs (per feature [B, dim]) in the form the fused sparse update reads
    (`pallas_kernels.sparse_update.SegmentGrads`; `.materialize()` gives `pool_unique`'s
    [U, dim] float32 gradient, weights' gradients aside)."""
    args = _prepare(unique_rows, inverse, order, splits, bags, table, dtype)
    layout, _, weights, _, _, _, bag, order, unique_splits = args
    return list(_pool_unique(*args)), lambda gs: _segments(layout, weights, bag, order, unique_splits, gs)


def _prepare(unique_rows, inverse, order, unique_splits, bags, table, dtype):
    """`_pool_unique`'s arguments: the lanes as consecutive bag segments."""
    starts = tuple(int(v) for v in np.cumsum([0] + [r.shape[0] for _, r, _ in bags]))
    offsets = tuple(int(v) for v in np.cumsum([0] + [sp.shape[0] - 1 for sp, _, _ in bags]))
    nf = len(bags)
    impl = _kernel_impl("pool") or "reference"
    # Sample-major where the kernel can write it so (the XLA path's sums are feature-major).
    bag_major = impl != "reference" and len({sp.shape[0] - 1 for sp, _, _ in bags}) == 1
    # All bags as consecutive segments of the N lanes: a feature's last bag also spans
    # its padding lanes, which point at no row (-1).
    splits = jnp.concatenate([sp[:-1].astype(jnp.int32) + s for (sp, _, _), s in zip(bags, starts)]
                             + [jnp.full(1, starts[-1], jnp.int32)])
    # Each lane's bag: its row of the pooled array (sample-major or feature-major).
    bag = jnp.concatenate([jnp.where(r < sp.shape[0] - 1, r * nf + f if bag_major else r + o, -1)
                           for f, ((sp, r, _), o) in enumerate(zip(bags, offsets))])
    idx = jnp.where(bag >= 0, inverse, -1)  # each lane's unique row
    src, src_idx = unique_rows, idx
    if table is not None:
        src, row_ids, live = table
        iu = jnp.maximum(idx, 0)
        src_idx = jnp.where((idx >= 0) & live[iu], row_ids[iu], -1)  # each lane's table row
    weights = None
    if any(w is not None for _, _, w in bags):
        weights = jnp.concatenate([jnp.ones(r.shape[0], jnp.float32) if w is None else w.astype(jnp.float32)
                                   for _, r, w in bags])
    layout = _Layout(starts, offsets, _config_groups(unique_rows.shape[1], starts, offsets, impl), impl,
                     unique_rows.shape[0], bag_major, jnp.dtype(dtype))
    return layout, unique_rows, weights, src, src_idx, splits, bag, order, unique_splits




class _Layout(NamedTuple):
    """Static layout of `pool_unique`'s lanes: feature f's lanes are starts[f] ..
    starts[f+1] - 1 and its bags segments offsets[f] .. offsets[f+1] - 1; `groups` are
    tuples of (kernel config, features) pooled by one kernel call each; U unique rows;
    bag_major: the pooled rows are [B, F, dim] (else feature after feature);
    dtype: of the pooled rows."""

    starts: tuple[int, ...]
    offsets: tuple[int, ...]
    groups: tuple[tuple[eb.Config | None, tuple[int, ...]], ...]
    impl: str
    num_unique_rows: int
    bag_major: bool
    dtype: jnp.dtype


def _config_groups(dim, starts, offsets, impl):
    """Features grouped by the kernel configuration their average bag length picks
    (one group, config None, on the reference path)."""
    nf = len(starts) - 1
    if impl == "reference":
        return ((None, tuple(range(nf))),)
    cfgs = [eb.default_config(dim, (starts[f + 1] - starts[f]) / max(offsets[f + 1] - offsets[f], 1))
            for f in range(nf)]
    return tuple((c, tuple(f for f in range(nf) if cfgs[f] == c)) for c in dict.fromkeys(cfgs))


def _group_inputs(layout, feats, splits, idx, weights):
    """(splits, idx, weights) of the lanes of `feats` only, in their order."""
    st, off = layout.starts, layout.offsets
    if feats == tuple(range(len(st) - 1)):
        return splits, idx, weights
    local = np.cumsum([0] + [st[f + 1] - st[f] for f in feats])
    g_splits = jnp.concatenate([splits[off[f]:off[f + 1]] - (st[f] - int(lo)) for f, lo in zip(feats, local)]
                               + [jnp.full(1, int(local[-1]), jnp.int32)])
    g_idx = jnp.concatenate([idx[st[f]:st[f + 1]] for f in feats])
    g_w = None if weights is None else jnp.concatenate([weights[st[f]:st[f + 1]] for f in feats])
    return g_splits, g_idx, g_w


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pool_unique(layout, unique_rows, weights, src, src_idx, splits, bag, order, unique_splits):
    """Per feature [B_f, dim]: bag s sums weights[i] * src[src_idx[i]] over lanes
    splits[s] .. splits[s+1] - 1, where src[src_idx[i]] is lane i's unique row (src is
    unique_rows, or the table they came from). bag [N]: each lane's row of the pooled
    array (-1: none), for the backward, which is w.r.t. unique_rows."""
    del unique_rows  # the values come from src; unique_rows is the differentiation point
    nf, d = len(layout.starts) - 1, src.shape[1]
    sizes = [layout.offsets[f + 1] - layout.offsets[f] for f in range(nf)]
    if layout.impl == "reference":  # one group: every feature, feature after feature
        pooled = eb.segment_gather_sum(src, splits, src_idx, weights, impl="reference", dtype=layout.dtype)
        # lax.split: its transpose is one concatenate (slices would transpose to a sum of pads).
        return tuple(jax.lax.split(pooled, sizes))
    out = [None] * nf
    buf = None  # bag_major: [B * F, dim], filled group by group in place
    for cfg, feats in layout.groups:
        g_splits, g_idx, g_w = _group_inputs(layout, feats, splits, src_idx, weights)
        kw = dict(config=cfg, interpret=layout.impl == "interpret", dtype=layout.dtype)
        if layout.bag_major:
            b = sizes[0]
            rows = jnp.concatenate([jnp.arange(b, dtype=jnp.int32) * nf + f for f in feats])
            buf = eb.segment_gather_sum_pallas(src, g_splits, g_idx, g_w, out_rows=rows, out=buf,
                                               num_out=b * nf if buf is None else None, **kw)
            continue
        pooled = eb.segment_gather_sum_pallas(src, g_splits, g_idx, g_w, **kw)
        for f, o in zip(feats, jax.lax.split(pooled, [sizes[f] for f in feats])):
            out[f] = o
    if layout.bag_major:
        buf = buf.reshape(sizes[0], nf, d)
        return tuple(buf[:, f] for f in range(nf))
    return tuple(out)


def _pool_unique_fwd(layout, unique_rows, weights, src, src_idx, splits, bag, order, unique_splits):
    out = _pool_unique(layout, unique_rows, weights, src, src_idx, splits, bag, order, unique_splits)
    return out, (weights, src, src_idx, bag, order, unique_splits)


def _segments(layout, weights, bag, order, unique_splits, gs) -> SegmentGrads:
    """The gradient w.r.t. the unique rows, as segment sums: unique row u's lanes (in
    unique-row order, order[unique_splits[u] : unique_splits[u+1]]) gather their bag's
    gradient."""
    # [bags, dim], rows as `bag` numbers them. Sample-major: the stack of slices of the
    # model's [B, F, dim] gradient, which XLA folds back into that array.
    g = jnp.stack(gs, axis=1).reshape(-1, gs[0].shape[-1]) if layout.bag_major else jnp.concatenate(gs)
    return SegmentGrads(g, unique_splits, bag[order], None if weights is None else weights[order])


def materialize(grads: SegmentGrads | jax.Array) -> jax.Array:
    """Row gradients as their [U, dim] array: SegmentGrads summed (float32) with the
    kernel where the expand backward takes it (KERNEL_OPS); an array as it is."""
    return as_array(grads, _kernel_impl("expand_bwd") or "reference")


def _pool_unique_bwd(layout, res, gs):
    weights, src, src_idx, bag, order, unique_splits = res
    seg = _segments(layout, weights, bag, order, unique_splits, gs)
    g_unique = materialize(seg)
    dw = None
    if weights is not None:  # d/dw_i = <g[bag_i], row_i>; dead code (removed by XLA) unless weights train
        row = jnp.where((src_idx >= 0)[:, None], src[jnp.maximum(src_idx, 0)].astype(jnp.float32), 0)
        dw = jnp.sum(seg.src[jnp.maximum(bag, 0)] * row, -1)
    return g_unique, dw, None, None, None, None, None, None


_pool_unique.defvjp(_pool_unique_fwd, _pool_unique_bwd)


def mean_of_sum(pooled: jax.Array, rowids: jax.Array, weights: jax.Array | None) -> jax.Array:
    """pooled [B, dim] / per-bag weight sum (count without weights); 0 for an empty bag
    or a zero weight sum."""
    b = pooled.shape[0]
    ones = jnp.ones_like(rowids, pooled.dtype) if weights is None else weights.astype(pooled.dtype)
    valid = (rowids < b).astype(pooled.dtype)
    denom = jnp.zeros(b, pooled.dtype).at[rowids].add(ones * valid, mode="drop")
    return jnp.where(denom[:, None] != 0, pooled / jnp.where(denom == 0, 1, denom)[:, None], 0)


def pool(occ: jax.Array, row_splits: jax.Array, rowids: jax.Array, weights: jax.Array | None,
         combiner: str, length: int = 1):
    """Pools occurrence rows occ [C, dim] (float32) into bags.

    Args:
      row_splits [B + 1], rowids [C] (padding lanes = B): the feature's CSR layout.
      weights [C] float32 or None (then 1).
      combiner: "sum": sum_i w_i e_i -> [B, dim];
        "mean": sum_i w_i e_i / sum_i w_i (0 for an empty bag or zero weight sum) -> [B, dim];
        "tile": the first `length` rows of each bag, zero-padded, w_i e_i -> [B, length * dim];
        "none": the sequence, first `length` rows -> ([B, length, dim], mask [B, length]).
    """
    b = row_splits.shape[0] - 1
    if combiner not in COMBINERS:
        raise ValueError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
    w = None if weights is None else weights.astype(occ.dtype)
    if combiner in ("sum", "mean"):
        impl = _kernel_impl("pool")
        if impl is not None:
            pooled = _kernel_pool(occ, w, row_splits, rowids, impl)
        else:
            x = occ if w is None else occ * w[:, None]
            pooled = _segment_pool(x, rowids, b)
        return mean_of_sum(pooled, rowids, w) if combiner == "mean" else pooled
    pos = jnp.arange(length)
    lengths = row_splits[1:] - row_splits[:-1]
    mask = pos[None, :] < lengths[:, None]
    idx = jnp.where(mask, row_splits[:-1, None] + pos[None, :], 0)
    x = occ if w is None else occ * w[:, None]
    seq = jnp.where(mask[..., None], x[idx], 0)  # [B, length, dim]
    if combiner == "tile":
        return seq.reshape(b, length * occ.shape[1])
    return seq, mask
