"""PyTorch DeepFM quality reference on RecIS's Criteo-like DeepFM data (CPU, float32).

    .venv/bin/python benchmarks/deepfm_data.py --data /work/shared/data/recis_deepfm \
        --out /tmp/deepfm_real.npz
    /tmp/recis-torch-venv/bin/python benchmarks/torch_baseline/deepfm_reference.py \
        --npz /tmp/deepfm_real.npz --seeds 0,1,2 --out benchmarks/results/deepfm_quality_torch.json

The first command (repo venv: pyarrow) turns part-{0..7}.orc into one .npz; this script
runs in its own Python 3.11 environment with torch 2.13 (CPU) and numpy only. It writes
the JSON given by --out and a Markdown table next to it (same stem, .md).

Model: a plain-PyTorch mirror of recis_jax/models/deepfm.py with configs/deepfm.py.
  * 26 categorical features, each with its own nn.Embedding(dim 8) and nn.Embedding(dim 1)
    bias table (sparse=True). Raw int64 IDs map collision-free to rows per feature:
    rows 1..K are np.unique of that feature's *training* IDs; row 0 is a padding row
    (padding_idx, zero, never updated) that missing values and eval IDs never seen in
    training map to - a zero embedding and zero bias, like sum pooling over an empty bag
    and a hashtable that does not insert at eval. Init: truncated normal, std 0.001,
    truncated at +-2 std (RecIS's TruncNormalInitializer(0, 0.001), a, b = -2, 2).
  * 13 numeric features: x = log1p(max(v, 0)), missing -> 0; learned [13, 8] embedding
    and [13, 1] bias, both scaled by x, init N(0, 0.01) (as the JAX model's params).
  * logit = b0 + sum of the 39 biases + 0.5 * sum_d[(sum_f e)^2 - sum_f e^2]
            + DNN(concat e: 312 -> 64 -> 16 -> 1, ReLU); b0 init 0; Linear weights as
    flax's default lecun_normal (truncated normal at +-2 std, std = sqrt(1/fan_in) /
    0.8796...), Linear biases 0.
  * Loss: mean binary cross-entropy with logits.
  * Optimizers: torch.optim.SparseAdam(lr 1e-3) on the 52 tables (lazy per touched row,
    step count per table); torch.optim.Adam(lr 1e-3, weight_decay 0) on the dense params
    (configs/deepfm.py: dense_optimizer="adam", dense_lr=1e-3, sparse_optimizer="adamw",
    sparse_lr=1e-3, weight_decay=0.0 - AdamW with zero decay is Adam). Betas (0.9,
    0.999), eps 1e-8 (torch defaults).
  * Everything float32 (the JAX default runs the DNN in bfloat16; this is the f32 reference).

Protocol: train on parts 0..6 (70,000 rows) with batch 1000, shuffled per epoch by
numpy.random.default_rng(seed); evaluate on part 7 after each epoch: exact AUC (ties
get average ranks) and logloss. torch.manual_seed(seed) drives the init. Threads: 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CAT = 26
NUM_DENSE = 13
DIM = 8
HIDDEN = (64, 16)
LECUN_TRUNC = 0.87962566103423978  # std of a unit normal truncated to [-2, 2]


def auc_exact(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC with ties counted as 1/2 (Mann-Whitney U from average ranks)."""
    y = np.asarray(y) > 0.5
    score = np.asarray(score, np.float64)
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    # average rank (1-based) of each run of equal scores
    starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(avg, ends - starts)
    npos = int(y.sum())
    nneg = len(y) - npos
    if npos == 0 or nneg == 0:
        return float("nan")
    return float((ranks[y].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


def logloss(y: np.ndarray, logit: np.ndarray) -> float:
    z = np.asarray(logit, np.float64)
    y = np.asarray(y, np.float64)
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


class DeepFM(nn.Module):
    def __init__(self, table_rows: list[int]):
        super().__init__()
        self.emb = nn.ModuleList(nn.Embedding(r, DIM, padding_idx=0, sparse=True) for r in table_rows)
        self.bias = nn.ModuleList(nn.Embedding(r, 1, padding_idx=0, sparse=True) for r in table_rows)
        for t in (*self.emb, *self.bias):
            with torch.no_grad():
                nn.init.trunc_normal_(t.weight, mean=0.0, std=0.001, a=-0.002, b=0.002)
                t.weight[0].zero_()
        self.dense_embedding = nn.Parameter(torch.empty(NUM_DENSE, DIM).normal_(0.0, 0.01))
        self.dense_bias = nn.Parameter(torch.empty(NUM_DENSE, 1).normal_(0.0, 0.01))
        self.global_bias = nn.Parameter(torch.zeros(()))
        widths = [(NUM_CAT + NUM_DENSE) * DIM, *HIDDEN, 1]
        self.dnn = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:]))
        for lin in self.dnn:
            std = math.sqrt(1.0 / lin.in_features) / LECUN_TRUNC
            with torch.no_grad():
                nn.init.trunc_normal_(lin.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
                lin.bias.zero_()

    def sparse_parameters(self):
        return [t.weight for t in (*self.emb, *self.bias)]

    def dense_parameters(self):
        return [self.dense_embedding, self.dense_bias, self.global_bias,
                *(p for lin in self.dnn for p in lin.parameters())]

    def forward(self, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """rows [B, 26] int64 (0 = missing/unseen), x [B, 13] float32 (log1p'd) -> logits [B]."""
        b = rows.shape[0]
        e_cat = torch.stack([t(rows[:, f]) for f, t in enumerate(self.emb)], 1)        # [B,26,8]
        b_cat = torch.cat([t(rows[:, f]) for f, t in enumerate(self.bias)], 1)         # [B,26]
        e_num = x[:, :, None] * self.dense_embedding[None]                            # [B,13,8]
        b_num = x * self.dense_bias[:, 0][None]                                       # [B,13]
        e = torch.cat([e_cat, e_num], 1)                                              # [B,39,8]
        first = self.global_bias + b_cat.sum(1) + b_num.sum(1)
        s = e.sum(1)
        second = 0.5 * (s * s - (e * e).sum(1)).sum(-1)
        h = e.reshape(b, -1)
        for i, lin in enumerate(self.dnn):
            h = lin(h)
            if i < len(self.dnn) - 1:
                h = F.relu(h)
        return first + second + h[:, 0]


def prepare(npz: str, eval_part: int | None):
    d = np.load(npz)
    part = d["part"].astype(np.int64)
    eval_part = int(part.max()) if eval_part is None else eval_part
    tr, ev = part != eval_part, part == eval_part
    x = np.where(d["dense_mask"], np.log1p(np.maximum(d["dense"], 0.0)), 0.0).astype(np.float32)
    ids, mask = d["ids"], d["id_mask"]
    rows = np.zeros(ids.shape, np.int64)
    table_rows, unseen = [], []
    for f in range(ids.shape[1]):
        vocab = np.unique(ids[tr & mask[:, f], f])
        pos = np.searchsorted(vocab, ids[:, f])
        pos_c = np.minimum(pos, max(len(vocab) - 1, 0))
        found = mask[:, f] & (len(vocab) > 0) & (vocab[pos_c] == ids[:, f])
        rows[:, f] = np.where(found, pos_c + 1, 0)
        table_rows.append(len(vocab) + 1)
        unseen.append(int((ev & mask[:, f] & ~found).sum()))
    y = d["label"].astype(np.float32)
    info = dict(train_rows=int(tr.sum()), eval_rows=int(ev.sum()), eval_part=eval_part,
                eval_positive_rate=float(y[ev].mean()), train_positive_rate=float(y[tr].mean()),
                table_rows=table_rows, eval_unseen_ids=unseen,
                eval_unseen_id_fraction=float(sum(unseen) / max(int(mask[ev].sum()), 1)))
    return (rows[tr], x[tr], y[tr]), (rows[ev], x[ev], y[ev]), table_rows, info


def run_seed(seed, train, evald, table_rows, epochs, batch, lr):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = DeepFM(table_rows)
    sopt = torch.optim.SparseAdam(model.sparse_parameters(), lr=lr)
    dopt = torch.optim.Adam(model.dense_parameters(), lr=lr, weight_decay=0.0)
    rows, x, y = (torch.from_numpy(a) for a in train)
    erows, ex = torch.from_numpy(evald[0]), torch.from_numpy(evald[1])
    n = len(y)
    t0 = time.perf_counter()
    epochs_out = []
    for ep in range(1, epochs + 1):
        te = time.perf_counter()
        perm = torch.from_numpy(rng.permutation(n))
        model.train()
        loss_sum, steps = 0.0, 0
        for s in range(0, n, batch):
            idx = perm[s:s + batch]
            logit = model(rows[idx], x[idx])
            loss = F.binary_cross_entropy_with_logits(logit, y[idx])
            sopt.zero_grad(set_to_none=True)
            dopt.zero_grad(set_to_none=True)
            loss.backward()
            sopt.step()
            dopt.step()
            loss_sum += float(loss.detach())
            steps += 1
        train_s = time.perf_counter() - te
        model.eval()
        with torch.no_grad():
            el = model(erows, ex).numpy()
        rec = dict(epoch=ep, steps=steps, train_loss=loss_sum / steps,
                   eval_auc=auc_exact(evald[2], el), eval_logloss=logloss(evald[2], el),
                   epoch_train_s=train_s, epoch_s=time.perf_counter() - te)
        print(f"seed {seed} epoch {ep}: train_loss {rec['train_loss']:.5f} eval AUC "
              f"{rec['eval_auc']:.5f} logloss {rec['eval_logloss']:.5f} ({rec['epoch_s']:.1f}s)",
              file=sys.stderr, flush=True)
        epochs_out.append(rec)
    return dict(seed=seed, epochs=epochs_out, wall_s=time.perf_counter() - t0)


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_md(path: pathlib.Path, res: dict) -> None:
    ep = res["config"]["epochs"]
    head = "| seed | " + " | ".join(f"AUC ep{e}" for e in range(1, ep + 1)) + \
           f" | logloss ep{ep} | wall s |"
    lines = [
        "# DeepFM quality reference (PyTorch, CPU, float32)",
        "",
        f"RecIS DeepFM data: train parts 0-6 ({res['data']['train_rows']} rows), eval part "
        f"{res['data']['eval_part']} ({res['data']['eval_rows']} rows, positive rate "
        f"{res['data']['eval_positive_rate']:.4f}). Batch {res['config']['batch_size']}, "
        f"{ep} epochs, SparseAdam + Adam lr {res['config']['lr']}, "
        f"{res['env']['torch_threads']} threads.",
        "",
        head,
        "|" + "---|" * (ep + 3),
    ]
    for r in res["runs"]:
        aucs = " | ".join(f"{e['eval_auc']:.4f}" for e in r["epochs"])
        lines.append(f"| {r['seed']} | {aucs} | {r['epochs'][-1]['eval_logloss']:.4f} | "
                     f"{r['wall_s']:.1f} |")
    s = res["summary"]
    lines += [
        "",
        f"Epoch {ep}: AUC **{s['auc_mean']:.4f} +- {s['auc_std']:.4f}** (mean +- sample std "
        f"over {len(res['runs'])} seeds), logloss {s['logloss_mean']:.4f} +- "
        f"{s['logloss_std']:.4f}. Total wall time {res['total_wall_s']:.1f} s.",
        "",
        f"torch {res['env']['torch']}, Python {res['env']['python']}, {res['env']['cpu']}, "
        f"{res['env']['date']}.",
        "",
        "Model, optimizers and protocol: see the docstring of "
        "benchmarks/torch_baseline/deepfm_reference.py. Eval IDs unseen in training "
        f"({100 * res['data']['eval_unseen_id_fraction']:.1f}% of present eval IDs) get a "
        "zero embedding and bias.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--npz", required=True, help="output of benchmarks/deepfm_data.py")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-part", type=int, default=None, help="default: the last part")
    p.add_argument("--out", default=None, help="JSON path (a .md goes next to it)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]

    t0 = time.perf_counter()
    train, evald, table_rows, info = prepare(a.npz, a.eval_part)
    prep_s = time.perf_counter() - t0
    runs = [run_seed(s, train, evald, table_rows, a.epochs, a.batch_size, a.lr) for s in seeds]
    total = time.perf_counter() - t0

    last = np.array([r["epochs"][-1]["eval_auc"] for r in runs])
    ll = np.array([r["epochs"][-1]["eval_logloss"] for r in runs])
    ddof = 1 if len(runs) > 1 else 0
    per_epoch = []
    for e in range(a.epochs):
        v = np.array([r["epochs"][e]["eval_auc"] for r in runs])
        per_epoch.append(dict(epoch=e + 1, auc_mean=float(v.mean()), auc_std=float(v.std(ddof=ddof))))
    res = dict(
        benchmark="deepfm_quality_torch",
        config=dict(seeds=seeds, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                    embed_dim=DIM, hidden=list(HIDDEN), sparse_optimizer="torch.optim.SparseAdam",
                    dense_optimizer="torch.optim.Adam", weight_decay=0.0, betas=[0.9, 0.999],
                    eps=1e-8, embedding_init="trunc_normal(0, 0.001, +-2 std)",
                    dense_feature_init="normal(0, 0.01)", dnn_init="lecun_normal (flax default), bias 0",
                    dtype="float32", dense_transform="log1p(max(v, 0)), missing -> 0"),
        data=dict(npz=str(a.npz), **info),
        runs=runs,
        summary=dict(epoch=a.epochs, auc_mean=float(last.mean()), auc_std=float(last.std(ddof=ddof)),
                     logloss_mean=float(ll.mean()), logloss_std=float(ll.std(ddof=ddof)),
                     std="sample std (ddof=1) over seeds", per_epoch=per_epoch),
        prep_s=prep_s,
        total_wall_s=total,
        env=dict(torch=torch.__version__, numpy=np.__version__, python=platform.python_version(),
                 cpu=cpu_model(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                 platform=platform.platform(), loadavg_end=list(os.getloadavg()),
                 date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
    )
    print(f"epoch {a.epochs} AUC {last.mean():.4f} +- {last.std(ddof=ddof):.4f} "
          f"({len(runs)} seeds), total {total:.1f}s", file=sys.stderr)
    if a.out:
        out = pathlib.Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        write_md(out.with_suffix(".md"), res)
    else:
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
