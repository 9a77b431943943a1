"""Losses in float32, numerically stable (log-sum-exp form), with per-sample weights.

Weighted mean convention (all losses here): `sum(w * l) / max(sum(w), tiny)`. Padding
rows of a partial batch get w = 0 and drop out; multiplying all weights by a constant
does not change the loss (so it does not change the learning rate either).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

_TINY = 1e-12


def _reduce(loss, weights, reduction: str):
    if weights is not None:
        weights = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), loss.shape)
    if reduction == "none":
        return loss if weights is None else loss * weights
    if reduction == "sum":
        return jnp.sum(loss if weights is None else loss * weights)
    if reduction == "mean":
        if weights is None:
            return jnp.mean(loss)
        return jnp.sum(loss * weights) / jnp.maximum(jnp.sum(weights), jnp.float32(_TINY))
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def sigmoid_bce_with_logits(logits, labels, weights=None, reduction: str = "mean"):
    """Binary cross-entropy on logits: `logaddexp(0, x) - x*y`
    (= max(x, 0) - x*y + log1p(exp(-|x|))).

    Never forms sigmoid(x) then log: exact and finite for |x| = 100 and beyond. Written
    with `logaddexp` rather than max/abs because autodiff of max(x, 0) and |x| at x = 0
    picks a subgradient and returns -1 instead of sigmoid(0) - 1 = -0.5 for y = 1; the
    gradient of logaddexp is sigmoid(x) - y everywhere.
    logits, labels: float [...] (labels in [0, 1], soft labels allowed); weights:
    broadcastable to logits or None. Computed in float32. Returns a float32 scalar
    ("mean", "sum") or per-element values ("none", weighted if weights are given).
    """
    x = jnp.asarray(logits).astype(jnp.float32)
    y = jnp.asarray(labels).astype(jnp.float32)
    loss = jnp.logaddexp(jnp.float32(0), x) - x * y
    return _reduce(loss, weights, reduction)


def softmax_ce(logits, labels, weights=None, reduction: str = "mean"):
    """Softmax cross-entropy `logsumexp(x) - x[label]` in float32.

    logits: [..., C]; labels: int [...] (class ids) or float [..., C] (probabilities);
    weights: broadcastable to [...] or None. Returns as `sigmoid_bce_with_logits`.
    """
    x = jnp.asarray(logits).astype(jnp.float32)
    lse = jax.nn.logsumexp(x, axis=-1)
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        picked = jnp.take_along_axis(x, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
        loss = lse - picked
    else:
        loss = lse - jnp.sum(labels.astype(jnp.float32) * x, axis=-1)
    return _reduce(loss, weights, reduction)


def multitask_loss(logits, labels, task_weights: Sequence[float] | None = None,
                   sample_weights=None, task_names: Sequence[str] | None = None):
    """Weighted sum of per-task sigmoid BCE losses.

    Args:
      logits, labels: float [B, T] (task t in column t).
      task_weights: T floats (default all 1).
      sample_weights: [B] (shared by all tasks, e.g. the padding mask) or [B, T]
        (per task, e.g. conversion counted only on clicked rows), or None.
      task_names: names for the returned dict (default "task0", "task1", ...).

    Returns (total float32 scalar, {name: per-task weighted-mean loss}).
    """
    logits = jnp.asarray(logits)
    t = logits.shape[-1]
    names = list(task_names) if task_names is not None else [f"task{i}" for i in range(t)]
    tw = [1.0] * t if task_weights is None else list(task_weights)
    if len(names) != t or len(tw) != t:
        raise ValueError(f"{t} tasks but {len(names)} names and {len(tw)} task weights")
    sw = None if sample_weights is None else jnp.asarray(sample_weights, jnp.float32)
    per_task, total = {}, jnp.float32(0)
    for i, name in enumerate(names):
        w = None if sw is None else (sw if sw.ndim == 1 else sw[:, i])
        per_task[name] = sigmoid_bce_with_logits(logits[:, i], labels[:, i], w)
        total = total + jnp.float32(tw[i]) * per_task[name]
    return total, per_task


def multitask_metrics(logits, labels, sample_weights=None,
                      task_names: Sequence[str] | None = None) -> Mapping[str, dict]:
    """Per-task batch metrics (weighted): logloss, accuracy at 0.5, mean prediction,
    mean label. AUC/GAUC live in `recis_jax.metrics` (streaming, all-reduced)."""
    logits = jnp.asarray(logits).astype(jnp.float32)
    labels = jnp.asarray(labels).astype(jnp.float32)
    t = logits.shape[-1]
    names = list(task_names) if task_names is not None else [f"task{i}" for i in range(t)]
    sw = None if sample_weights is None else jnp.asarray(sample_weights, jnp.float32)
    out = {}
    for i, name in enumerate(names):
        x, y = logits[:, i], labels[:, i]
        w = jnp.ones_like(x) if sw is None else (sw if sw.ndim == 1 else sw[:, i])
        den = jnp.maximum(jnp.sum(w), jnp.float32(_TINY))
        p = jax.nn.sigmoid(x)
        out[name] = {
            "logloss": sigmoid_bce_with_logits(x, y, w),
            "accuracy": jnp.sum(w * ((x > 0) == (y > 0.5)).astype(jnp.float32)) / den,
            "mean_prediction": jnp.sum(w * p) / den,
            "mean_label": jnp.sum(w * y) / den,
        }
    return out
