"""Bucketize: searchsorted(boundaries, x, side="right") with NaN -> len(boundaries).

`bucketize` dispatches (pallas_kernels.dispatch): Pallas-Triton binary search on GPU,
`bucketize_reference` (XLA) elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch


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
    raise NotImplementedError("Pallas bucketize kernel not written yet")
