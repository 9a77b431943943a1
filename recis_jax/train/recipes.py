"""Config -> everything a training run needs, for the CTR models (DeepFM, DCNv2, and
the long-sequence SequenceCTR).

`build(config)` reads the config's `data`, `features`, `embedding`, `model`, `train` and
`loss` groups (see configs/deepfm.py for every key) and returns a `Recipe`: reader
column specs, the FeatureEngine, the EmbeddingEngine, the Task (model + labels) and the
two optimizers. The data layout is Criteo's: a `label` column, numeric columns
i1..i{num_dense} and categorical ID-list columns c1..c{num_categorical} (the built-in
generated dataset, RecIS's DeepFM ORC files and `recis-jax convert --schema criteo`
output all have it); with `features.seq_len > 0` also a `seq` list of item IDs (the
behaviour sequence, first `seq_len` items) and a `target_item` (the candidate), which
share one item table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import optax

from recis_jax.embedding.engine import Admission, EmbeddingEngine, EmbeddingOption
from recis_jax.embedding.eviction import EvictionPolicy
from recis_jax.embedding.initializers import KINDS as INIT_KINDS
from recis_jax.embedding.initializers import Initializer
from recis_jax.features.engine import FeatureEngine
from recis_jax.features.ops import Feature, Log1p, SelectField
from recis_jax.io.columns import FixedLenFeature, VarLenFeature
from recis_jax.models.registry import from_config
from recis_jax.optim import sparse as sparse_optim
from recis_jax.train.task import Task

BIAS_SUFFIX = "_bias"
SEQ, TARGET, ITEM_TABLE = "seq", "target_item", "item"  # the generated sequence columns


@dataclasses.dataclass
class Recipe:
    columns: list            # reader specs
    features: FeatureEngine
    engine: EmbeddingEngine
    task: Task
    dense_tx: optax.GradientTransformation
    sparse_opt: Any
    categorical: list[str]
    numeric: list[str]


def column_names(cfg) -> tuple[list[str], list[str]]:
    """(categorical, numeric) column names of the Criteo layout."""
    f = cfg.features
    return [f"c{i}" for i in range(1, f.num_categorical + 1)], [f"i{i}" for i in range(1, f.num_dense + 1)]


def reader_columns(cfg) -> list:
    cats, nums = column_names(cfg)
    f = cfg.features
    hash_type = f.get("hash_type", None)
    labels = list(cfg.loss.get("labels", ("label",)))
    cols = [FixedLenFeature(name) for name in labels]
    cols += [FixedLenFeature(n) for n in nums]
    cols += [VarLenFeature(c, hash_type=hash_type, hash_bucket=f.hash_bucket) for c in cats]
    if f.get("seq_len"):
        cols += [VarLenFeature(SEQ), VarLenFeature(TARGET)]
    return cols


def _fused_bias(cfg) -> bool:
    return bool(cfg.features.bias_dim) and bool(cfg.features.get("fuse_bias", False))


def feature_engine(cfg) -> FeatureEngine:
    """Numeric columns transformed in place (log1p of values floored at 0, or raw);
    a `<c>_bias` copy of each categorical column when the model has biases in tables of
    their own (`features.fuse_bias` off)."""
    cats, nums = column_names(cfg)
    f = cfg.features
    feats = []
    if f.dense_transform == "log1p":
        feats += [Feature(n, [SelectField(n), Log1p()]) for n in nums]
    elif f.dense_transform not in ("none", None):
        raise ValueError(f"features.dense_transform must be 'log1p' or 'none', got {f.dense_transform!r}")
    if f.bias_dim and not _fused_bias(cfg):
        feats += [Feature(c + BIAS_SUFFIX, [SelectField(c)]) for c in cats]
    if not feats:  # nothing to transform: identity engine over the first numeric column
        feats = [Feature(nums[0], [SelectField(nums[0])])] if nums else [Feature(cats[0], [SelectField(cats[0])])]
    return FeatureEngine(feats)


def embedding_engine(cfg) -> EmbeddingEngine:
    cats, _ = column_names(cfg)
    e, f = cfg.embedding, cfg.features
    kind = e.get("init", "truncated_normal")
    if kind not in INIT_KINDS:
        raise ValueError(f"embedding.init must be one of {INIT_KINDS}, got {kind!r}")
    init = Initializer(kind, std=e.init_std)
    admission = Admission(min_count=e.admit_min_count) if e.get("admit_min_count") else None
    eviction = EvictionPolicy(max_age=e.evict_after_steps) if e.get("evict_after_steps") else None
    # Fused biases: a feature's bias is the last bias_dim columns of its embedding row
    # (the same ID, occurrences and elementwise optimizer), one lookup per ID instead of two.
    width = f.embed_dim + (f.bias_dim if _fused_bias(cfg) else 0)
    opts = {c: EmbeddingOption(width, initializer=init, num_rows=e.num_rows, admission=admission,
                               eviction=eviction, dtype=e.dtype) for c in cats}
    if f.get("seq_len"):  # history and candidate share one item table
        opts[SEQ] = EmbeddingOption(f.embed_dim, combiner="none", length=f.seq_len, initializer=init,
                                    num_rows=e.num_rows, dtype=e.dtype, shared_name=ITEM_TABLE)
        opts[TARGET] = EmbeddingOption(f.embed_dim, initializer=init, num_rows=e.num_rows, dtype=e.dtype,
                                       shared_name=ITEM_TABLE)
    if f.bias_dim and not _fused_bias(cfg):
        opts.update({c + BIAS_SUFFIX: EmbeddingOption(f.bias_dim, initializer=init, num_rows=e.num_rows,
                                                      admission=admission, eviction=eviction, dtype=e.dtype)
                     for c in cats})
    return EmbeddingEngine(opts, seed=cfg.seed)


def task(cfg) -> Task:
    cats, nums = column_names(cfg)
    name = cfg.model.name
    bias = bool(cfg.features.bias_dim)

    def dense(batch):
        return jnp.concatenate([batch[n] for n in nums], axis=1) if nums else None

    if name == "deepfm":
        d = cfg.features.embed_dim

        def inputs(emb, batch):
            rows = jnp.stack([emb[c] for c in cats], axis=1)  # [B, F, dim (+ bias_dim if fused)]
            kw = dict(sparse_emb=rows[..., :d], dense=dense(batch))
            if bias:
                kw["sparse_bias"] = (rows[..., d:] if _fused_bias(cfg)
                                     else jnp.stack([emb[c + BIAS_SUFFIX] for c in cats], axis=1))
            return kw
    elif name == "dcnv2":
        def inputs(emb, batch):
            return dict(sparse_emb=jnp.stack([emb[c] for c in cats], axis=1), dense=dense(batch))
    elif name == "seq_ctr":
        def inputs(emb, batch):
            seq, mask = emb[SEQ]
            other = [jnp.stack([emb[c] for c in cats], axis=1).reshape(seq.shape[0], -1)] if cats else []
            if nums:
                other.append(dense(batch))
            return dict(target=emb[TARGET], seq=seq, mask=mask,
                        other=jnp.concatenate(other, axis=1) if other else None)
    else:
        raise ValueError(f"the CTR recipe builds deepfm, dcnv2 or seq_ctr, not {name!r}")
    loss = cfg.loss
    # DCNv2 casts its embeddings to its compute dtype first: pooling rounds them there.
    emb_dtype = cfg.model.get("dtype", "float32") if name == "dcnv2" else None
    return Task(from_config(cfg.model), inputs, labels=tuple(loss.get("labels", ("label",))),
                task_weights=tuple(loss.task_weights) if loss.get("task_weights") else None,
                sample_weight=loss.get("sample_weight") or None, group=cfg.eval.get("gauc_group") or None,
                embedding_dtype=None if emb_dtype in (None, "float32") else jnp.dtype(emb_dtype))


def dense_optimizer(t) -> optax.GradientTransformation:
    lr = t.dense_lr
    if t.get("warmup_steps"):
        lr = optax.linear_schedule(0.0, t.dense_lr, t.warmup_steps)
    if t.dense_optimizer == "adam":
        return optax.adam(lr)
    if t.dense_optimizer == "adamw":
        return optax.adamw(lr, weight_decay=t.weight_decay)
    if t.dense_optimizer == "adagrad":
        return optax.adagrad(lr)
    if t.dense_optimizer == "sgd":
        return optax.sgd(lr)
    raise ValueError(f"train.dense_optimizer must be adam, adamw, adagrad or sgd, got {t.dense_optimizer!r}")


def sparse_optimizer(t):
    kw = {"lr": t.sparse_lr}
    if t.sparse_optimizer in ("adamw", "adamw_tf"):
        kw["weight_decay"] = t.get("sparse_weight_decay", 0.0)
    return sparse_optim.make(t.sparse_optimizer, **kw)


def build(cfg) -> Recipe:
    cats, nums = column_names(cfg)
    return Recipe(reader_columns(cfg), feature_engine(cfg), embedding_engine(cfg), task(cfg),
                  dense_optimizer(cfg.train), sparse_optimizer(cfg.train), cats, nums)
