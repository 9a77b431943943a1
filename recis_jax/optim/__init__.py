"""Sparse optimizers for embedding slabs: touched rows only, float32 math, in place.

See `recis_jax.optim.sparse` for the interface (`SparseOptimizer`) and the semantics of
steps, masks and non-finite gradients.
"""

from recis_jax.optim.sparse import (
    OPTIMIZERS,
    SparseOptimizer,
    clip_rows,
    learning_rate_at,
    make,
    nonfinite_rows,
    rowwise_adagrad,
    sparse_adagrad,
    sparse_adam,
    sparse_adamw,
    sparse_adamw_tf,
    sparse_sgd,
)

__all__ = [
    "OPTIMIZERS",
    "SparseOptimizer",
    "clip_rows",
    "learning_rate_at",
    "make",
    "nonfinite_rows",
    "rowwise_adagrad",
    "sparse_adagrad",
    "sparse_adam",
    "sparse_adamw",
    "sparse_adamw_tf",
    "sparse_sgd",
]
