"""One update for the whole model: optax for dense params, a sparse optimizer for tables."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def apply_gradients(engine, sparse_opt, dense_tx: optax.GradientTransformation, params: Any, dense_opt_state: Any,
                    dense_grads: Any, tables: dict, lookup, row_grads: dict, global_step: jax.Array
                    ) -> tuple[Any, Any, dict, dict]:
    """Updates dense params (optax) and embedding tables (sparse, touched rows) together.

    Args:
      engine: the EmbeddingEngine that produced `lookup`.
      sparse_opt: a `recis_jax.optim.SparseOptimizer`; its schedule sees `global_step`.
      dense_tx, params, dense_opt_state, dense_grads: the optax side.
      tables, lookup, row_grads: the engine state, its lookup and d loss / d lookup.rows.
      global_step: int32 scalar, the trainer's step (schedules for both sides).
    Returns (params, dense_opt_state, tables, stats). If any table overflowed, nothing
    changes (the step is rerun after the host grows the table), and stats["skipped"]
    says so.
    """
    skip = engine.overflow(lookup)
    updates, new_opt_state = dense_tx.update(dense_grads, dense_opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jnp.where(skip, old, new)  # noqa: E731
    params = jax.tree_util.tree_map(keep, new_params, params)
    dense_opt_state = jax.tree_util.tree_map(keep, new_opt_state, dense_opt_state)
    tables, stats = engine.apply_gradients(tables, lookup, row_grads, sparse_opt,
                                           lr_step=jnp.asarray(global_step, jnp.float32))
    stats = dict(stats, skipped=skip)
    return params, dense_opt_state, tables, stats
