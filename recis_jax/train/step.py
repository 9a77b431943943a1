"""The jitted steps: `train_step(state, batch) -> (state, metrics)` and `eval_step`.

One compiled program per step: feature ops -> embedding lookup (dedup, find_or_insert,
gather) -> pooling -> model -> loss -> dense grads (jax.grad) and per-unique-row
grads -> optax update of dense params + sparse optimizer on touched rows. The state is
donated, so tables and params update in place.

If any table's insert overflowed, the step changes nothing (params, optimizer state,
tables and the step counter come back as they went in) and `metrics["skipped"]` is
True: the host grows the table and reruns the batch (see trainer.py). A batch with no
live row (a filler batch of an uneven data shard) also changes nothing.

A batch is `{"features": {column: array | Ragged}, "mask": bool [B]}` (host-transformed
columns, see FeatureEngine.host_transform); with `accum_steps = K > 1` it is a tuple of
K such micro-batches whose gradients are summed (dense: averaged over live rows; sparse:
`embedding.accumulate`, still sparse) before one update.

`make_multi_step` runs S such steps in one dispatch (a `lax.scan` over S stacked
batches): the host's per-call cost (a few microseconds per argument buffer, plus
updating the step's CUDA graphs for the batch's new buffers) is paid once per S steps.
That cost bounds small steps: a DeepFM step at batch 4096 runs in 0.67 ms on an H200
while the host needs ~1-1.5 ms to dispatch it (benchmarks/results/trace_deepfm_h200.md).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recis_jax.embedding.engine import EmbeddingEngine, accumulate
from recis_jax.metrics import streaming
from recis_jax.models.losses import multitask_loss
from recis_jax.train.task import Task


class TrainState(NamedTuple):
    """Everything a training run carries from step to step.

    step: int32 [] updates applied so far (skipped steps do not count); the clock the
      tables' last_seen is stamped with. params / opt_state: the dense model and its
      optax state. tables: {physical table: TableState}. stats: streaming train metrics
      since the last log (reset by the host).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    tables: dict
    stats: streaming.StreamingState


def init_state(task: Task, engine: EmbeddingEngine, features, dense_tx: optax.GradientTransformation,
               sparse_opt, sample_batch: dict, seed: int = 0) -> TrainState:
    """Fresh state: tables from `engine.init`, params from `module.init` on the sample
    batch's shapes (eval-mode lookup of empty tables: zeros, no side effects)."""
    tables = engine.init(sparse_opt)

    def init_params(tables, batch):
        feats = features.apply(batch["features"]) if features is not None else batch["features"]
        _, lk = engine.lookup(tables, feats, train=False)
        emb = engine.pool(lk.rows, lk, feats, task.embedding_dtype)
        return task.module.init(jax.random.key(seed), **task.inputs(emb, feats))["params"]

    params = jax.jit(init_params)(tables, sample_batch)
    return TrainState(jnp.zeros((), jnp.int32), params, dense_tx.init(params), tables,
                      streaming.init(task.num_tasks))


def _forward(task: Task, engine: EmbeddingEngine, features, tables, batch, step, train: bool):
    feats = features.apply(batch["features"]) if features is not None else batch["features"]
    tables, lk = engine.lookup(tables, feats, train=train, step=step)
    labels = task.label_array(feats)
    weights = task.weights(feats, batch["mask"])
    return tables, lk, feats, labels, weights


def make_train_step(task: Task, engine: EmbeddingEngine, features, dense_tx: optax.GradientTransformation,
                    sparse_opt, accum_steps: int = 1, donate: bool = True, command_buffers: bool = True):
    """Returns the jitted `train_step(state, batch) -> (state, metrics)`.

    command_buffers: let XLA:GPU run the step's kernels as CUDA graphs (its default).
    They save launch overhead where the host bounds a small step (DeepFM); a step of
    tens of milliseconds runs faster without them (DLRM-dcnv2 on an H200: 32.5 -> 31.4
    ms). No effect off the GPU.

    metrics (device scalars, fetched by the host only when it needs them): loss (the
    weighted mean over the batch's live rows), skipped (bool), live (rows weighted > 0),
    and per table: new (IDs inserted), missing / not_admitted (IDs without a row),
    touched (rows updated), nonfinite (rows whose gradient was not finite; left as they
    were).
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")

    def micro(params, tables, batch, step):
        tables, lk, feats, labels, weights = _forward(task, engine, features, tables, batch, step, True)

        # Pooling's vjp outside the loss: the sum/mean tables pool from the table rows,
        # and (one micro-batch) their gradients stay segment sums that the sparse update
        # adds up where it writes each row.
        emb, pool_vjp = engine.pool_vjp(tables, lk, feats, task.embedding_dtype, segments=accum_steps == 1)

        def loss_fn(p, emb):
            logits = task.logits(p, emb, feats)
            loss, _ = multitask_loss(logits, labels, task.task_weights, weights)
            return loss, logits

        # allow_int: sequence features come with bool masks (their cotangents are float0).
        (loss, logits), (g_params, g_emb) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True,
                                                               allow_int=True)(params, emb)
        (g_rows,) = pool_vjp(g_emb)
        live = jnp.sum(weights > 0, dtype=jnp.int32)
        return tables, lk, loss, logits, labels, weights, g_params, g_rows, live

    def train_step(state: TrainState, batch):
        micro_batches = batch if accum_steps > 1 else (batch,)
        if len(micro_batches) != accum_steps:
            raise ValueError(f"train_step expects {accum_steps} micro-batches, got {len(micro_batches)}")
        tables, sparse, g_sum, loss_sum, live_sum = state.tables, None, None, jnp.float32(0), jnp.int32(0)
        overflow, lookups, stats = jnp.asarray(False), [], state.stats
        for mb in micro_batches:
            tables, lk, loss, logits, labels, weights, g_params, g_rows, live = micro(
                state.params, tables, mb, state.step)
            overflow = overflow | engine.overflow(lk)
            # Each micro-batch's grads are of its own weighted-mean loss: weight them by
            # its live rows and divide by the total, so K micro-batches make one mean.
            w = live.astype(jnp.float32) if accum_steps > 1 else jnp.float32(1)
            g_sum = jax.tree.map(lambda g: g * w, g_params) if g_sum is None else jax.tree.map(
                lambda a, g: a + g * w, g_sum, g_params)
            loss_sum, live_sum = loss_sum + loss * w, live_sum + live
            if accum_steps > 1:
                g_rows = {t: g * w for t, g in g_rows.items()}
            sparse = accumulate(sparse, engine.sparse_grads(lk, g_rows))
            stats = streaming.update(stats, logits, labels, mb["mask"], weights)
            lookups.append(lk)
        denom = jnp.maximum(live_sum, 1).astype(jnp.float32) if accum_steps > 1 else jnp.float32(1)
        g_params = jax.tree.map(lambda g: g / denom, g_sum)
        skip = overflow | (live_sum == 0)

        updates, new_opt = dense_tx.update(g_params, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jnp.where(skip, old, new)  # noqa: E731
        params = jax.tree.map(keep, new_params, state.params)
        opt_state = jax.tree.map(keep, new_opt, state.opt_state)
        if accum_steps > 1:
            sparse = {p: g._replace(grads=g.grads / denom) for p, g in sparse.items()}
        sparse = {p: g._replace(mask=g.mask & ~skip) for p, g in sparse.items()}
        tables, upd = engine.apply_sparse(tables, sparse, sparse_opt, lr_step=state.step.astype(jnp.float32))
        # An overflowed step keeps its inserts out (find_or_insert wrote nothing) and
        # its metrics out of the running stats.
        stats = jax.tree.map(keep, stats, state.stats)
        new_state = TrainState(state.step + (~skip).astype(jnp.int32), params, opt_state, tables, stats)
        metrics = {"loss": loss_sum / denom, "skipped": skip, "overflow": overflow, "live": live_sum,
                   "tables": {}}
        for p in engine.physical:
            t = {k: sum(getattr(lk.tables[p], k) for lk in lookups) for k in ("new", "missing", "not_admitted")}
            t.update(upd.get(p, {}))
            metrics["tables"][p] = t
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=(0,) if donate else (), compiler_options=xla_options(command_buffers))


def xla_options(command_buffers: bool = True) -> dict | None:
    """jax.jit compiler options of a train step (None: XLA's defaults)."""
    return None if command_buffers else {"xla_gpu_enable_command_buffer": ""}


def make_multi_step(train_step, donate: bool = True, command_buffers: bool = True):
    """Returns the jitted `train_steps(state, batches) -> (state, metrics)`: the steps of
    `train_step` (from `make_train_step`) over S batches stacked on a leading axis (every
    leaf [S, ...]; see `stack_batches`), in order, in one call. metrics: each of
    train_step's metrics stacked, [S] per scalar. A step that overflows is skipped as in
    `train_step` (it changes nothing) and the later ones still run: the host reruns the
    skipped batch after growing (trainer.py). command_buffers: as `make_train_step`."""

    def train_steps(state: TrainState, batches):
        return jax.lax.scan(train_step, state, batches)

    return jax.jit(train_steps, donate_argnums=(0,) if donate else (), compiler_options=xla_options(command_buffers))


def stack_batches(batches: list) -> Any:
    """Host batches (numpy trees of one structure and shapes) -> one tree of [S, ...]
    numpy arrays, the argument of `make_multi_step`'s step (one transfer per leaf)."""
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def same_shapes(batches: list) -> bool:
    """True when host batches can be stacked: one tree structure, leaves of equal shapes
    and dtypes (a reader's batches are, except a short last batch)."""
    def sig(b):
        leaves, tree = jax.tree.flatten(b)
        return tree, tuple((np.shape(x), np.result_type(x)) for x in leaves)

    first = sig(batches[0])
    return all(sig(b) == first for b in batches[1:])


def make_eval_step(task: Task, engine: EmbeddingEngine, features):
    """Returns the jitted `eval_step(state, batch) -> (stats, outputs)`: a find-only
    lookup (missing IDs read zeros, tables unchanged), the logits, and the streaming
    metrics updated on the batch's live rows. outputs: {"logits": [B, T], "labels":
    [B, T], "weights": [B]} for exact host-side metrics."""

    def eval_step(state: TrainState, stats: streaming.StreamingState, batch):
        _, lk, feats, labels, weights = _forward(task, engine, features, state.tables, batch, state.step, False)
        logits = task.logits(state.params, engine.pool(lk.rows, lk, feats, task.embedding_dtype), feats)
        stats = streaming.update(stats, logits, labels, batch["mask"], weights)
        out = {"logits": logits, "labels": labels, "weights": weights}
        if task.group is not None:
            out["group"] = _first_id(feats[task.group])
        return stats, out

    return jax.jit(eval_step)


def _first_id(x) -> jax.Array:
    """int64 [B]: a row's first ID (a Ragged feature) or its value (a dense column)."""
    from recis_jax.ragged import Ragged

    if isinstance(x, Ragged):
        start = x.row_splits[:-1]
        has = x.row_splits[1:] > start
        v = x.values[jnp.clip(start, 0, max(x.capacity - 1, 0))] if x.capacity else jnp.zeros_like(start)
        return jnp.where(has, v.astype(jnp.int64), jnp.int64(-1))
    x = jnp.asarray(x)
    return (x[:, 0] if x.ndim == 2 else x).astype(jnp.int64)
