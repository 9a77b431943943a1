"""DCNv2 as in MLPerf's DLRM-dcnv2 (Wang et al. 2021; MLPerf Training v3+ reference).

  bottom MLP (ReLU after every layer): dense [B, 13] -> 512 -> 256 -> 128
  x0 = concat(bottom output, 26 embeddings of dim 128)     [B, 27 * 128 = 3456]
  3 low-rank cross layers: x_{l+1} = x0 * (U (V x_l) + b) + x_l,  V: 3456 -> 512 (no
       bias), U: 512 -> 3456 (bias)
  top MLP: 3456 -> 1024 -> 1024 -> 512 -> 256 -> 1 (ReLU between layers)

Precomputed multimodal vectors (fixed-length float lists) enter as extra interaction
fields through a learned projection to the embedding dim.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from recis_jax.models.layers import MLP, Dense, Dtype


class LowRankCross(nn.Module):
    """One DCNv2 cross layer with a rank-r weight: x0 * (U(V x) + b) + x. [B, d] -> [B, d]."""

    rank: int = 512
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x0, x):
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Dense(self.rank, use_bias=False, name="V", **kw)(x)
        h = Dense(d, name="U", **kw)(h)
        return x0 * h + x


class DCNv2(nn.Module):
    """DLRM-dcnv2.

    Attributes:
      bottom: bottom MLP widths; its last width must equal the embedding dim (128).
      num_cross: number of cross layers (3); low_rank: their rank (512).
      top: top MLP widths ending in the logit (1024, 1024, 512, 256, 1).
      dtype / param_dtype: compute / storage dtype.
    """

    bottom: Sequence[int] = (512, 256, 128)
    num_cross: int = 3
    low_rank: int = 512
    top: Sequence[int] = (1024, 1024, 512, 256, 1)
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sparse_emb, dense, vectors=()):
        """Logits.

        Args:
          sparse_emb: [B, F, D] float embeddings (F = 26, D = 128 for Criteo).
          dense: [B, n] float32 numeric features (13).
          vectors: sequence of [B, k_i] float32 multimodal vectors, one field each.

        Returns float32 [B] logits.
        """
        b, _, d = sparse_emb.shape
        if self.bottom[-1] != d:
            raise ValueError(f"bottom MLP must end at the embedding dim {d}, got {self.bottom}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        z = MLP(self.bottom, final_activation=True, name="bottom", **kw)(dense.astype(self.dtype))
        fields = [z, sparse_emb.astype(self.dtype).reshape(b, -1)]
        for i, v in enumerate(vectors):
            fields.append(Dense(d, name=f"vector_{i}", **kw)(v.astype(self.dtype)))
        # Concatenated as [B, k * 128] pieces: XLA:GPU's concatenate of the [B, F, 128]
        # form took 1.03 ms at batch 65536 on an H200, this one 0.26 ms (a copy: 0.21).
        x0 = jnp.concatenate(fields, axis=1)                               # [B, 27 * 128]
        x = x0
        for i in range(self.num_cross):
            x = LowRankCross(self.low_rank, name=f"cross_{i}", **kw)(x0, x)
        return MLP(self.top, name="top", **kw)(x)[:, 0].astype(jnp.float32)
