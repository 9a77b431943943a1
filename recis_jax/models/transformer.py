"""Sequence Transformer (pre-LN) for next-item prediction and generative ranking.

Input: sequence embeddings [B, L, d_in] from `EmbeddingEngine.pool(..., combiner="none")`
with their right-padding mask [B, L]. Blocks are pre-LN
(x + Attn(LN(x)), x + FFN(LN(x))), causal (next item / generative ranking) or
bidirectional. Attention goes through `layers.dot_product_attention`: cuDNN flash
attention on a GPU (bf16), the XLA path elsewhere; padding travels as sequence lengths,
so memory stays linear in L (16k+ tokens on one GPU). `remat=True` recomputes each block
in the backward pass to trade FLOPs for activation memory at the longest L.

Positions are sinusoidal (no parameters, any length); LayerNorms are float32, the
residual stream and matmuls are in `dtype`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from recis_jax.models.layers import Dense, Dtype, dot_product_attention, layer_norm, mask_to_lengths


def sinusoidal_positions(length: int, dim: int, dtype=jnp.float32):
    """[length, dim] sin/cos positions (Vaswani et al.), computed in the graph in float32
    (a numpy constant would embed L x dim values in the program: 256 MB at L = 128k)."""
    pos = jnp.arange(length, dtype=jnp.float32)[:, None]
    inv = jnp.exp(jnp.arange(0, dim, 2, dtype=jnp.float32) * jnp.float32(-np.log(10000.0) / dim))
    ang = pos * inv[None]                                            # [L, ceil(dim/2)]
    out = jnp.stack([jnp.sin(ang), jnp.cos(ang)], axis=-1).reshape(length, -1)[:, :dim]
    return out.astype(dtype)


class TransformerBlock(nn.Module):
    """Pre-LN block: x + Attn(LN(x)); x + FFN(LN(x)). [B, L, H] -> [B, L, H]."""

    hidden: int
    num_heads: int
    ffn: int
    causal: bool = True
    attention_impl: str | None = None
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    attention_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x, lengths):
        b, length, h = x.shape
        hd = h // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.attention_dtype or self.dtype
        y = layer_norm("ln_attn")(x).astype(self.dtype)
        qkv = Dense(3 * h, name="qkv", **kw)(y).reshape(b, length, 3, self.num_heads, hd).astype(inner)
        a = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], lengths=lengths,
                                  causal=self.causal, implementation=self.attention_impl)
        x = x + Dense(h, name="out", **kw)(a.reshape(b, length, h).astype(self.dtype))
        y = layer_norm("ln_ffn")(x).astype(self.dtype)
        y = Dense(self.ffn, name="ffn_in", **kw)(y)
        y = nn.gelu(y.astype(inner)).astype(self.dtype)
        return x + Dense(h, name="ffn_out", **kw)(y)


class SequenceTransformer(nn.Module):
    """A stack of pre-LN Transformer blocks over a padded sequence.

    Attributes:
      num_layers, hidden, num_heads, ffn: the usual sizes (hidden % num_heads == 0).
      causal: True for next-item / generative ranking, False for bidirectional encoding.
      out_dim: optional final projection width (e.g. the item embedding dim to score
        next items by dot product); None keeps `hidden`.
      remat: recompute each block in the backward pass (activation memory ~ 1 layer).
      attention_impl: "xla" | "cudnn" | None (automatic).
      dtype / param_dtype: compute / storage dtype.
      attention_dtype: dtype of the attention (q, k, v, softmax) and the FFN's gelu; None:
        dtype. float32 with a bfloat16 dtype on the CPU: XLA:CPU runs the Dense layers'
        bfloat16 dots on AMX but its bfloat16 attention and elementwise math slowly
        (bfloat16 attention 6x slower than float32, benchmarks/results/e2e_cpu.md), as
        PyTorch's CPU autocast keeps softmax and gelu in float32.
    """

    num_layers: int = 2
    hidden: int = 64
    num_heads: int = 4
    ffn: int = 256
    causal: bool = True
    out_dim: int | None = None
    remat: bool = False
    attention_impl: str | None = None
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    attention_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, seq, mask=None):
        """seq: [B, L, d_in] float; mask: bool [B, L] right-padding mask (True = real
        item, a prefix of each row) or None (all real).

        Returns float32 [B, L, out_dim or hidden] (final LayerNorm, then the optional
        projection); rows at padded positions are zero."""
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden {self.hidden} not divisible by num_heads {self.num_heads}")
        b, length, _ = seq.shape
        lengths = None if mask is None else mask_to_lengths(mask)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense(self.hidden, name="in_proj", **kw)(seq.astype(self.dtype))
        x = x + sinusoidal_positions(length, self.hidden, self.dtype)[None]
        block = nn.remat(TransformerBlock) if self.remat else TransformerBlock
        for i in range(self.num_layers):
            x = block(self.hidden, self.num_heads, self.ffn, self.causal, self.attention_impl,
                      attention_dtype=self.attention_dtype, name=f"block_{i}", **kw)(x, lengths)
        x = layer_norm("ln_final")(x)
        if self.out_dim is not None:
            # float32: the output feeds scores/losses directly, and it is small
            x = Dense(self.out_dim, dtype=jnp.float32, param_dtype=self.param_dtype, name="out_proj")(x)
        if mask is not None:
            x = jnp.where(mask[..., None], x, jnp.float32(0))
        return x.astype(jnp.float32)


def transformer_flops(num_layers: int, hidden: int, ffn: int, batch: int, length: int,
                      causal: bool = True, backward: bool = True) -> dict:
    """Analytical matmul FLOPs of one step of `SequenceTransformer` blocks.

    dense = 2 * params_matmul * tokens per forward (x3 with backward: 6 * P * T), with
    params_matmul = layers * (4 h^2 + 2 h ffn). attention = QK^T and PV:
    4 * B * L^2 * h per layer forward (x3 with backward: 12 * layers * L^2 * h * B),
    halved when causal (the FLOPs a flash kernel that skips masked blocks needs).
    Returns {"dense", "attention", "attention_full", "total"} (total counts causal
    attention as half when causal).
    """
    mult = 3 if backward else 1
    tokens = batch * length
    p = num_layers * (4 * hidden * hidden + 2 * hidden * ffn)
    dense = 2 * mult * p * tokens
    att_full = 4 * mult * num_layers * batch * length * length * hidden
    att = att_full // 2 if causal else att_full
    return {"dense": dense, "attention": att, "attention_full": att_full, "total": dense + att}


class SequenceCTR(nn.Module):
    """Long-sequence CTR: a bidirectional Transformer encodes the behaviour sequence,
    target attention (DIN) pools its outputs against the candidate item, and an MLP
    over [target, interest, other fields] gives the logit.

    Attributes: the encoder's num_layers / hidden / num_heads / ffn / remat /
    attention_impl / attention_dtype (see SequenceTransformer; its output is projected
    back to the item dim), the DIN head's mlp widths, dtype / param_dtype.
    """

    num_layers: int = 2
    hidden: int = 64
    num_heads: int = 4
    ffn: int = 256
    remat: bool = False
    attention_impl: str | None = None
    mlp: Sequence[int] = (200, 80)
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    attention_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, target, seq, mask, other=None):
        """target: [B, D] item embedding; seq: [B, L, D] history embeddings; mask: bool
        [B, L] (a prefix of real items per row); other: [B, n] or None. Returns float32
        [B] logits."""
        from recis_jax.models.attention import DIN

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        enc = SequenceTransformer(self.num_layers, self.hidden, self.num_heads, self.ffn, causal=False,
                                  out_dim=target.shape[-1], remat=self.remat, attention_impl=self.attention_impl,
                                  attention_dtype=self.attention_dtype, name="encoder", **kw)(seq, mask)
        return DIN(mlp=tuple(self.mlp), name="din", **kw)(target, enc, mask, other)
