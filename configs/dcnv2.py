"""DLRM-dcnv2 shape (MLPerf): 26 multi-hot categorical features at dim 128, 13 numeric,
DCNv2 dense (bottom 512-256-128, 3 low-rank cross layers, top 1024-1024-512-256-1).

    recis-jax train --config configs/dcnv2.py --workdir /tmp/dcnv2            (GPU shape, batch 65536)
    recis-jax train --config configs/dcnv2.py:smoke --workdir /tmp/dcnv2      (CPU, a minute)

Same data layout, recipe and keys as configs/deepfm.py (see it for every key); here the
tables have no bias part, the sparse optimizer is row-wise Adagrad and the dense part
runs in bfloat16. The generated data is multi-hot (1-20 IDs per feature and row);
MLPerf's tables are capped at 4M rows each in the benchmark issue's shape.
"""

import os

from recis_jax.train.main import load_config


def get_config(arg=None):
    # The shared keys come from configs/deepfm.py (configs/ is not a package).
    c = load_config(os.path.join(os.path.dirname(__file__), "deepfm.py"))
    c.data.generate.update(dict(num_files=8, rows_per_file=100_000, vocab_size=1_000_000, multi_hot=(1, 20)))
    c.features.update(dict(embed_dim=128, bias_dim=0))
    c.embedding.update(dict(num_rows=1 << 16, init_std=0.01))
    c.model = c.model.__class__(dict(name="dcnv2", bottom=(512, 256, 128), num_cross=3, low_rank=512,
                                     top=(1024, 1024, 512, 256, 1), dtype="bfloat16", param_dtype="float32"))
    c.train.update(dict(batch_size=65536, num_epochs=1, dense_optimizer="adam", dense_lr=1e-3,
                        sparse_optimizer="rowwise_adagrad", sparse_lr=0.05, log_every=10, checkpoint_every=0,
                        # A ~30 ms step: CUDA graphs cost more than they save (H200: 32.5 vs 31.4 ms).
                        command_buffers=False))
    if arg == "smoke":
        c.data.generate.update(dict(num_files=2, rows_per_file=4_000, vocab_size=5_000, multi_hot=(1, 4)))
        c.features.embed_dim = 16
        c.embedding.num_rows = 1 << 12
        c.model.update(dict(bottom=(32, 16), low_rank=16, top=(64, 32, 1), dtype="float32"))
        c.train.update(dict(batch_size=256, log_every=5))
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} (known: smoke)")
    return c
