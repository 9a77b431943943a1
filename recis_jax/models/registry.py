"""Build a model from a config: `from_config(config.model)`.

`config.model.name` picks the class; every other key is a constructor argument, with
"dtype"/"param_dtype" given as strings ("bfloat16", "float32") so configs stay plain.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from recis_jax.models.attention import DIN
from recis_jax.models.dcnv2 import DCNv2
from recis_jax.models.deepfm import DeepFM
from recis_jax.models.multitask import MMoE, SharedBottom
from recis_jax.models.transformer import SequenceCTR, SequenceTransformer

MODELS = {"deepfm": DeepFM, "dcnv2": DCNv2, "din": DIN, "transformer": SequenceTransformer,
          "shared_bottom": SharedBottom, "mmoe": MMoE, "seq_ctr": SequenceCTR}
_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def from_config(cfg: Mapping[str, Any]):
    """cfg: a mapping (ConfigDict or dict) with "name" plus constructor arguments."""
    kw = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    name = kw.pop("name")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    if kw.get("attention_dtype") == "":
        kw["attention_dtype"] = None  # configs: "" = the compute dtype
    for key in ("dtype", "param_dtype", "attention_dtype"):
        if isinstance(kw.get(key), str):
            if kw[key] not in _DTYPES:
                raise ValueError(f"{key} must be one of {sorted(_DTYPES)}, got {kw[key]!r}")
            kw[key] = _DTYPES[kw[key]]
    for key, val in kw.items():  # ConfigDict lists -> tuples (linen attributes are hashed)
        if isinstance(val, list):
            kw[key] = tuple(val)
    return MODELS[name](**kw)
