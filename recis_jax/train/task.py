"""What the trainer needs to know about a model: the Flax module, how pooled
embeddings and batch columns become its inputs, and which columns are labels.

    task = Task(DeepFM(), inputs=lambda emb, batch: dict(
                    sparse_emb=jnp.stack([emb[c] for c in CATS], 1),
                    dense=jnp.concatenate([batch[n] for n in NUMS], 1)),
                labels=("label",))

Logits are float32 [B] (one task) or [B, T] (T tasks, column t = labels[t]). The loss is
the weighted sum of per-task sigmoid cross-entropies (`models.losses.multitask_loss`);
rows are weighted by the batch mask (padding rows weigh 0) times the optional
per-sample weight column.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Task:
    """A model and its data contract.

    module: the Flax linen module; called as `module.apply({"params": p}, **kwargs)`.
    inputs: (pooled embeddings {feature: array}, features {column: array | Ragged}) ->
      the module's keyword arguments. Runs inside jit.
    labels: label column names, one per task; each column float [B] or [B, 1].
    task_weights: per-task loss weights (default all 1).
    sample_weight: optional column name of per-sample loss weights ([B] or [B, 1]).
    group: optional column whose first ID groups rows for GAUC at evaluation (e.g. a
      user id feature); None reports no GAUC.
    embedding_dtype: the float dtype the pooled embeddings reach `inputs` in (None:
      float32); bfloat16 for a model that casts them to bfloat16 first anyway (DCNv2):
      the same numbers with half the bytes moved between pooling and the model.
    """

    module: nn.Module
    inputs: Callable[[Mapping[str, Any], Mapping[str, Any]], dict]
    labels: Sequence[str] = ("label",)
    task_weights: Sequence[float] | None = None
    sample_weight: str | None = None
    group: str | None = None
    embedding_dtype: Any = None

    def __post_init__(self):
        if not self.labels:
            raise ValueError("Task needs at least one label column")
        if self.task_weights is not None and len(self.task_weights) != len(self.labels):
            raise ValueError(f"Task: {len(self.labels)} labels but {len(self.task_weights)} task weights")

    @property
    def num_tasks(self) -> int:
        return len(self.labels)

    def label_array(self, features: Mapping[str, Any]) -> jnp.ndarray:
        """float32 [B, T] labels from the label columns."""
        cols = []
        for name in self.labels:
            if name not in features:
                raise KeyError(f"label column {name!r} missing from the batch (have {sorted(features)})")
            cols.append(_column(features[name], name))
        return jnp.stack(cols, axis=1)

    def weights(self, features: Mapping[str, Any], mask: jnp.ndarray) -> jnp.ndarray:
        """float32 [B]: the padding mask times the optional sample-weight column."""
        w = mask.astype(jnp.float32)
        if self.sample_weight is not None:
            if self.sample_weight not in features:
                raise KeyError(f"sample weight column {self.sample_weight!r} missing from the batch")
            w = w * _column(features[self.sample_weight], self.sample_weight)
        return w

    def logits(self, params, emb: Mapping[str, Any], features: Mapping[str, Any]) -> jnp.ndarray:
        """float32 [B, T] logits."""
        out = self.module.apply({"params": params}, **self.inputs(emb, features))
        out = jnp.asarray(out, jnp.float32)
        out = out[:, None] if out.ndim == 1 else out
        if out.ndim != 2 or out.shape[1] != self.num_tasks:
            raise ValueError(f"the model returns logits of shape {out.shape} but the task has {self.num_tasks} "
                             f"label(s) {tuple(self.labels)}: expected [B] or [B, {self.num_tasks}]")
        return out


def _column(x, name: str) -> jnp.ndarray:
    x = jnp.asarray(x)
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 1:
        raise ValueError(f"column {name!r} must be [B] or [B, 1], got shape {x.shape}")
    return x.astype(jnp.float32)
