"""A Criteo-like synthetic dataset with a planted signal (`recis-jax gen-data DIR`).

The project's built-in default dataset: no download, any size, and a known ceiling. The
labels come from a logistic model whose true probabilities we know, so a trained model
is judged against the *Bayes-optimal AUC* recorded in ``DIR/meta.json``.

Schema (columns in this order; the RecIS DeepFM example ORC files store label and i* as
one-element ``list<double>``, we use plain nullable ``float64`` so a missing dense value
is a null rather than an empty list):

  =================  ===============  ==============================================
  label              float64          0.0 / 1.0, never null
  i1..i{num_dense}   float64          non-negative integer-valued heavy-tailed counts
                                      (floor of a log-normal); null = missing
  c1..c{num_sparse}  list<int64>      Zipf-distributed IDs, a random-looking 64-bit
                                      hash of the rank (negative values too); between
                                      multi_hot[f] min and max IDs a row (duplicates
                                      possible); empty list = missing
  seq                list<int64>      (seq_len > 0) behaviour sequence of item IDs,
                                      1..seq_len items, empty = missing
  target_item        int64            (seq_len > 0) the candidate item, never null
  =================  ===============  ==============================================

Planted model: ``logit = bias + signal_scale * (sparse + dense + interaction + seq)``,
``label ~ Bernoulli(sigmoid(logit))``:

* sparse: about half the features carry a weight w_f; within them ~30% of IDs carry an
  effect z(f, id) ~ N(0, 1), a deterministic hash of (feature, ID, model seed); a row
  contributes ``w_f * mean(z over its IDs)``.
* dense: about half the dense features contribute ``beta_j * standardised log1p(x)``
  (missing -> 0).
* interaction: ``0.5 * mean(v(c1 IDs)) * mean(v(c2 IDs))`` with another hash-normal v.
* seq: every item belongs to one of 16 hidden categories (``rank % 16``, invisible in
  the hashed ID); a user prefers one category, and the logit rises with the fraction of
  sequence items in the target item's category (what a DIN-style model can learn).

Sequence items come from a vocabulary as large as the largest sparse one. Files:
``DIR/part-00000.<format>``, ... and ``DIR/meta.json`` (args, schema, files, num_rows,
label_mean, bayes_auc, expected_bayes_auc, planted). With the defaults (4 x 25,000
rows) the Bayes AUC is about 0.83 and the label mean about 0.22; ``signal_scale`` moves
the AUC (0 -> 0.5, 0.5 -> ~0.70, 2 -> ~0.93).

Everything is deterministic: the planted model and the rank -> ID hashes from
``model_seed`` (default: ``seed``), the rows of file k from ``SeedSequence([seed, 0, k])``,
so files can be generated independently. A held-out set from the same distribution:
same ``model_seed``, another ``seed``. `planted_probability` recomputes the true
probabilities from a generated table alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from recis_jax.io.convert import FORMATS, TableWriter, _check_compression
from recis_jax.metrics.auc import auc as _exact_auc

NUM_CATEGORIES = 16  # hidden item categories behind the sequence signal
ID_SIGNAL_FRACTION = 0.3  # share of IDs (in a signal-carrying feature) with an effect
INTERACTION_WEIGHT = 0.5
SEQ_WEIGHT = 2.5
SEQ_MATCH_CENTER = 0.3  # rough mean match fraction, so the seq term is about centred
BIAS = -1.2  # label mean ~0.2-0.3, like Criteo's ~0.26
META_VERSION = 1

_U64 = np.uint64
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)
_MIX1_INV = _U64(pow(0xBF58476D1CE4E5B9, -1, 1 << 64))
_MIX2_INV = _U64(pow(0x94D049BB133111EB, -1, 1 << 64))
_GOLDEN = _U64(0x9E3779B97F4A7C15)


# --------------------------------------------------------------------------- hashing


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection on uint64 that scrambles every bit."""
    x = np.asarray(x, dtype=_U64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> _U64(30))
        x = x * _MIX1
        x = x ^ (x >> _U64(27))
        x = x * _MIX2
        x = x ^ (x >> _U64(31))
    return x


def _unxorshift(y: np.ndarray, shift: int) -> np.ndarray:
    x = y.copy()
    for _ in range(64 // shift + 1):
        x = y ^ (x >> _U64(shift))
    return x


def _unmix64(x: np.ndarray) -> np.ndarray:
    """Inverse of `_mix64` (recovers an ID's rank, hence its hidden item category)."""
    x = np.asarray(x, dtype=_U64)
    with np.errstate(over="ignore"):
        x = _unxorshift(x, 31)
        x = x * _MIX2_INV
        x = _unxorshift(x, 27)
        x = x * _MIX1_INV
        x = _unxorshift(x, 30)
    return x


def _unit(h: np.ndarray) -> np.ndarray:
    """uint64 hash -> float64 uniform in [0, 1) from its top 53 bits."""
    return (h >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _hash_normal(ids: np.ndarray, salt: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """(N(0,1) value, uniform) per ID: deterministic functions of (ID, salt)."""
    with np.errstate(over="ignore"):
        h1 = _mix64(ids.view(_U64) ^ salt)
        h2 = _mix64(h1 ^ _GOLDEN)
        h3 = _mix64(h2 ^ _GOLDEN)
    z = np.sqrt(-2.0 * np.log1p(-_unit(h1))) * np.cos(2.0 * np.pi * _unit(h2))  # Box-Muller
    return z, _unit(h3)


def _ids_from_ranks(ranks: np.ndarray, salt: np.uint64) -> np.ndarray:
    """Rank -> 64-bit ID, a fixed permutation per salt (distinct ranks, distinct IDs)."""
    with np.errstate(over="ignore"):
        return _mix64(ranks.astype(_U64) + salt).view(np.int64)


def _ranks_from_ids(ids: np.ndarray, salt: np.uint64) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _unmix64(np.asarray(ids, np.int64).view(_U64)) - salt


# --------------------------------------------------------------------------- AUC


def _tie_groups(sorted_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start index of each run of equal values, group id per element)."""
    new = np.ones(len(sorted_scores), bool)
    new[1:] = sorted_scores[1:] != sorted_scores[:-1]
    return np.flatnonzero(new), np.cumsum(new) - 1


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of `scores` (float [n]) against 0/1 `labels` [n], ties counted as 1/2.

    Any nonzero label is a positive. NaN when only one class is present. Delegates to the
    exact O(n log n) `recis_jax.metrics.auc`.
    """
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores, np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"auc: labels {y.shape} and scores {s.shape} differ in shape")
    return _exact_auc(y, s)


def expected_auc(probs: np.ndarray, scores: np.ndarray | None = None) -> float:
    """The AUC `scores` are expected to reach when labels ~ Bernoulli(`probs`).

    sum_{i != j} p_i (1 - p_j) ([s_i > s_j] + [s_i == s_j] / 2) / sum_{i != j} p_i (1 - p_j):
    expected correctly ordered positive-negative pairs over expected pairs (the ratio of
    expectations, which the sampled AUC approaches as n grows). O(n log n) via a sort and
    prefix sums of (1 - p). `scores` defaults to `probs` (the Bayes-optimal ranking).
    """
    p = np.asarray(probs, np.float64).ravel()
    s = p if scores is None else np.asarray(scores, np.float64).ravel()
    order = np.argsort(s, kind="stable")
    ps = p[order]
    qs = 1.0 - ps
    starts, group = _tie_groups(s[order])
    group_q = np.add.reduceat(qs, starts) if len(starts) else np.zeros(0)
    below_q = np.cumsum(group_q) - group_q  # sum of (1 - p_j) over strictly lower scores
    tie_q = group_q[group] - qs  # same score, j != i
    num = float(np.sum(ps * (below_q[group] + 0.5 * tie_q)))
    den = float(p.sum() * (1.0 - p).sum() - np.sum(p * (1.0 - p)))
    return num / den if den > 0 else float("nan")


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class _Config:
    num_files: int
    rows_per_file: int
    format: str
    seed: int
    model_seed: int
    num_dense: int
    num_sparse: int
    vocab_size: tuple[int, ...]  # per sparse feature
    zipf_a: float
    multi_hot: tuple[tuple[int, int], ...]  # per sparse feature
    seq_len: int
    empty_rate: float
    row_group_size: int
    signal_scale: float
    compression: str

    @property
    def item_vocab(self) -> int:
        # The sequence's item vocabulary: the largest sparse vocabulary (or 100k).
        return max(self.vocab_size) if self.vocab_size else 100_000

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        # One value when every feature shares it, keeping meta.json short.
        d["vocab_size"] = self.vocab_size[0] if len(set(self.vocab_size)) == 1 else list(self.vocab_size)
        d["multi_hot"] = (list(self.multi_hot[0]) if len(set(self.multi_hot)) == 1
                          else [list(m) for m in self.multi_hot])
        return d


def _vocab_list(value: Any, n: int) -> list[int]:
    if isinstance(value, (int, np.integer)):
        return [int(value)] * n
    value = [int(v) for v in value]
    if len(value) == 1:
        return value * n
    if len(value) != n:
        raise ValueError(f"vocab_size: expected one int or {n} (one per sparse feature), got {len(value)}")
    return value


def _multi_hot_list(value: Any, n: int) -> list[tuple[int, int]]:
    value = list(value)
    if len(value) == 2 and all(isinstance(v, (int, np.integer)) for v in value):
        return [(int(value[0]), int(value[1]))] * n
    pairs = [tuple(int(x) for x in v) for v in value]
    if len(pairs) != n or any(len(p) != 2 for p in pairs):
        raise ValueError(f"multi_hot: expected (min, max) or {n} such pairs (one per sparse feature), got {value}")
    return pairs  # type: ignore[return-value]


def _make_config(*, num_files, rows_per_file, format, seed, model_seed, num_dense, num_sparse,
                 vocab_size, zipf_a, multi_hot, seq_len, empty_rate, row_group_size,
                 signal_scale, compression) -> _Config:
    fmt = str(format).lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {format!r}: expected one of {', '.join(FORMATS)}")
    _check_compression(fmt, compression)
    checks = [
        (int(num_files) >= 1, f"num_files must be >= 1, got {num_files}"),
        (int(rows_per_file) >= 1, f"rows_per_file must be >= 1, got {rows_per_file}"),
        (int(num_dense) >= 0, f"num_dense must be >= 0, got {num_dense}"),
        (int(num_sparse) >= 0, f"num_sparse must be >= 0, got {num_sparse}"),
        (float(zipf_a) > 0, f"zipf_a must be > 0, got {zipf_a}"),
        (int(seq_len) >= 0, f"seq_len must be >= 0, got {seq_len}"),
        (0.0 <= float(empty_rate) < 1.0, f"empty_rate must be in [0, 1), got {empty_rate}"),
        (int(row_group_size) >= 1, f"row_group_size must be >= 1, got {row_group_size}"),
        (float(signal_scale) >= 0, f"signal_scale must be >= 0, got {signal_scale}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    n = int(num_sparse)
    vocab = tuple(_vocab_list(vocab_size, n))
    if any(v < 1 for v in vocab):
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    hot = tuple(_multi_hot_list(multi_hot, n))
    if any(not 0 <= a <= b for a, b in hot):
        raise ValueError(f"multi_hot must be (min, max) with 0 <= min <= max, got {multi_hot}")
    cfg = _Config(
        num_files=int(num_files), rows_per_file=int(rows_per_file), format=fmt, seed=int(seed),
        model_seed=int(seed if model_seed is None else model_seed), num_dense=int(num_dense),
        num_sparse=n, vocab_size=vocab, zipf_a=float(zipf_a), multi_hot=hot, seq_len=int(seq_len),
        empty_rate=float(empty_rate), row_group_size=int(row_group_size),
        signal_scale=float(signal_scale), compression=str(compression),
    )
    if cfg.seq_len and cfg.item_vocab < NUM_CATEGORIES:
        raise ValueError(f"a sequence feature needs an item vocabulary >= {NUM_CATEGORIES}")
    return cfg


# --------------------------------------------------------------------------- model


@dataclasses.dataclass
class _Model:
    """The planted logistic model: a deterministic function of (model_seed, shape args)."""

    sparse_weight: np.ndarray  # [num_sparse], 0 = no signal
    id_salt: np.ndarray  # [num_sparse] uint64: rank -> ID permutation per feature
    effect_salt: np.ndarray  # [num_sparse] uint64: ID -> effect hash per feature
    inter_salt: np.ndarray  # [2] uint64: ID -> interaction factor (c1, c2)
    dense_mu: np.ndarray  # [num_dense] log-normal location
    dense_sigma: np.ndarray  # [num_dense] log-normal scale
    dense_beta: np.ndarray  # [num_dense], 0 = no signal
    item_salt: np.uint64

    def describe(self) -> dict:
        return {
            "bias": BIAS,
            "sparse_weight": [round(float(w), 6) for w in self.sparse_weight],
            "id_signal_fraction": ID_SIGNAL_FRACTION,
            "dense_beta": [round(float(b), 6) for b in self.dense_beta],
            "dense_lognormal_mu": [round(float(m), 6) for m in self.dense_mu],
            "dense_lognormal_sigma": [round(float(s), 6) for s in self.dense_sigma],
            "interaction": {"features": ["c1", "c2"], "weight": INTERACTION_WEIGHT}
            if len(self.sparse_weight) >= 2 else None,
            "seq": {"weight": SEQ_WEIGHT, "num_categories": NUM_CATEGORIES, "center": SEQ_MATCH_CENTER},
        }


def _build_model(cfg: _Config) -> _Model:
    rng = np.random.default_rng(np.random.SeedSequence([cfg.model_seed, 1]))
    ns, nd = cfg.num_sparse, cfg.num_dense

    def salts(k: int) -> np.ndarray:
        return rng.integers(0, np.iinfo(np.uint64).max, size=k, dtype=np.uint64, endpoint=True)

    active = rng.random(ns) < 0.5
    if ns and not active.any():
        active[0] = True
    sparse_weight = np.where(active, rng.uniform(0.4, 1.0, ns), 0.0)
    dense_mu = rng.uniform(0.5, 3.0, nd)
    dense_sigma = rng.uniform(0.8, 1.6, nd)
    dense_active = rng.random(nd) < 0.5
    dense_beta = np.where(dense_active, rng.choice([-1.0, 1.0], nd) * rng.uniform(0.15, 0.4, nd), 0.0)
    return _Model(sparse_weight=sparse_weight, id_salt=salts(ns), effect_salt=salts(ns),
                  inter_salt=salts(2), dense_mu=dense_mu, dense_sigma=dense_sigma,
                  dense_beta=dense_beta, item_salt=salts(1)[0])


def _row_mean(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-row mean of a CSR column (0 for empty rows)."""
    n = len(offsets) - 1
    counts = np.diff(offsets)
    rows = np.repeat(np.arange(n), counts)
    sums = np.bincount(rows, weights=values, minlength=n)
    return sums / np.maximum(counts, 1)


def _logit(cfg: _Config, model: _Model, n: int, dense: list[np.ndarray],
           sparse: list[tuple[np.ndarray, np.ndarray]],
           seq: tuple[np.ndarray, np.ndarray] | None, target: np.ndarray | None) -> np.ndarray:
    """The planted logit per row from the column data (the one formula for generating
    and for `planted_probability`). dense: float64 [n] with NaN = missing; sparse and seq:
    (offsets [n+1], int64 IDs); target: int64 [n]."""
    signal = np.zeros(n)
    for f, (offsets, ids) in enumerate(sparse):
        if model.sparse_weight[f]:
            z, u = _hash_normal(ids, model.effect_salt[f])
            signal += model.sparse_weight[f] * _row_mean(np.where(u < ID_SIGNAL_FRACTION, z, 0.0), offsets)
    for j, x in enumerate(dense):
        if model.dense_beta[j]:
            std = (np.log1p(x) - model.dense_mu[j]) / model.dense_sigma[j]
            signal += model.dense_beta[j] * np.where(np.isnan(x), 0.0, std)
    if len(sparse) >= 2:
        v = [_row_mean(_hash_normal(sparse[k][1], model.inter_salt[k])[0], sparse[k][0]) for k in (0, 1)]
        signal += INTERACTION_WEIGHT * v[0] * v[1]
    if seq is not None:
        offsets, items = seq
        item_cat = (_ranks_from_ids(items, model.item_salt) % _U64(NUM_CATEGORIES)).astype(np.int64)
        target_cat = (_ranks_from_ids(target, model.item_salt) % _U64(NUM_CATEGORIES)).astype(np.int64)
        counts = np.diff(offsets)
        match = (item_cat == np.repeat(target_cat, counts)).astype(np.float64)
        frac = _row_mean(match, offsets)
        signal += SEQ_WEIGHT * np.where(counts > 0, frac - SEQ_MATCH_CENTER, 0.0)
    return BIAS + cfg.signal_scale * signal


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


# --------------------------------------------------------------------------- sampling


class _Zipf:
    """Bounded Zipf sampler over ranks 0..V-1 with P(k) ~ (k + 1)^-a, by inverse CDF."""

    def __init__(self, a: float):
        self.a = a
        self._cdfs: dict[int, np.ndarray] = {}

    def sample(self, rng: np.random.Generator, vocab: int, size: int) -> np.ndarray:
        cdf = self._cdfs.get(vocab)
        if cdf is None:
            cdf = np.cumsum(np.arange(1, vocab + 1, dtype=np.float64) ** -self.a)
            cdf /= cdf[-1]
            self._cdfs[vocab] = cdf
        ranks = np.searchsorted(cdf, rng.random(size), side="right")
        return np.minimum(ranks, vocab - 1)


def _offsets(counts: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError("a list column exceeds 2**31 - 1 values in one file: use more, smaller files")
    return offsets


def _generate_file(cfg: _Config, model: _Model, zipf: _Zipf, file_index: int) -> tuple[pa.Table, np.ndarray]:
    """(table, true probabilities) of file `file_index`: a function of the config alone."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0, file_index]))
    n = cfg.rows_per_file
    columns: dict[str, pa.Array] = {}

    dense = []
    for j in range(cfg.num_dense):
        x = np.floor(rng.lognormal(model.dense_mu[j], model.dense_sigma[j], n))
        missing = rng.random(n) < cfg.empty_rate
        dense.append(np.where(missing, np.nan, x))
        columns[f"i{j + 1}"] = pa.array(x, pa.float64(), mask=missing)

    sparse = []
    for f in range(cfg.num_sparse):
        lo, hi = cfg.multi_hot[f]
        counts = rng.integers(lo, hi + 1, n)
        counts[rng.random(n) < cfg.empty_rate] = 0
        offsets = _offsets(counts)
        ids = _ids_from_ranks(zipf.sample(rng, cfg.vocab_size[f], int(offsets[-1])), model.id_salt[f])
        sparse.append((offsets, ids))
        columns[f"c{f + 1}"] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids))

    seq = target = None
    if cfg.seq_len:
        # Each user prefers a category: a share `affinity` of their items comes from it.
        k, v = NUM_CATEGORIES, cfg.item_vocab
        user_cat = rng.integers(0, k, n)
        affinity = rng.beta(2.0, 2.0, n)
        counts = rng.integers(1, cfg.seq_len + 1, n)
        counts[rng.random(n) < cfg.empty_rate] = 0
        offsets = _offsets(counts)
        total = int(offsets[-1])
        row = np.repeat(np.arange(n), counts)
        in_cat = rng.random(total) < affinity[row]
        # An item of category c is rank k*j + c with j ~ Zipf over v // k ranks.
        cat_ranks = k * zipf.sample(rng, v // k, total) + user_cat[row]
        ranks = np.where(in_cat, cat_ranks, zipf.sample(rng, v, total))
        items = _ids_from_ranks(ranks, model.item_salt)
        t_in_cat = rng.random(n) < 0.5
        t_ranks = np.where(t_in_cat, k * zipf.sample(rng, v // k, n) + user_cat, zipf.sample(rng, v, n))
        target = _ids_from_ranks(t_ranks, model.item_salt)
        seq = (offsets, items)
        columns["seq"] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(items))
        columns["target_item"] = pa.array(target)

    probs = _sigmoid(_logit(cfg, model, n, dense, sparse, seq, target))
    label = (rng.random(n) < probs).astype(np.float64)
    table = pa.table({"label": pa.array(label), **columns})
    return table, probs


def _schema(cfg: _Config) -> pa.Schema:
    fields = [pa.field("label", pa.float64())]
    fields += [pa.field(f"i{j + 1}", pa.float64()) for j in range(cfg.num_dense)]
    fields += [pa.field(f"c{f + 1}", pa.list_(pa.int64())) for f in range(cfg.num_sparse)]
    if cfg.seq_len:
        fields += [pa.field("seq", pa.list_(pa.int64())), pa.field("target_item", pa.int64())]
    return pa.schema(fields)


# --------------------------------------------------------------------------- public API


def planted_probability(table: pa.Table, meta: dict) -> np.ndarray:
    """The true P(label = 1) per row of a generated table (any subset of rows works).

    Args:
      table: rows read from the files of a dataset (all its feature columns).
      meta: that dataset's meta.json contents (a dict).

    Returns:
      float64 [num_rows]: bitwise the probabilities the labels were drawn from.
    """
    cfg = _make_config(**meta["args"])
    model = _build_model(cfg)

    def csr(name: str) -> tuple[np.ndarray, np.ndarray]:
        col = table.column(name).combine_chunks()
        offsets = col.offsets.to_numpy().astype(np.int64)
        values = col.values.to_numpy()[offsets[0]:offsets[-1]]
        return offsets - offsets[0], values

    dense = [table.column(f"i{j + 1}").to_numpy(zero_copy_only=False).astype(np.float64)
             for j in range(cfg.num_dense)]  # nulls come back as NaN
    sparse = [csr(f"c{f + 1}") for f in range(cfg.num_sparse)]
    seq = target = None
    if cfg.seq_len:
        seq = csr("seq")
        target = table.column("target_item").to_numpy()
    return _sigmoid(_logit(cfg, model, table.num_rows, dense, sparse, seq, target))


def generate(out_dir: str | os.PathLike, *, num_files: int = 4, rows_per_file: int = 25_000,
             format: str = "parquet", seed: int = 0, model_seed: int | None = None,
             num_dense: int = 13, num_sparse: int = 26,
             vocab_size: int | Sequence[int] = 100_000, zipf_a: float = 1.2,
             multi_hot: tuple[int, int] | Sequence[tuple[int, int]] = (1, 1), seq_len: int = 0,
             empty_rate: float = 0.02, row_group_size: int = 8192, signal_scale: float = 1.0,
             compression: str = "zstd", overwrite: bool = False) -> dict:
    """Generate a Criteo-like dataset with a planted signal into `out_dir`.

    Args:
      out_dir: the dataset directory; must be absent or empty unless `overwrite` (which
        replaces only a previous gen-data output, i.e. a directory holding meta.json).
      num_files, rows_per_file: files `part-00000.<format>`, ... of that many rows each.
      format: "parquet" or "orc".
      seed: sampling seed (file k uses SeedSequence([seed, 0, k])).
      model_seed: seed of the planted model and the rank -> ID hashes (default `seed`).
      num_dense, num_sparse: columns i1..i{num_dense}, c1..c{num_sparse}.
      vocab_size: distinct IDs per sparse feature (one int or one per feature).
      zipf_a: Zipf exponent of ID popularity (P(rank k) ~ (k + 1)^-a; any a > 0).
      multi_hot: (min, max) IDs per row, one pair or one per feature.
      seq_len: > 0 adds `seq` (1..seq_len item IDs) and `target_item`.
      empty_rate: probability that a dense value is null / a list is empty.
      row_group_size: rows per Parquet row group / ORC stripe.
      signal_scale: multiplies the planted logit's signal part (0 = pure noise).
      compression: file codec (zstd, snappy, lz4, gzip/zlib, none).
      overwrite: replace an existing generated dataset.

    Returns:
      The metadata written to `out_dir/meta.json`: args, schema, files [{path, rows}],
      num_rows, label_mean, bayes_auc (AUC of the true probabilities against the sampled
      labels), expected_bayes_auc (see `expected_auc`), planted (model description).
    """
    cfg = _make_config(num_files=num_files, rows_per_file=rows_per_file, format=format, seed=seed,
                       model_seed=model_seed, num_dense=num_dense, num_sparse=num_sparse,
                       vocab_size=vocab_size, zipf_a=zipf_a, multi_hot=multi_hot, seq_len=seq_len,
                       empty_rate=empty_rate, row_group_size=row_group_size,
                       signal_scale=signal_scale, compression=compression)
    out = pathlib.Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"{out}: exists and is not a directory")
        if any(out.iterdir()):
            if not overwrite:
                raise ValueError(f"{out}: directory is not empty (pass overwrite=True / --overwrite to replace it)")
            if not (out / "meta.json").is_file():
                raise ValueError(f"{out}: not a gen-data output (no meta.json): refusing to replace it")

    # Build everything in a sibling temp directory, then swap it in: readers see the old
    # dataset or the new one, never a mix.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model = _build_model(cfg)
        zipf = _Zipf(cfg.zipf_a)
        schema = _schema(cfg)
        files, probs, labels = [], [], []
        for k in range(cfg.num_files):
            table, p = _generate_file(cfg, model, zipf, k)
            name = f"part-{k:05d}.{cfg.format}"
            with TableWriter(tmp / name, schema, format=cfg.format, compression=cfg.compression,
                             row_group_size=cfg.row_group_size) as w:
                w.write(table)
            files.append({"path": name, "rows": table.num_rows})
            probs.append(p)
            labels.append(table.column("label").to_numpy())
        p_all, y_all = np.concatenate(probs), np.concatenate(labels)
        meta = {
            "generator": "recis_jax.io.synthetic",
            "version": META_VERSION,
            "args": cfg.to_json(),
            "schema": {f.name: str(f.type) for f in schema},
            "files": files,
            "num_rows": int(len(y_all)),
            "label_mean": float(y_all.mean()),
            "mean_probability": float(p_all.mean()),
            "bayes_auc": auc(y_all, p_all),
            "expected_bayes_auc": expected_auc(p_all),
            "planted": model.describe(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def load_meta(data_dir: str | os.PathLike) -> dict:
    """Read `data_dir/meta.json` (file paths in it are relative to `data_dir`)."""
    return json.loads((pathlib.Path(data_dir) / "meta.json").read_text())


# --------------------------------------------------------------------------- CLI


def _int_list(value: str) -> int | list[int]:
    parts = [int(v) for v in value.split(",") if v.strip()]
    return parts[0] if len(parts) == 1 else parts


def _pair(value: str) -> tuple[int, int]:
    parts = [int(v) for v in value.replace(":", ",").split(",") if v.strip()]
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, got {value!r}")
    return parts[0], parts[1]


def _run_cli(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        meta = generate(args.dir, num_files=args.num_files, rows_per_file=args.rows_per_file,
                        format=args.format, seed=args.seed, model_seed=args.model_seed,
                        num_dense=args.num_dense, num_sparse=args.num_sparse,
                        vocab_size=args.vocab_size, zipf_a=args.zipf_a, multi_hot=args.multi_hot,
                        seq_len=args.seq_len, empty_rate=args.empty_rate,
                        row_group_size=args.row_group_size, signal_scale=args.signal_scale,
                        compression=args.compression, overwrite=args.overwrite)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        gc.collect()  # release pyarrow writers now, not during interpreter teardown
    print(f"wrote {meta['num_rows']} rows in {len(meta['files'])} {meta['args']['format']} files to "
          f"{args.dir} ({time.perf_counter() - t0:.1f} s)")
    print(f"label mean {meta['label_mean']:.4f}, Bayes AUC {meta['bayes_auc']:.4f} "
          f"(expected {meta['expected_bayes_auc']:.4f})")
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `recis-jax gen-data DIR`."""
    p = subparsers.add_parser(
        "gen-data", help="generate a Criteo-like dataset with a planted signal",
        description="Generate a Criteo-like synthetic dataset (label, i*, c*, optional seq) whose labels "
                    "come from a known logistic model; DIR/meta.json records the Bayes-optimal AUC.",
    )
    p.add_argument("dir", metavar="DIR", help="output directory (absent or empty, or --overwrite)")
    p.add_argument("--num-files", type=int, default=4)
    p.add_argument("--rows-per-file", type=int, default=25_000)
    p.add_argument("--format", default="parquet", help="parquet (default) or orc")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--model-seed", type=int, default=None,
                   help="planted model / ID hash seed (default: --seed); same model, other seed = held-out data")
    p.add_argument("--num-dense", type=int, default=13)
    p.add_argument("--num-sparse", type=int, default=26)
    p.add_argument("--vocab-size", type=_int_list, default=100_000,
                   help="IDs per sparse feature: one int or a comma list, one per feature")
    p.add_argument("--zipf-a", type=float, default=1.2, help="Zipf exponent of ID popularity")
    p.add_argument("--multi-hot", type=_pair, default=(1, 1), help="MIN,MAX IDs per row (default 1,1)")
    p.add_argument("--seq-len", type=int, default=0, help="> 0 adds seq + target_item columns")
    p.add_argument("--empty-rate", type=float, default=0.02, help="share of missing values")
    p.add_argument("--row-group-size", type=int, default=8192)
    p.add_argument("--signal-scale", type=float, default=1.0)
    p.add_argument("--compression", default="zstd")
    p.add_argument("--overwrite", action="store_true", help="replace an existing generated dataset")
    p.set_defaults(func=_run_cli)
