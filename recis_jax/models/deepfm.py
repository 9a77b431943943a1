"""DeepFM (Guo et al. 2017) as in RecIS's DeepFM example (Criteo: 26 categorical + 13
numeric features).

Fields: the F categorical features bring an embedding [dim] and a bias [1] each from the
sparse tables (the caller looks them up and stacks them); each of the N numeric features
is a field too, with a learned embedding [N, dim] and bias [N, 1] scaled by its
(already transformed, e.g. log1p) value; each precomputed multimodal vector (image/text
embedding, a fixed-length float list) is one more field through a learned projection.
For Criteo, 26 + 13 = 39 fields:

  logit = b0 + sum_f bias_f                                   (FM first order)
        + 1/2 sum_d [(sum_f e_fd)^2 - sum_f e_fd^2]           (FM second order)
        + MLP(concat_f e_f)                                   (39 x 8 = 312 -> 64 -> 16 -> 1)

The FM sums run in float32 (a sum of squares loses bits in bf16); the MLP in `dtype`.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from recis_jax.models.layers import MLP, Dtype


class DeepFM(nn.Module):
    """DeepFM over stacked field embeddings.

    Attributes:
      num_dense: N numeric features (13 for Criteo).
      embed_dim: field embedding size (8).
      hidden: DNN widths before the final logit layer ((64, 16)).
      dtype / param_dtype: compute / storage dtype (bf16 / f32 by default).
    """

    num_dense: int = 13
    embed_dim: int = 8
    hidden: Sequence[int] = (64, 16)
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sparse_emb, sparse_bias=None, dense=None, vectors=()):
        """Logits.

        Args:
          sparse_emb: [B, F, embed_dim] float, the categorical fields' embeddings.
          sparse_bias: [B, F] or [B, F, 1] float (their dim-1 embeddings), or None.
          dense: [B, num_dense] float32 numeric values, or None when num_dense == 0.
          vectors: sequence of [B, k_i] float32 multimodal vectors, one field each.

        Returns float32 [B] logits.
        """
        b = sparse_emb.shape[0]
        init = nn.initializers.normal(0.01)
        fields = [sparse_emb.astype(jnp.float32)]                      # [B, F, D]
        biases = []
        if sparse_bias is not None:
            biases.append(sparse_bias.reshape(b, -1).astype(jnp.float32))  # [B, F]
        if self.num_dense:
            if dense is None or dense.shape[-1] != self.num_dense:
                raise ValueError(f"dense must be [B, {self.num_dense}], got "
                                 f"{None if dense is None else dense.shape}")
            x = dense.astype(jnp.float32)
            emb = self.param("dense_embedding", init, (self.num_dense, self.embed_dim),
                             self.param_dtype)
            bias = self.param("dense_bias", init, (self.num_dense, 1), self.param_dtype)
            fields.append(x[:, :, None] * emb.astype(jnp.float32)[None])   # [B, N, D]
            biases.append(x * bias[:, 0].astype(jnp.float32)[None])          # [B, N]
        for i, v in enumerate(vectors):
            proj = nn.Dense(self.embed_dim, dtype=jnp.float32, param_dtype=self.param_dtype,
                            name=f"vector_{i}")(v.astype(jnp.float32))
            fields.append(proj[:, None, :])
            biases.append(nn.Dense(1, dtype=jnp.float32, param_dtype=self.param_dtype,
                                   name=f"vector_bias_{i}")(v.astype(jnp.float32)))
        e = jnp.concatenate(fields, axis=1)                                 # [B, 39, D]

        b0 = self.param("global_bias", nn.initializers.zeros, (), self.param_dtype)
        first = b0.astype(jnp.float32) + sum(jnp.sum(x, axis=1) for x in biases)
        s = jnp.sum(e, axis=1)                                              # [B, D]
        second = jnp.float32(0.5) * jnp.sum(s * s - jnp.sum(e * e, axis=1), axis=-1)
        deep = MLP((*self.hidden, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                   name="dnn")(e.reshape(b, -1).astype(self.dtype))         # [B, 1]
        return first + second + deep[:, 0].astype(jnp.float32)
