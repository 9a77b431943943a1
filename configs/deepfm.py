"""DeepFM on Criteo-shaped data, as in RecIS's DeepFM example.

    recis-jax train --config configs/deepfm.py --workdir /tmp/deepfm          (full)
    recis-jax train --config configs/deepfm.py:smoke --workdir /tmp/deepfm    (CPU, seconds)

(`recis-jax train` arrives with the trainer; until then `recis_jax.models.from_config(
get_config().model)` builds the model, and tests/test_models.py trains it.)

26 categorical features -> dim-8 embeddings + dim-1 biases (sparse tables); 13 numeric
features (log1p) -> learned [13, 8] embeddings and [13, 1] biases scaled by value;
FM over 39 fields; DNN 312 -> 64 -> 16 -> 1. Params float32, compute bfloat16.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        name="deepfm", num_dense=13, embed_dim=8, hidden=(64, 16),
        dtype="bfloat16", param_dtype="float32"))
    c.features = ml_collections.ConfigDict(dict(
        num_categorical=26, num_dense=13, embed_dim=8, bias_dim=1,
        dense_transform="log1p", hash_bucket=0))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=8192, num_steps=100_000, dense_optimizer="adam", dense_lr=1e-3,
        sparse_optimizer="adamw", sparse_lr=1e-3, weight_decay=0.0, log_every=100,
        eval_every=5_000, checkpoint_every=10_000))
    c.loss = ml_collections.ConfigDict(dict(tasks=("click",), task_weights=(1.0,)))
    if arg == "smoke":
        c.train.batch_size = 64
        c.train.num_steps = 20
        c.train.log_every = 5
        c.train.eval_every = 10
        c.train.checkpoint_every = 10
        c.model.dtype = "float32"
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} (known: smoke)")
    return c
