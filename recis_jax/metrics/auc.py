"""Exact evaluation metrics on the host (NumPy, float64): AUC, GAUC, logloss, calibration.

These are the references the streaming device metrics (`recis_jax.metrics.streaming`)
are measured against, and what an offline evaluation over collected predictions uses.

Labels are in [0, 1]: a row of weight w and label y counts as w * y of a positive and
w * (1 - y) of a negative. For 0/1 labels that is the usual definition; the streaming
histograms use the same rule, so both agree on soft labels too.

AUC is the Mann-Whitney statistic over (positive, negative) pairs, weighted by the
product of their weights, with tied predictions counting 1/2:

    AUC = sum_{i, j} p_i n_j ([s_i > s_j] + [s_i == s_j] / 2) / (sum_i p_i * sum_j n_j)

computed in O(n log n) from one sort: per run of equal scores, its positive weight
times (negative weight strictly below + half its own negative weight). With unit
weights every partial sum is an integer (or a half) in float64, so the result is the
correctly rounded ratio (19/24 is exactly 19/24).
"""

from __future__ import annotations

import numpy as np


def _prepare(labels, preds, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(preds, positive weight, negative weight), all float64 [n]."""
    y = np.asarray(labels, np.float64).ravel()
    s = np.asarray(preds, np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and preds {s.shape} differ in shape")
    if weights is None:
        return s, y, 1.0 - y
    w = np.asarray(weights, np.float64).ravel()
    if w.shape != s.shape:
        raise ValueError(f"weights {w.shape} and preds {s.shape} differ in shape")
    return s, w * y, w * (1.0 - y)


def _runs(new: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start index, positive weight, negative weight) per run; `new` [n] bool marks run starts."""
    start = np.flatnonzero(new)
    return start, np.add.reduceat(pos, start), np.add.reduceat(neg, start)


def auc(labels, preds, weights=None) -> float:
    """Exact ROC AUC of `preds` against `labels`; ties in preds count 1/2.

    Args:
      labels: [n] 0/1 labels (any numeric dtype; soft labels in [0, 1] allowed, see the
        module docstring).
      preds: [n] scores (probabilities or logits: only their order matters).
      weights: optional [n] non-negative row weights; a pair weighs w_i * w_j.

    Returns:
      The AUC as a Python float; NaN when only one class is present (zero positive or
      zero negative weight) or a prediction is NaN.
    """
    s, pos, neg = _prepare(labels, preds, weights)
    total_pos, total_neg = pos.sum(), neg.sum()
    if not (total_pos > 0 and total_neg > 0) or np.isnan(s).any():
        return float("nan")
    order = np.argsort(s, kind="stable")
    s = s[order]
    new = np.ones(len(s), bool)
    new[1:] = s[1:] != s[:-1]
    _, p, n = _runs(new, pos[order], neg[order])
    below = np.cumsum(n) - n  # negative weight at strictly lower scores
    return float(np.sum(p * (below + 0.5 * n)) / (total_pos * total_neg))


def gauc(labels, preds, groups, weights=None) -> tuple[float, int]:
    """Group AUC: sum_g n_g * AUC_g / sum_g n_g over the groups with both classes.

    Every group is evaluated (RecIS skips the first and the last group of its sorted
    order; we do not). A group whose rows are all positive or all negative has no AUC
    and is left out of both sums.

    Args:
      labels, preds, weights: as in `auc`, [n] each.
      groups: [n] integer group ids (e.g. int64 user ids), in any order.

    Returns:
      (GAUC, number of groups used). n_g is the group's row count (its weight sum when
      weighted). (NaN, 0) when no group has both classes; (NaN, 0) too when a
      prediction is NaN.

    One lexsort by (group, pred) and a few segment sums: ~0.35 s for 1M rows in 100k
    groups (one CPU core).
    """
    s, pos, neg = _prepare(labels, preds, weights)
    g = np.asarray(groups).ravel()
    if g.shape != s.shape:
        raise ValueError(f"groups {g.shape} and preds {s.shape} differ in shape")
    if len(s) == 0 or np.isnan(s).any():
        return float("nan"), 0
    order = np.lexsort((s, g))
    g, s = g[order], s[order]
    new_group = np.ones(len(s), bool)
    new_group[1:] = g[1:] != g[:-1]
    new_run = new_group.copy()
    new_run[1:] |= s[1:] != s[:-1]
    start, p, n = _runs(new_run, pos[order], neg[order])
    run_group = np.cumsum(new_group)[start] - 1  # group index of each run
    first_run = np.flatnonzero(new_group[start])  # first run of each group
    cum = np.cumsum(n) - n  # negative weight of all earlier runs (any group)
    below = cum - cum[first_run][run_group]  # ... within the run's own group
    num_groups = len(first_run)
    num = np.bincount(run_group, p * (below + 0.5 * n), num_groups)
    pg = np.bincount(run_group, p, num_groups)
    ng = np.bincount(run_group, n, num_groups)
    used = (pg > 0) & (ng > 0)
    if not used.any():
        return float("nan"), 0
    size = (pg + ng)[used]
    group_auc = num[used] / (pg[used] * ng[used])
    return float(np.sum(size * group_auc) / np.sum(size)), int(used.sum())


def logloss(labels, preds, eps: float = 1e-7, weights=None) -> float:
    """Mean binary cross-entropy of probabilities `preds` [n], clipped to [eps, 1 - eps]
    (weighted mean with `weights` [n]).

    The clip keeps one confidently wrong prediction finite (the streaming metric works
    from logits instead and needs no clip, so the two differ for |logit| > ~16). NaN for
    empty inputs.
    """
    y = np.asarray(labels, np.float64).ravel()
    p = np.clip(np.asarray(preds, np.float64).ravel(), eps, 1.0 - eps)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and preds {p.shape} differ in shape")
    if len(y) == 0:
        return float("nan")
    w = np.ones_like(y) if weights is None else np.asarray(weights, np.float64).ravel()
    return float(-np.sum(w * (y * np.log(p) + (1.0 - y) * np.log1p(-p))) / np.sum(w))


def calibration(labels, preds, weights=None) -> float:
    """Mean prediction / mean label (1 is calibrated; weighted with `weights` [n]); NaN
    when the mean label is 0."""
    y = np.asarray(labels, np.float64).ravel()
    p = np.asarray(preds, np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and preds {p.shape} differ in shape")
    w = np.ones_like(y) if weights is None else np.asarray(weights, np.float64).ravel()
    label_sum = np.sum(w * y)
    return float(np.sum(w * p) / label_sum) if label_sum != 0 else float("nan")
