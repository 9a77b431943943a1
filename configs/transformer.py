"""Sequence Transformer (pre-LN, causal) for next-item prediction / generative ranking.

The dense Transformer shapes that `benchmarks/models.py` measures (step time, MFU):
`recis_jax.models.from_config(get_config(arg).model)` builds the model. To *train* a
long-sequence model end to end use configs/seq_transformer.py (`recis-jax train`).

Variants:
  default  8 layers, hidden 1024, 16 heads, FFN 4096 (100.7M params in the blocks),
           L = 4096, ~64k tokens per step (batch 16).
  gr50m    8 layers, hidden 768, 12 heads, FFN 3072: 56.6M params in the blocks
           (+ the input projection), L = 2048, batch 32.
  long     the default shape at L = 16384, batch 4, with remat.
  smoke    2 layers, hidden 64, L = 32: runs on a CPU in seconds (float32 compute).
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        name="transformer", num_layers=8, hidden=1024, num_heads=16, ffn=4096, causal=True,
        out_dim=128, remat=False, attention_impl=None, dtype="bfloat16", param_dtype="float32"))
    c.data = ml_collections.ConfigDict(dict(seq_len=4096, item_dim=128, num_items=10_000_000))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=16, num_steps=50_000, dense_optimizer="adamw", dense_lr=3e-4,
        weight_decay=0.01, warmup_steps=1_000, sparse_optimizer="adamw", sparse_lr=1e-3,
        loss="sampled_softmax", num_negatives=8192, log_every=50))
    if arg == "gr50m":
        c.model.update(dict(hidden=768, num_heads=12, ffn=3072))
        c.data.seq_len = 2048
        c.train.batch_size = 32
    elif arg == "long":
        c.model.remat = True
        c.data.seq_len = 16384
        c.train.batch_size = 4
    elif arg == "smoke":
        c.model.update(dict(num_layers=2, hidden=64, num_heads=4, ffn=256, out_dim=16,
                            dtype="float32"))
        c.data.update(dict(seq_len=32, item_dim=16, num_items=1000))
        c.train.update(dict(batch_size=8, num_steps=20, log_every=5, num_negatives=64,
                            warmup_steps=0))
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} (known: gr50m, long, smoke)")
    return c
