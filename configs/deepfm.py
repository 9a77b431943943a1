"""DeepFM on Criteo-shaped data, as in RecIS's DeepFM example.

    recis-jax train --config configs/deepfm.py --workdir /tmp/deepfm          (generated data, CPU minutes)
    recis-jax train --config configs/deepfm.py:smoke --workdir /tmp/smoke     (CPU, seconds)
    RECIS_REAL_DATA=../shared/data recis-jax train --config configs/deepfm.py:recis --workdir /tmp/recis
                     (RecIS's 80k-row DeepFM ORC files: train parts 0-6 for 2 epochs, eval part 7)
    any key: --config.train.batch_size=1024 --config.data.train='/data/part-*.orc'

26 categorical features -> dim-8 embeddings + dim-1 biases (sparse tables, merged into
one physical table per dim); 13 numeric features (log1p) -> learned [13, 8] embeddings
and [13, 1] biases scaled by value; FM over 39 fields; DNN 312 -> 64 -> 16 -> 1.
"""

import os

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(
        train="",            # files / dirs / globs; empty: the built-in generated dataset
        eval="",
        windows=(),          # online learning: a list of paths, one per window, in order
        format="",           # "orc" | "parquet" | "" (from the files)
        shuffle=True, num_threads=4,
        # The built-in dataset (recis-jax gen-data): train files + eval files from one
        # planted model; its Bayes-optimal AUC is reported beside the model's.
        generate=ml_collections.ConfigDict(dict(num_files=8, eval_files=1, rows_per_file=25_000,
                                                 format="parquet", seed=0, vocab_size=20_000, zipf_a=1.2,
                                                 multi_hot=(1, 1))),
    ))
    c.features = ml_collections.ConfigDict(dict(
        num_categorical=26, num_dense=13, embed_dim=8, bias_dim=1,
        fuse_bias=False,     # True: bias = last column of the feature's embedding row (one lookup per ID)
        dense_transform="log1p",
        hash_bucket=0, hash_type=None, seq_len=0))
    c.embedding = ml_collections.ConfigDict(dict(
        num_rows=1 << 14,    # initial slab rows per feature (tables grow as IDs arrive)
        rows_per_shard=0,    # sharded tables (train.mesh > 1): rows per shard (0: 2 x rows / n), doubled on overflow
        max_rows=0,          # per physical table row budget (0: none)
        init="truncated_normal",  # new rows: embedding.initializers.KINDS, scale init_std
        init_std=0.001,      # TruncNormal(0, 0.001), as RecIS's example
        dtype="float32", admit_min_count=0, evict_after_steps=0))
    c.model = ml_collections.ConfigDict(dict(
        name="deepfm", num_dense=13, embed_dim=8, hidden=(64, 16),
        dtype="bfloat16", param_dtype="float32"))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=1024, num_epochs=1, num_steps=0,     # num_steps 0: until the data ends
        mesh=0,              # > 1: shard tables over that many devices (ShardedTrainer)
        zero=False,          # with mesh > 1: shard dense params + optimizer state too (ZeRO-3)
        dense_optimizer="adamw", dense_lr=1e-3, weight_decay=0.0, warmup_steps=0,
        sparse_optimizer="adam", sparse_lr=1e-3, sparse_weight_decay=0.0, accum_steps=1,
        steps_per_call=1,    # steps per device call (one scan): > 1 when the host dispatch bounds the step
        command_buffers=True,  # XLA:GPU CUDA graphs of the step: off for steps of tens of ms (configs/dcnv2.py)
        log_every=50, eval_every=0, checkpoint_every=100, keep_last=3, keep_every=0,
        profile_steps=()))
    c.eval = ml_collections.ConfigDict(dict(batch_size=0, gauc_group=""))
    c.loss = ml_collections.ConfigDict(dict(labels=("label",), task_weights=(), sample_weight=""))
    if arg == "smoke":
        c.data.generate.update(dict(num_files=2, rows_per_file=2_000, vocab_size=2_000))
        c.train.update(dict(batch_size=256, num_epochs=1, log_every=5, checkpoint_every=10))
        c.model.dtype = "float32"
    elif arg == "recis":
        root = os.environ.get("RECIS_REAL_DATA", "../shared/data")
        c.data.train = os.path.join(root, "recis_deepfm", "part-[0-6].orc")
        c.data.eval = os.path.join(root, "recis_deepfm", "part-7.orc")
        c.train.update(dict(batch_size=1000, num_epochs=2, checkpoint_every=0))
        c.model.dtype = "float32"   # the PyTorch reference runs float32
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} (known: smoke, recis)")
    return c
