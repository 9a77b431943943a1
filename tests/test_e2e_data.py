"""The end-to-end benchmark's shared workload data (benchmarks/e2e_data.py): both
frameworks must see the same batches, and the physical-limit figures must be right."""

from __future__ import annotations

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))

import e2e_data as D  # noqa: E402


def test_batches_are_reproducible_and_shaped():
    w = D.WORKLOADS["seq_cpu"]
    a, b = D.make_batch(w, "zipf", 3), D.make_batch(w, "zipf", 3)
    for x, y in zip(a["cat"], b["cat"]):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a["seq"], b["seq"])
    assert not np.array_equal(a["cat"][0], D.make_batch(w, "zipf", 4)["cat"][0])
    assert a["seq"].shape == (w.batch, w.seq_len) and a["dense"].shape == (w.batch, D.NUM_DENSE)
    for c, v, h in zip(a["cat"], w.vocab, w.hotness):
        assert c.shape == (w.batch * h,) and c.min() >= 0 and c.max() < v


def test_zipf_is_truncated_not_clipped():
    # clipping would put ~24% of the draws on the last rank; truncation leaves rank 1 the hottest
    w = D.WORKLOADS["deepfm"]
    c = D.make_batch(w, "zipf", 0)["cat"][0]
    counts = np.bincount(c, minlength=w.vocab[0])
    assert counts.max() / c.size < 0.2
    assert counts[(np.int64(w.vocab[0] - 1) * 2654435761) % w.vocab[0]] / c.size < 0.01


def test_raw_ids_are_distinct_per_feature_and_index():
    idx = np.arange(100_000)
    ids = np.concatenate([D.raw_ids(f, idx) for f in (-1, 0, 1, 25)])
    assert np.unique(ids).size == ids.size


def test_physical_limit_figures():
    # the DLRM-dcnv2 figures: ~96 MFLOP and <= ~440 KB per sample
    w = D.WORKLOADS["dcnv2_cpu"]
    assert abs(D.dense_flops_per_sample(w) / 96e6 - 1) < 0.01
    b = D.make_batch(w, "uniform", 0)
    per_sample = D.sparse_bytes(w, b, 1 / w.dim) / w.batch
    assert 100e3 < per_sample <= 440e3
    # by hand for one one-hot dim-8 feature + bias under Adam: lookups read once, distinct rows r+w with 2 slots
    tiny = D.Workload("deepfm_t", 4, (10,), (1,), 8, 1)
    batch = {"cat": [np.array([1, 1, 2, 3])]}
    assert D.sparse_bytes(tiny, batch, 2.0) == 4 * 8 * 4 + 2 * 3 * 8 * 4 * 3 + 4 * 1 * 4 + 2 * 3 * 1 * 4 * 3
