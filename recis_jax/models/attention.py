"""Target attention over a behaviour sequence (DIN, Zhou et al. 2018).

Each history item k_j is scored against the target item q by a small MLP over
[q, k_j, q - k_j, q * k_j]; the user interest is sum_j w_j k_j. Padding items get
weight 0 (the mask from `EmbeddingEngine.pool(..., combiner="none")`).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from recis_jax.models.layers import MLP, Dtype


class TargetAttention(nn.Module):
    """DIN attention pooling.

    Attributes:
      hidden: widths of the scoring MLP before its scalar output ((80, 40)).
      normalize: "softmax" (weights sum to 1 over valid items) or "none" (DIN's raw
        scores, so the pooled vector keeps a notion of how much history matches).
      dtype / param_dtype: compute / storage dtype.
    """

    hidden: Sequence[int] = (80, 40)
    normalize: str = "softmax"
    activation: str = "sigmoid"
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query, keys, mask, return_weights: bool = False):
        """query: [B, D]; keys: [B, L, D]; mask: bool [B, L] (True = real item).

        Returns pooled float32 [B, D] (and float32 weights [B, L] if return_weights).
        """
        if self.normalize not in ("softmax", "none"):
            raise ValueError(f"normalize must be 'softmax' or 'none', got {self.normalize!r}")
        act = {"sigmoid": nn.sigmoid, "relu": nn.relu, "prelu": nn.PReLU()}[self.activation]
        q = jnp.broadcast_to(query[:, None, :], keys.shape).astype(self.dtype)
        k = keys.astype(self.dtype)
        feats = jnp.concatenate([q, k, q - k, q * k], axis=-1)             # [B, L, 4D]
        s = MLP((*self.hidden, 1), activation=act, dtype=self.dtype,
                param_dtype=self.param_dtype, name="score")(feats)[..., 0].astype(jnp.float32)
        if self.normalize == "softmax":
            # a large finite negative, not -inf, so an all-padding row gives 0, not NaN
            w = jax.nn.softmax(jnp.where(mask, s, jnp.float32(-1e30)), axis=-1)
        else:
            w = s
        w = jnp.where(mask, w, jnp.float32(0))
        pooled = jnp.einsum("bl,bld->bd", w, keys.astype(jnp.float32))
        return (pooled, w) if return_weights else pooled


class DIN(nn.Module):
    """Deep Interest Network: target attention + MLP to a logit.

    MLP input = concat(target [B, D], attended history [B, D], other [B, n]), where
    `other` holds everything else the caller pooled (user/context embeddings, dense
    features, multimodal vectors), flattened.
    """

    mlp: Sequence[int] = (200, 80)
    attention_hidden: Sequence[int] = (80, 40)
    normalize: str = "softmax"
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, target, seq, mask, other=None):
        """target: [B, D]; seq: [B, L, D]; mask: bool [B, L]; other: [B, n] or None.

        Returns float32 [B] logits."""
        interest = TargetAttention(self.attention_hidden, self.normalize, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name="attention")(target, seq, mask)
        parts = [target.astype(jnp.float32), interest]
        if other is not None:
            parts.append(other.reshape(other.shape[0], -1).astype(jnp.float32))
        x = jnp.concatenate(parts, axis=-1).astype(self.dtype)
        return MLP((*self.mlp, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                   name="mlp")(x)[:, 0].astype(jnp.float32)
