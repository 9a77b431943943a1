"""Long-sequence CTR: a Transformer over user behaviour sequences + target attention.

    recis-jax train --config configs/seq_transformer.py --workdir /tmp/seq            (GPU: L = 1024)
    recis-jax train --config configs/seq_transformer.py:long --workdir /tmp/seq16k    (GPU: L = 16384, remat)
    recis-jax train --config configs/seq_transformer.py:smoke --workdir /tmp/seq      (CPU, a minute)

The generated data's `seq` column (1..seq_len item IDs; the planted model rewards items of
the candidate's hidden category) and `target_item` share one item table; the encoder
(bidirectional, cuDNN flash attention on GPU) runs over the padded sequence [B, L, D],
target attention pools it against the candidate, and an MLP over [candidate, interest,
the 26 categorical embeddings, the 13 numerics] gives the click logit. Other keys: see
configs/deepfm.py.
"""

import os

from recis_jax.train.main import load_config


def get_config(arg=None):
    # The shared keys come from configs/deepfm.py (configs/ is not a package).
    c = load_config(os.path.join(os.path.dirname(__file__), "deepfm.py"))
    c.features.update(dict(embed_dim=64, bias_dim=0, seq_len=1024))
    c.data.generate.update(dict(num_files=8, rows_per_file=25_000, vocab_size=100_000))
    c.embedding.update(dict(num_rows=1 << 16, init_std=0.01))
    c.model = c.model.__class__(dict(name="seq_ctr", num_layers=4, hidden=256, num_heads=4, ffn=1024,
                                     remat=False, mlp=(200, 80), dtype="bfloat16", param_dtype="float32",
                                     attention_dtype=""))  # "": dtype; "float32" for bf16 on a CPU
    c.train.update(dict(batch_size=256, num_epochs=1, dense_optimizer="adamw", dense_lr=1e-3,
                        weight_decay=0.01, sparse_optimizer="adam", sparse_lr=1e-3, log_every=20))
    if arg == "long":
        c.features.seq_len = 16384
        c.model.remat = True
        c.train.batch_size = 16
    elif arg == "smoke":
        c.features.update(dict(embed_dim=16, seq_len=32, num_categorical=4, num_dense=2))
        c.data.generate.update(dict(num_files=2, rows_per_file=2_000, vocab_size=2_000))
        c.embedding.num_rows = 1 << 12
        c.model.update(dict(num_layers=1, hidden=32, num_heads=2, ffn=64, mlp=(32, 16), dtype="float32"))
        c.train.update(dict(batch_size=128, log_every=5, checkpoint_every=10))
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} (known: long, smoke)")
    return c
