"""PyTorch side of the end-to-end training benchmark (benchmarks/e2e_data.py's workloads).

    python benchmarks/torch_baseline/e2e_torch.py --workload deepfm --dist zipf --mode mapped \
        --device cuda --out /tmp/deepfm_zipf_mapped.json [--warmup 5] [--windows 5] \
        [--window-steps 5] [--compile] [--remat | --no-remat] [--seed 0]

One configuration per process. Plain PyTorch (no TorchRec / FBGEMM), as a competent user
would write it: the categorical features of one embedding dim share one physical table
(feature f's rows at offset sum(vocab[:f]), like the recis-jax side's one table per dim),
nn.Embedding / nn.EmbeddingBag(mode="sum") with sparse=True gradients, and:

  deepfm  26 one-hot features -> one [26M, 9] table: the dim-8 embedding and the bias in
          its last column (one lookup per ID; recis-jax's features.fuse_bias); the
          13 numerics as learned [13, 8] / [13, 1] scaled by value; FM over 39 fields +
          DNN 312-64-16-1; float32 (TF32 matmuls allowed); SparseAdam + AdamW(wd 0), lr 1e-3.
  dcnv2*  26 multi-hot features (MLPerf hotness, sum pooling, EmbeddingBag over one
          sample-major flat index tensor with offsets) -> [sum vocab, 128]; bottom MLP
          13-512-256-128 (ReLU after each), x0 = [bottom, 26 embeddings] (3456), 3 low-rank
          cross layers x = x0 * U(V x) + x (V 3456->512 no bias, U 512->3456 with bias), top
          MLP 3456-1024-1024-512-256-1; dense part bf16 autocast; row-wise Adagrad lr 0.05
          on the coalesced sparse gradient (acc[r] += mean(g_r^2); w[r] -= lr g_r /
          (sqrt(acc[r]) + 1e-10)), dense Adam lr 1e-3.
  seq*    one [item_vocab, 64] item table shared by the behaviour sequence and the candidate,
          one [26 * vocab, 64] table for the 26 one-hot features; encoder: in-proj 64->256 +
          sinusoidal positions, 4 pre-LN bidirectional blocks (hidden 256, 4 heads, FFN 1024,
          tanh-GELU, float32 LayerNorms, SDPA), final LN, out-proj 256->64 in float32; DIN
          target attention (MLP 80-40-1 over [q, k, q-k, q*k], sigmoid, softmax over L,
          float32 pooling); MLP 200-80-1 over [candidate, interest, 26 x 64 embeddings, 13
          numerics] (1805). Dense part bf16 autocast; on CUDA SDPA is restricted to the
          flash kernel (other backends disabled, so it fails loudly rather than fall back).
          Activation checkpointing per encoder block (torch.utils.checkpoint, non-reentrant)
          with --remat, on by default for seq16k. SparseAdam + AdamW(wd 0.01), lr 1e-3.
  Loss: BCE with logits, mean over the batch. Tables float32.

--mode static: the batch's index arrays (already in [0, vocab)) plus the feature's table
  offset (added once when the batch is moved to the device) are the rows: no ID mapping.
--mode mapped: the model gets the raw 64-bit IDs (e2e_data.raw_ids(f, index); items use
  ITEM_FEATURE) and maps them to rows on the device each step, collision-free, with one
  sorted-array map per physical table (raw IDs of different features never collide, so
  the features of a table share one map): torch.unique(ids, return_inverse=True) ->
  torch.searchsorted in the sorted key tensor -> IDs not found take the next free rows,
  and the (sorted) new keys are merged into the sorted keys/rows in O(n) (boolean-mask
  scatter into a preallocated second buffer; the two buffers swap) -> rows of the unique
  IDs gathered through `inverse`. Key buffers and tables are preallocated at the vocabulary
  size (the sum of the table's features' vocabularies; no growth in the timed loop); a
  table that runs out of rows raises. The map's cost (one host sync for the number of
  new IDs included) is part of the timed step. Both modes then run the same embedding,
  model and optimizer code, so mapped - static = the cost of the ID map.

Measurement: `num_batches` batches of make_batch(w, dist, i, seed) are built and moved to
the device before timing (not timed) and cycled. The first step (with torch.compile's
compilation when --compile) is `first_step_s`; then --warmup steps; then --windows windows
of --window-steps steps with one synchronize at the end of each; step_s = median window /
window_steps. Before the model: copy bandwidth (cuda: 1 GiB float32 copy, cpu: 256 MiB;
bytes = read + write; median of 10; GB/s = 1e9 B/s) and matmul peak (cuda: bf16 8192^3,
cpu: float32 2048^3; median of 10). Peak memory: torch.cuda.max_memory_allocated() after a
reset following those probes (it includes the device-resident batches), or ru_maxrss on
the CPU (the whole process). --compile compiles the dense model (+ loss) only; the
lookups, the ID map and the sparse optimizers stay eager; a compile error is recorded in
notes and the run falls back to eager. --compile starts from empty inductor/Triton caches
(a temporary dir, removed at exit) unless TORCHINDUCTOR_CACHE_DIR is set, so first_step_s
holds the whole compilation, like the JAX side's first step holds XLA's.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import pathlib
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # benchmarks/
import e2e_data as D  # noqa: E402

SPARSE_LR = {"deepfm": 1e-3, "dcnv2": 0.05, "seq": 1e-3}
DENSE_LR = 1e-3


def family(w: D.Workload) -> str:
    if w.seq_len:
        return "seq"
    return "dcnv2" if w.name.startswith("dcnv2") else "deepfm"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- ID -> row map

class SortedIdMap:
    """Collision-free int64 ID -> row map on the device: sorted keys + their rows.

    Rows are handed out in first-seen order from 0; capacity = the table's rows. Two
    preallocated key/row buffers: an insert merges the sorted new keys into the sorted
    old ones (positions: pos_in_old + rank_among_new; the old keys fill the rest in
    order) into the other buffer, then the buffers swap.
    """

    def __init__(self, capacity: int, device: torch.device, name: str):
        self.capacity = int(capacity)
        self.name = name
        self.keys = [torch.empty(self.capacity, dtype=torch.int64, device=device) for _ in range(2)]
        self.rows = [torch.empty(self.capacity, dtype=torch.int64, device=device) for _ in range(2)]
        self.cur = 0
        self.n = 0  # live keys (host-side count: no sync to read it)
        self.device = device

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        uniq, inv = torch.unique(ids, sorted=True, return_inverse=True)
        n = self.n
        keys = self.keys[self.cur][:n]
        rows = self.rows[self.cur][:n]
        if n:
            pos = torch.searchsorted(keys, uniq)
            posc = pos.clamp(max=n - 1)
            found = keys[posc] == uniq
            rows_u = rows[posc]
        else:
            pos = torch.zeros_like(uniq)
            found = torch.zeros_like(uniq, dtype=torch.bool)
            rows_u = torch.empty_like(uniq)
        miss = ~found
        new_keys = uniq[miss]            # sorted (uniq is); the one host sync of the map
        k = new_keys.numel()
        if k:
            if n + k > self.capacity:
                raise RuntimeError(f"ID map {self.name!r} out of rows: {n} live + {k} new IDs > "
                                   f"capacity {self.capacity}")
            new_rows = torch.arange(n, n + k, dtype=torch.int64, device=self.device)
            rows_u[miss] = new_rows
            ins = pos[miss] + torch.arange(k, dtype=torch.int64, device=self.device)
            keep = torch.ones(n + k, dtype=torch.bool, device=self.device)
            keep[ins] = False
            dk = self.keys[1 - self.cur][:n + k]
            dr = self.rows[1 - self.cur][:n + k]
            if n:
                dk.masked_scatter_(keep, keys)
                dr.masked_scatter_(keep, rows)
            dk[ins] = new_keys
            dr[ins] = new_rows
            self.cur = 1 - self.cur
            self.n = n + k
        return rows_u[inv]


# ----------------------------------------------------------------------------- optimizers

class RowWiseAdagrad:
    """Row-wise Adagrad for sparse-gradient tables (one float32 accumulator per row):
    acc[r] += mean_d(g[r, d]^2); w[r] -= lr * g[r] / (sqrt(acc[r]) + eps), on the rows of
    the coalesced gradient (vectorised, no per-row Python)."""

    def __init__(self, params, lr: float, eps: float = 1e-10):
        self.params = list(params)
        self.lr, self.eps = lr, eps
        self.acc = [torch.zeros(p.shape[0], dtype=torch.float32, device=p.device) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p, acc in zip(self.params, self.acc):
            if p.grad is None:
                continue
            g = p.grad.coalesce()
            idx, v = g.indices()[0], g.values()
            # row mean of g^2 without a [nnz, dim] temporary (dcnv2: nnz ~ 14M rows of 128)
            a = acc.index_select(0, idx) + torch.linalg.vector_norm(v, 2, dim=1).square() / v.shape[1]
            acc.index_copy_(0, idx, a)
            v.mul_((-self.lr / (a.sqrt() + self.eps)).unsqueeze(1))  # in place: the grad is dropped next
            p.index_add_(0, idx, v)


# ----------------------------------------------------------------------------- dense models

def mlp(widths, final_activation=False, act=nn.ReLU):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2 or final_activation:
            layers.append(act())
    return nn.Sequential(*layers)


class DeepFMDense(nn.Module):
    def __init__(self, num_cat=26, num_dense=D.NUM_DENSE, dim=8, hidden=(64, 16)):
        super().__init__()
        self.dense_embedding = nn.Parameter(torch.randn(num_dense, dim) * 0.01)
        self.dense_bias = nn.Parameter(torch.randn(num_dense, 1) * 0.01)
        self.global_bias = nn.Parameter(torch.zeros(()))
        self.dnn = mlp(((num_cat + num_dense) * dim, *hidden, 1))

    def forward(self, emb, bias, dense, label):
        """emb [B, 26, 8], bias [B, 26, 1], dense [B, 13], label [B] -> mean BCE loss."""
        b = emb.shape[0]
        e = torch.cat([emb, dense[:, :, None] * self.dense_embedding[None]], 1)        # [B, 39, 8]
        first = self.global_bias + bias.sum((1, 2)) + (dense * self.dense_bias[:, 0][None]).sum(1)
        s = e.sum(1)
        second = 0.5 * (s * s - (e * e).sum(1)).sum(-1)
        logit = first + second + self.dnn(e.reshape(b, -1))[:, 0]
        return F.binary_cross_entropy_with_logits(logit.float(), label)


class LowRankCross(nn.Module):
    def __init__(self, d, rank):
        super().__init__()
        self.V = nn.Linear(d, rank, bias=False)
        self.U = nn.Linear(rank, d)

    def forward(self, x0, x):
        return x0 * self.U(self.V(x)) + x


class DCNv2Dense(nn.Module):
    def __init__(self, num_cat=26, dim=128, bottom=(512, 256, 128), num_cross=3, rank=512,
                 top=(1024, 1024, 512, 256, 1), device_type="cuda", bf16=True):
        super().__init__()
        d = (num_cat + 1) * dim
        self.bottom = mlp((D.NUM_DENSE, *bottom), final_activation=True)
        self.cross = nn.ModuleList(LowRankCross(d, rank) for _ in range(num_cross))
        self.top = mlp((d, *top))
        self.device_type, self.bf16 = device_type, bf16

    def forward(self, emb, dense, label):
        """emb [B, 26, 128] float32, dense [B, 13], label [B] -> mean BCE loss."""
        b = emb.shape[0]
        cdt = torch.bfloat16 if self.bf16 else torch.float32
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            z = self.bottom(dense)
            x0 = torch.cat([z[:, None, :].to(cdt), emb.to(cdt)], 1).reshape(b, -1)     # [B, 3456]
            x = x0
            for layer in self.cross:
                x = layer(x0, x)
            logit = self.top(x)[:, 0]
        return F.binary_cross_entropy_with_logits(logit.float(), label)


def sinusoidal_positions(length, dim):
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    ang = pos * inv[None]
    return torch.stack([torch.sin(ang), torch.cos(ang)], -1).reshape(length, -1)[:, :dim]


class Block(nn.Module):
    """Pre-LN bidirectional block: x + Attn(LN(x)); x + FFN(LN(x))."""

    def __init__(self, hidden, heads, ffn):
        super().__init__()
        self.heads = heads
        self.ln_attn = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ln_ffn = nn.LayerNorm(hidden)
        self.ffn_in = nn.Linear(hidden, ffn)
        self.ffn_out = nn.Linear(ffn, hidden)

    def forward(self, x):
        b, L, h = x.shape
        hd = h // self.heads
        qkv = self.qkv(self.ln_attn(x)).view(b, L, 3, self.heads, hd).permute(2, 0, 3, 1, 4)  # [3,B,H,L,hd]
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])                            # [B,H,L,hd]
        x = x + self.out(a.transpose(1, 2).reshape(b, L, h))
        y = F.gelu(self.ffn_in(self.ln_ffn(x)), approximate="tanh")   # flax nn.gelu's default
        return x + self.ffn_out(y)


class SeqDense(nn.Module):
    def __init__(self, seq_len, item_dim=64, num_cat=26, hidden=256, heads=4, ffn=1024, layers=4,
                 att_hidden=(80, 40), mlp_widths=(200, 80), remat=False, device_type="cuda", bf16=True):
        super().__init__()
        self.in_proj = nn.Linear(item_dim, hidden)
        self.register_buffer("pos", sinusoidal_positions(seq_len, hidden).to(
            torch.bfloat16 if bf16 else torch.float32), persistent=False)
        self.blocks = nn.ModuleList(Block(hidden, heads, ffn) for _ in range(layers))
        self.ln_final = nn.LayerNorm(hidden)
        self.out_proj = nn.Linear(hidden, item_dim)
        self.score = mlp((4 * item_dim, *att_hidden, 1), act=nn.Sigmoid)
        self.mlp = mlp((2 * item_dim + num_cat * item_dim + D.NUM_DENSE, *mlp_widths, 1))
        self.remat, self.device_type, self.bf16 = remat, device_type, bf16

    def forward(self, target, seq, cat, dense, label):
        """target [B, 64], seq [B, L, 64], cat [B, 26, 64] float32, dense [B, 13], label [B]."""
        b = seq.shape[0]
        cdt = torch.bfloat16 if self.bf16 else torch.float32
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            x = self.in_proj(seq).to(cdt) + self.pos[None]
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False) if self.remat and self.training else blk(x)
            x = self.ln_final(x)
            with torch.autocast(self.device_type, enabled=False):
                enc = self.out_proj(x.float())                                           # [B, L, 64] f32
            q = target.to(cdt)[:, None, :].expand(-1, enc.shape[1], -1)
            k = enc.to(cdt)
            s = self.score(torch.cat([q, k, q - k, q * k], -1))[..., 0].float()           # [B, L]
            with torch.autocast(self.device_type, enabled=False):
                wts = torch.softmax(s, -1)
                interest = torch.bmm(wts[:, None, :], enc)[:, 0]                          # [B, 64] f32
            feats = torch.cat([target.float(), interest, cat.reshape(b, -1).float(), dense.float()], -1)
            logit = self.mlp(feats.to(cdt))[:, 0]
        return F.binary_cross_entropy_with_logits(logit.float(), label)


# ----------------------------------------------------------------------------- data + model

def table_offsets(vocab):
    return np.concatenate([[0], np.cumsum(vocab)[:-1]]).astype(np.int64)


def prepare_batch(w: D.Workload, np_batch: dict, mode: str, device: torch.device) -> dict:
    """numpy batch -> device tensors. cat: [B*26] (one-hot, sample-major [B, 26]) or
    [B * sum(hotness)] (multi-hot, sample-major: row r's features in order, h_f IDs each);
    static: index + table offset of the feature; mapped: raw_ids(f, index)."""
    b = w.batch
    offs = table_offsets(w.vocab)
    cols = []
    for f, (idx, h) in enumerate(zip(np_batch["cat"], w.hotness)):
        ids = idx + offs[f] if mode == "static" else D.raw_ids(f, idx)
        cols.append(ids.reshape(b, h))
    cat = np.ascontiguousarray(np.concatenate(cols, 1).ravel())
    out = {"label": np_batch["label"], "dense": np_batch["dense"], "cat": cat}
    if w.seq_len:
        items = np.concatenate([np_batch["seq"].ravel(), np_batch["target"]])
        out["items"] = items if mode == "static" else D.raw_ids(D.ITEM_FEATURE, items)
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in out.items()}


class Trainer:
    """Sparse part (tables, ID maps, sparse optimizer; eager) + dense part (optionally
    compiled) + one training step."""

    def __init__(self, w: D.Workload, mode: str, device: torch.device, remat: bool, compile_dense: bool):
        self.w, self.mode, self.device = w, mode, device
        self.fam = fam = family(w)
        self.notes = []
        b = w.batch
        rows = int(sum(w.vocab))
        dt = device.type
        bf16 = fam != "deepfm"

        def table(n, dim, std, bag=False):
            if bag:
                t = nn.EmbeddingBag(n, dim, mode="sum", sparse=True, device=device)
            else:
                t = nn.Embedding(n, dim, sparse=True, device=device)
            with torch.no_grad():
                t.weight.normal_(0.0, std)
            return t

        if fam == "deepfm":
            self.tables = {"emb": table(rows, w.dim + 1, 0.001)}  # bias in the last column
            self.dense = DeepFMDense(len(w.vocab), D.NUM_DENSE, w.dim).to(device)
            dense_opt = torch.optim.AdamW
            dense_kw = dict(weight_decay=0.0)
        elif fam == "dcnv2":
            self.tables = {"emb": table(rows, w.dim, 0.01, bag=True)}
            h = np.asarray(w.hotness)
            starts = (np.arange(b)[:, None] * h.sum() + np.concatenate([[0], np.cumsum(h)[:-1]])[None]).ravel()
            self.bag_offsets = torch.from_numpy(starts.astype(np.int64)).to(device)
            self.dense = DCNv2Dense(len(w.vocab), w.dim, device_type=dt, bf16=bf16).to(device)
            dense_opt = torch.optim.Adam
            dense_kw = {}
        else:
            self.tables = {"cat": table(rows, w.dim, 0.01), "item": table(w.item_vocab, w.dim, 0.01)}
            self.dense = SeqDense(w.seq_len, w.dim, len(w.vocab), remat=remat, device_type=dt, bf16=bf16).to(device)
            dense_opt = torch.optim.AdamW
            dense_kw = dict(weight_decay=0.01)
            if dt == "cuda":
                # flash attention only: fail rather than silently run another kernel
                torch.backends.cuda.enable_flash_sdp(True)
                torch.backends.cuda.enable_mem_efficient_sdp(False)
                torch.backends.cuda.enable_math_sdp(False)
                if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
                    torch.backends.cuda.enable_cudnn_sdp(False)
                self.notes.append("SDPA: flash only (mem-efficient/math/cudnn backends disabled)")
            self.notes.append(f"remat={'on' if remat else 'off'}")
        self.maps = {}
        if mode == "mapped":
            if fam == "seq":
                self.maps = {"cat": SortedIdMap(rows, device, "cat"), "item": SortedIdMap(w.item_vocab, device, "item")}
            else:
                self.maps = {"cat": SortedIdMap(rows, device, "cat")}
        sparse_params = [t.weight for t in self.tables.values()]
        if fam == "dcnv2":
            self.sparse_opt = RowWiseAdagrad(sparse_params, lr=SPARSE_LR["dcnv2"])
        else:
            self.sparse_opt = torch.optim.SparseAdam(sparse_params, lr=SPARSE_LR[fam])
        fused = dict(fused=True) if dt == "cuda" else {}
        self.dense_opt = dense_opt(self.dense.parameters(), lr=DENSE_LR, **dense_kw, **fused)
        self.dense_fn = self.dense
        self.compiled = False
        if compile_dense:
            try:
                self.dense_fn = torch.compile(self.dense)
                self.compiled = True
            except Exception as e:  # noqa: BLE001
                self.notes.append(f"torch.compile failed at wrap: {type(e).__name__}: {e}"[:500])

    def rows(self, batch):
        if self.mode == "static":
            return batch["cat"], batch.get("items")
        cat = self.maps["cat"](batch["cat"])
        items = self.maps["item"](batch["items"]) if "items" in batch else None
        return cat, items

    def loss(self, batch):
        w, b = self.w, self.w.batch
        cat, items = self.rows(batch)
        if self.fam == "deepfm":
            rows = self.tables["emb"](cat).view(b, len(w.vocab), w.dim + 1)
            return self.dense_fn(rows[..., :w.dim], rows[..., w.dim:], batch["dense"], batch["label"])
        if self.fam == "dcnv2":
            emb = self.tables["emb"](cat, self.bag_offsets).view(b, len(w.vocab), w.dim)
            return self.dense_fn(emb, batch["dense"], batch["label"])
        it = self.tables["item"](items)
        seq = it[: b * w.seq_len].view(b, w.seq_len, w.dim)
        target = it[b * w.seq_len:]
        c = self.tables["cat"](cat).view(b, len(w.vocab), w.dim)
        return self.dense_fn(target, seq, c, batch["dense"], batch["label"])

    def step(self, batch):
        loss = self.loss(batch)
        self.sparse_opt.zero_grad(set_to_none=True)
        self.dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sparse_opt.step()
        self.dense_opt.step()
        return loss.detach()

    def first_step(self, batch):
        """The first step; a torch.compile failure there falls back to eager (noted)."""
        if not self.compiled:
            return self.step(batch)
        try:
            out = self.step(batch)
            sync(self.device)
            return out
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:400]
            self.notes.append(f"torch.compile failed, eager fallback: {msg}")
            traceback.print_exc(file=sys.stderr)
            self.dense_fn = self.dense
            self.compiled = False
            self.sparse_opt.zero_grad(set_to_none=True)
            self.dense_opt.zero_grad(set_to_none=True)
            return self.step(batch)


# ----------------------------------------------------------------------------- probes

def _median_time(fn, device, reps=10, warm=3):
    for _ in range(warm):
        fn()
    sync(device)
    ts = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def probe_copy_gbps(device) -> float:
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = _median_time(lambda: dst.copy_(src), device)
    return 2 * nbytes / t / 1e9


def probe_matmul_tflops(device) -> float:
    """bf16 on CUDA; on the CPU the faster of bf16 (AMX, where present) and float32."""
    n = 8192 if device.type == "cuda" else 2048
    best = float("inf")
    for dt in ((torch.bfloat16,) if device.type == "cuda" else (torch.bfloat16, torch.float32)):
        a = torch.randn(n, n, device=device, dtype=dt)
        bm = torch.randn(n, n, device=device, dtype=dt)
        c = torch.empty(n, n, device=device, dtype=dt)
        best = min(best, _median_time(lambda: torch.matmul(a, bm, out=c), device))
    return 2 * n ** 3 / best / 1e12


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


# ----------------------------------------------------------------------------- main

def build(workload: str, dist: str, mode: str, device: str, seed: int = 0, compile_dense: bool = False,
          remat=None):
    """(Trainer, list of device batches) - also used for hand checks."""
    w = D.WORKLOADS[workload]
    dev = torch.device(device)
    torch.manual_seed(seed)
    if remat is None:
        remat = w.name == "seq16k"
    batches = [prepare_batch(w, D.make_batch(w, dist, i, seed), mode, dev) for i in range(w.num_batches)]
    return Trainer(w, mode, dev, remat, compile_dense), batches


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", required=True, choices=sorted(D.WORKLOADS))
    p.add_argument("--dist", required=True, choices=("uniform", "zipf"))
    p.add_argument("--mode", required=True, choices=("static", "mapped"))
    p.add_argument("--device", required=True, choices=("cuda", "cpu"))
    p.add_argument("--out", required=True)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--window-steps", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile the dense model (+ loss)")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing per encoder block (seq*; default: on for seq16k)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls (deepfm), as XLA's GPU default
    notes = []
    if a.compile and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # a cold compile cache, so first_step_s holds the whole compilation (as JAX's first step
        # holds XLA's); set TORCHINDUCTOR_CACHE_DIR yourself to reuse one
        cache = tempfile.mkdtemp(prefix="e2e_torch_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        notes.append("compile caches: fresh (cold) per process")

    copy_gbps = probe_copy_gbps(dev)
    matmul_tflops = probe_matmul_tflops(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)

    trainer, batches = build(a.workload, a.dist, a.mode, a.device, a.seed, a.compile, a.remat)
    w = trainer.w
    sync(dev)

    t0 = time.perf_counter()
    loss = trainer.first_step(batches[0])
    sync(dev)
    first_step_s = time.perf_counter() - t0
    if not torch.isfinite(loss).item():
        raise RuntimeError(f"non-finite loss after the first step: {loss.item()}")

    i = 1
    for _ in range(a.warmup):
        loss = trainer.step(batches[i % len(batches)])
        i += 1
    sync(dev)
    windows = []
    for _ in range(a.windows):
        t0 = time.perf_counter()
        for _ in range(a.window_steps):
            loss = trainer.step(batches[i % len(batches)])
            i += 1
        sync(dev)
        windows.append(time.perf_counter() - t0)
    final_loss = float(loss.item())
    if not math.isfinite(final_loss):
        raise RuntimeError(f"non-finite final loss {final_loss}")
    step_s = statistics.median(windows) / a.window_steps

    if dev.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(dev))
        notes.append("peak = torch.cuda.max_memory_allocated after the probes (incl. device-resident batches)")
    else:
        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        notes.append("peak = ru_maxrss of the process (incl. batches and probes)")
    notes += trainer.notes
    if trainer.compiled:
        notes.append("dense model torch.compile'd (default mode); lookups, ID map and sparse optimizer eager")
    if a.mode == "mapped":
        notes.append("ID map: per table, sorted int64 keys + rows on the device (torch.unique -> searchsorted "
                     "-> O(n) merge of new keys); live keys " +
                     ", ".join(f"{k}={m.n}" for k, m in trainer.maps.items()))
    notes.append(f"{a.warmup} warm-up steps, {a.windows} windows x {a.window_steps} steps, "
                 f"{len(batches)} batches cycled; torch threads {torch.get_num_threads()}")

    res = {
        "framework": "torch",
        "torch": torch.__version__,
        "device": device_name(dev),
        "workload": w.name,
        "dist": a.dist,
        "mode": a.mode,
        "compile": bool(a.compile),
        "batch": w.batch,
        "first_step_s": first_step_s,
        "step_s": step_s,
        "samples_per_s": w.batch / step_s,
        "window_s": windows,
        "peak_mem_bytes": peak,
        "copy_gbps": copy_gbps,
        "matmul_tflops": matmul_tflops,
        "loss": final_loss,
        "notes": "; ".join(notes),
    }
    out = pathlib.Path(a.out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("workload", "dist", "mode", "compile", "samples_per_s", "step_s",
                                          "first_step_s", "peak_mem_bytes", "loss")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
