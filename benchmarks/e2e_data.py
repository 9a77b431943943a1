"""Workloads of the end-to-end benchmark and their generated batches (numpy only).

Both frameworks import this file (the recis-jax side in benchmarks/e2e.py, the PyTorch
side in benchmarks/torch_baseline/e2e_torch.py), so they train on the same shapes and
the same IDs, batch for batch. The 64-bit IDs a recommender sees are `raw_ids`: a
well-mixed hash of (feature, index) that needs an ID -> row map; `index` is the same ID
already in [0, vocab) (the static-vocabulary PyTorch baseline uses it directly).

Workloads (`WORKLOADS`):
  deepfm    RecIS's DeepFM example: 26 one-hot categorical features, dim 8 + a dim-1
            bias each (on both sides one 9-wide row per ID, the bias its last column),
            13 numerics, DNN 64-16, batch 4096, SparseAdam + AdamW.
  dcnv2     MLPerf DLRM-dcnv2 shape: 26 multi-hot features at MLPerf's hotness, dim 128,
            vocabularies MLPerf's capped at 4M rows, DCNv2 dense (bottom 512-256-128,
            3 low-rank-512 cross layers, top 1024-1024-512-256-1) in bf16, batch 65536,
            row-wise Adagrad + Adam.
  seq1k / seq16k  long-sequence CTR: a 4-layer bidirectional Transformer (hidden 256,
            4 heads, FFN 1024) over 1024 / 16384 behaviour items (dim 64, one item table
            shared with the candidate), DIN target attention, MLP 200-80 over [candidate,
            interest, 26 categorical dim-64 embeddings, 13 numerics]; bf16; batch 256 / 16;
            SparseAdam + AdamW. Sequences are full length (the throughput worst case).

dcnv2_cpu and seq_cpu are the 2-core CPU's scaled shapes (batch 2048, vocabularies capped
at 100k; sequences of 256 at batch 32).

Distributions: "uniform" (index uniform in [0, vocab): the bandwidth figures) and "zipf"
(Zipf(1.1) ranks truncated to the vocabulary and scattered over [0, vocab) by a fixed bijection).
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

# MLPerf DLRM-dcnv2 (Criteo 1TB multi-hot): vocabulary sizes and hotness per feature.
MLPERF_VOCAB = (40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10, 2209,
                11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36)
MLPERF_HOTNESS = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)
DCNV2_ROW_CAP = 4_000_000
NUM_DENSE = 13


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    batch: int
    vocab: tuple[int, ...]       # per categorical feature
    hotness: tuple[int, ...]     # IDs per row per categorical feature (fixed)
    dim: int                     # embedding dim of the categorical tables
    num_batches: int             # distinct batches generated (the timed loop cycles over them)
    seq_len: int = 0             # > 0: a behaviour sequence + candidate over one item table
    item_vocab: int = 0

    @property
    def lookups_per_sample(self) -> int:
        return sum(self.hotness) + (self.seq_len + 1 if self.seq_len else 0)


WORKLOADS = {
    "deepfm": Workload("deepfm", 4096, (1_000_000,) * 26, (1,) * 26, 8, num_batches=64),
    "dcnv2": Workload("dcnv2", 65536, tuple(min(v, DCNV2_ROW_CAP) for v in MLPERF_VOCAB), MLPERF_HOTNESS, 128,
                      num_batches=4),
    "seq1k": Workload("seq1k", 256, (1_000_000,) * 26, (1,) * 26, 64, num_batches=8, seq_len=1024,
                      item_vocab=1_000_000),
    "seq16k": Workload("seq16k", 16, (1_000_000,) * 26, (1,) * 26, 64, num_batches=8, seq_len=16384,
                       item_vocab=1_000_000),
    # Scaled-down shapes for the 2-core CPU (same models and optimizers).
    "dcnv2_cpu": Workload("dcnv2_cpu", 2048, tuple(min(v, 100_000) for v in MLPERF_VOCAB), MLPERF_HOTNESS, 128,
                          num_batches=4),
    "seq_cpu": Workload("seq_cpu", 32, (100_000,) * 26, (1,) * 26, 64, num_batches=4, seq_len=256,
                        item_vocab=100_000),
}
CPU_WORKLOADS = ("deepfm", "dcnv2_cpu", "seq_cpu")
GPU_WORKLOADS = ("deepfm", "dcnv2", "seq1k", "seq16k")


def raw_ids(feature: int, index: np.ndarray) -> np.ndarray:
    """index in [0, vocab) of `feature` -> a well-mixed int64 ID (splitmix64 finalizer of
    index + feature << 40; a bijection, so distinct indices stay distinct)."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) + (np.uint64(feature + 1) << np.uint64(40))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z.view(np.int64)


def _indices(rng: np.random.Generator, n: int, vocab: int, dist: str) -> np.ndarray:
    if dist == "uniform":
        return rng.integers(0, vocab, n, dtype=np.int64)
    if dist == "zipf":
        # Zipf(1.1) truncated to [1, vocab] (ranks beyond it are redrawn, not clipped: clipping
        # would pile the whole tail, ~24% of the draws at 1M, onto one row)
        ranks = rng.zipf(1.1, n)
        while (bad := ranks > vocab).any():
            ranks[bad] = rng.zipf(1.1, int(bad.sum()))
        # scatter the hot ranks over the vocabulary (multiplying by the prime 2654435761 is a
        # bijection mod vocab when vocab is not a multiple of it)
        return ((ranks.astype(np.int64) - 1) * 2654435761) % vocab
    raise ValueError(f"dist must be 'uniform' or 'zipf', got {dist!r}")


def make_batch(w: Workload, dist: str, i: int, seed: int = 0) -> dict:
    """Batch i of workload w: numpy arrays, identical in every process.

    Returns {"label": float32 [B], "dense": float32 [B, 13] (log1p-scale values >= 0),
    "cat": [int64 [B * hotness_f] indices per feature f, row-major: row r holds
    [r * h, (r + 1) * h)], and with seq_len: "seq": int64 [B, L] item indices,
    "target": int64 [B] item indices}. Use raw_ids(f, cat[f]) for the 64-bit IDs
    (feature index f; items use feature -1).
    """
    rng = np.random.default_rng([seed, i, {"uniform": 0, "zipf": 1}[dist], zlib.crc32(w.name.encode())])
    b = w.batch
    out = {"label": rng.integers(0, 2, b).astype(np.float32),
           "dense": rng.exponential(1.0, (b, NUM_DENSE)).astype(np.float32),
           "cat": [_indices(rng, b * h, v, dist) for v, h in zip(w.vocab, w.hotness)]}
    if w.seq_len:
        out["seq"] = _indices(rng, b * w.seq_len, w.item_vocab, dist).reshape(b, w.seq_len)
        out["target"] = _indices(rng, b, w.item_vocab, dist)
    return out


ITEM_FEATURE = -1  # raw_ids(ITEM_FEATURE, seq / target) for the shared item table


# ----------------------------------------------------------------------------- physical limit

def dense_flops_per_sample(w: Workload) -> float:
    """Matmul FLOPs of forward + backward (3 x forward) of the dense model per sample,
    counting 2 per multiply-add (elementwise work and remat recomputation not counted)."""
    n = len(w.vocab)
    if w.name.startswith("deepfm"):
        d_in = (n + NUM_DENSE) * w.dim
        macs = d_in * 64 + 64 * 16 + 16 + (n + NUM_DENSE) * w.dim  # DNN + FM's sum of squares
    elif w.name.startswith("dcnv2"):
        bottom = (NUM_DENSE, 512, 256, 128)
        top = (1024, 1024, 512, 256, 1)
        d = (n + 1) * w.dim
        macs = sum(a * c for a, c in zip(bottom, bottom[1:]))
        macs += 3 * 2 * d * 512                                   # 3 cross layers, U [d, 512], V [512, d]
        macs += sum(a * c for a, c in zip((d,) + top, top))
    else:  # seq: encoder (in-proj, L layers of QKVO + FFN + attention, out-proj), DIN, MLP
        L, h, ffn, layers, dim = w.seq_len, 256, 1024, 4, w.dim
        per_token = dim * h + layers * (4 * h * h + 2 * h * ffn + 2 * L * h) + h * dim
        din = L * (4 * dim * 80 + 80 * 40 + 40)                   # DIN attention MLP per item (80-40)
        other = (2 * dim + n * dim + NUM_DENSE)
        mlp = other * 200 + 200 * 80 + 80
        macs = L * per_token + din + mlp
    return 3 * 2 * float(macs)


def sparse_bytes(w: Workload, batch: dict, slot_floats_per_elem: float) -> float:
    """Minimum bytes the sparse part must move for one batch: every lookup's row read
    once (float32 gather for pooling), and every distinct row's value + optimizer slots
    read and written once (the update). slot_floats_per_elem: 2 for Adam, 1/dim for
    row-wise Adagrad. ID -> row map traffic is not counted (a static vocabulary has none)."""
    total = 0.0
    feats = [(f, c, w.dim) for f, c in enumerate(batch["cat"])]
    if w.name.startswith("deepfm"):  # the dim-1 biases: the same IDs
        feats += [(f, c, 1) for f, c in enumerate(batch["cat"])]
    for _, idx, dim in feats:
        uniq = np.unique(idx).size
        total += idx.size * dim * 4 + 2 * uniq * dim * 4 * (1 + slot_floats_per_elem)
    if w.seq_len:
        items = np.concatenate([batch["seq"].ravel(), batch["target"]])
        uniq = np.unique(items).size
        total += items.size * w.dim * 4 + 2 * uniq * w.dim * 4 * (1 + slot_floats_per_elem)
    return total
