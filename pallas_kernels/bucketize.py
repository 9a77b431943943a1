"""Bucketize: searchsorted(boundaries, x, side="right") with NaN -> len(boundaries).

`bucketize` dispatches (pallas_kernels.dispatch): Pallas-Triton binary search on GPU,
`bucketize_reference` (XLA) elsewhere.

Kernel design (jax 0.11.2, Pallas-Triton):

* 1-D grid over blocks of the flattened x; each program loads one block of x (masked
  when the last block is partial: 0.11.2 does not mask partial blocks for us) and
  stores one block of int32.
* The boundaries stay in global memory (L1/L2 cached) as the whole array; each
  search step is a vector gather `b_ref[idx]`. The search covers P = next_pow2(n + 1)
  positions in log2(P) branch-free steps. No padding op is needed in the wrapper:
  gather indices are clamped to n - 1, which acts as padding with copies of b[n - 1]
  (the predicate "b[min(j, n-1)] <= x" is still monotone in j), and the final
  `min(pos, n)` fixes x >= b[n - 1] (incl. +inf), where the clamped search runs to
  P - 1 >= n.
* NaN compares false everywhere (pos = 0) and is then mapped to n.
* Layouts (static choice, measured in benchmarks/ops.py):
    "sorted"     the boundaries as given; binary search with clamped gathers.
    "eytzinger"  the wrapper reorders the (clamped) boundaries into BFS order of a
                 complete binary search tree (a tiny XLA gather of P elements);
                 the top levels of the tree share cache lines, so each warp-wide
                 gather touches fewer lines.
    "compare"    small n: broadcast-compare the block against all P boundaries
                 ([block, P]) and count; no gathers. Measured 4x slower than
                 "sorted" at n=16; kept as a tested variant, never the default.
* Not available on 0.11.2 Pallas-Triton: shared-memory scratch (its lowering.py raises
  "scratch memory not implemented in the Triton backend"), and
  `plgpu.load(cache_modifier=".cg")` (KeyError '.cg' in the lowering; "cg" is rejected
  as unsupported). `eviction_policy="evict_first"` lowers but did not help.
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

MAX_BOUNDARIES = 4096


class Config(NamedTuple):
    """Static launch configuration of the kernel."""

    block: int = 1024       # elements of x per program (power of 2)
    num_warps: int = 4
    layout: str = "sorted"  # "sorted" | "eytzinger" | "compare"
    # eviction policy of the streaming x load/out store: None | "evict_first" (the
    # cache_modifier argument (".cg") does not lower on 0.11.2: KeyError '.cg')
    x_evict: str | None = None


def default_config(n: int) -> Config:
    """The configuration `bucketize` uses for n boundaries.

    Chosen by measurement on an H100 (8M float32; benchmarks/results/ops_bucketize_h100*.md,
    GPU time from a profiler trace): up to 64 boundaries the sorted search runs at copy
    speed (24-26 us vs 23.8 us for a same-size copy) and needs no table op; from 256
    boundaries on, the Eytzinger layout is 1.6x (n=256) to 3.7x (n=4096) faster than the
    sorted one (n=1024: 31 vs 93 us), since the top tree levels share cache lines. Block
    size and warps matter by <= 10% there; "compare" was 4x slower even at n=16.
    """
    if n <= 64:
        return Config(block=1024, num_warps=4, layout="sorted")
    return Config(block=1024, num_warps=8, layout="eytzinger")


def bucketize_reference(x: jax.Array, boundaries: jax.Array) -> jax.Array:
    """Pure-jnp reference.

    Args:
      x: float array of any shape.
      boundaries: [n] sorted, finite float boundaries.
    Returns:
      int32 array shaped like x: number of boundaries <= x (a value equal to a boundary
      goes up), and len(boundaries) for NaN.
    """
    b = jnp.asarray(boundaries, x.dtype)
    idx = jnp.searchsorted(b, x, side="right", method="scan_unrolled").astype(jnp.int32)
    return jnp.where(jnp.isnan(x), jnp.int32(b.shape[0]), idx)


def bucketize(x: jax.Array, boundaries: jax.Array, *, impl: str | None = None) -> jax.Array:
    """Bucket index of each x; see `bucketize_reference` for the exact semantics."""
    which = dispatch.resolve(impl)
    if which == "reference":
        return bucketize_reference(x, boundaries)
    return bucketize_pallas(x, boundaries, interpret=(which == "interpret"))


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _eytzinger_order(p: int) -> np.ndarray:
    """perm[i] = in-order rank of node i (1-based BFS numbering) in a complete binary
    tree of p - 1 nodes; perm[0] = 0 (slot 0 is unused)."""
    perm = np.zeros(p, np.int32)
    rank = 0
    # iterative in-order traversal of nodes 1..p-1
    stack, node = [], 1
    while stack or node < p:
        while node < p:
            stack.append(node)
            node = 2 * node
        node = stack.pop()
        perm[node] = rank
        rank += 1
        node = 2 * node + 1
    return perm


def _bucketize_kernel(x_ref, b_ref, o_ref, *, total, n, n_table, p, block, layout,
                      x_evict):
    # x_ref/o_ref: [block] (the last block may run past `total`); b_ref: [n_table].
    steps = p.bit_length() - 1  # log2(p)
    partial = total % block != 0
    if partial:
        offs = pl.program_id(0) * block + lax.broadcasted_iota(jnp.int32, (block,), 0)
        mask = offs < total                                            # [block]
        x = plgpu.load(x_ref, mask=mask, other=jnp.zeros((), x_ref.dtype), eviction_policy=x_evict)
    else:
        mask = None
        x = plgpu.load(x_ref, eviction_policy=x_evict)                  # [block]

    if layout == "compare":
        # b_ref is padded to p with +inf by the wrapper (n_table == p).
        b = b_ref[...]                                                 # [p]
        le = (b[None, :] <= x[:, None]).astype(jnp.int32)              # [block, p]
        pos = jnp.sum(le, axis=1)                                      # [block]
    elif layout == "eytzinger":
        # b_ref: [p], node i at slot i (1-based BFS), slot 0 unused.
        node = jnp.where(b_ref[1] <= x, 3, 2).astype(jnp.int32)       # level 0 is scalar
        for _ in range(steps - 1):
            v = b_ref[node]                                            # [block] gather
            node = 2 * node + (v <= x).astype(jnp.int32)
        pos = node - p
    else:  # sorted
        half = p // 2
        b0 = b_ref[min(half - 1, n_table - 1)]                         # scalar
        pos = jnp.where(b0 <= x, half, 0).astype(jnp.int32)            # [block]
        s = half // 2
        while s >= 1:
            idx = pos + (s - 1)
            if n_table < p:
                idx = jnp.minimum(idx, n_table - 1)
            v = b_ref[idx]                                             # [block] gather
            pos = jnp.where(v <= x, pos + s, pos)
            s //= 2
    # Clamped/padded searches run to p - 1 >= n for x >= b[n-1] (and +inf).
    out = jnp.minimum(pos, n)
    out = jnp.where(x != x, n, out).astype(jnp.int32)                  # NaN -> n
    if partial:
        plgpu.store(o_ref, out, mask=mask, eviction_policy=x_evict)
    else:
        plgpu.store(o_ref, out, eviction_policy=x_evict)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _bucketize_flat(x, b, *, config: Config, interpret: bool):
    # x: [total] float32, b: [n] float32 (n >= 1), total >= 1.
    total = x.shape[0]
    n = b.shape[0]
    p = _next_pow2(n + 1)
    if config.layout == "compare":
        table = jnp.concatenate([b, jnp.full((p - n,), jnp.inf, b.dtype)])
    elif config.layout == "eytzinger":
        order = np.minimum(_eytzinger_order(p), n - 1)
        table = b[order]
    else:
        table = b
    n_table = table.shape[0]
    block = config.block
    kernel = functools.partial(
        _bucketize_kernel, total=total, n=n, n_table=n_table, p=p, block=block,
        layout=config.layout, x_evict=config.x_evict)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((total,), jnp.int32),
        grid=(pl.cdiv(total, block),),
        in_specs=[pl.BlockSpec((block,), lambda i: (i,)),
                  pl.BlockSpec((n_table,), lambda i: (0,))],
        out_specs=pl.BlockSpec((block,), lambda i: (i,)),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps),
        interpret=interpret,
        name="bucketize",
    )(x, table)


def bucketize_pallas(x: jax.Array, boundaries: jax.Array, *, interpret: bool = False,
                     config: Config | None = None) -> jax.Array:
    """The Pallas kernel path of `bucketize` (compiled on GPU, or interpret mode).

    Float dtypes of at most 32 bits run in the kernel (boundaries are first cast to
    x.dtype, as in the reference, then both are widened exactly to float32); any other
    dtype falls back to the reference.
    """
    x = jnp.asarray(x)
    b = jnp.asarray(boundaries)
    if b.ndim != 1:
        raise ValueError(f"boundaries must be 1-D, got shape {b.shape}")
    n = b.shape[0]
    if n > MAX_BOUNDARIES:
        raise ValueError(f"at most {MAX_BOUNDARIES} boundaries, got {n}")
    if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.dtype(x.dtype).itemsize > 4:
        return bucketize_reference(x, b)
    if n == 0 or x.size == 0:
        return jnp.zeros(x.shape, jnp.int32)
    b32 = b.astype(x.dtype).astype(jnp.float32)
    x32 = x.reshape(-1).astype(jnp.float32)
    cfg = config if config is not None else default_config(n)
    if cfg.layout == "compare" and _next_pow2(n + 1) > 64:
        cfg = cfg._replace(layout="sorted")
    out = _bucketize_flat(x32, b32, config=cfg, interpret=interpret)
    return out.reshape(x.shape)
