"""Shared dense building blocks: dtype policy, MLP, attention dispatch.

Precision policy used by every model in `recis_jax.models`:
  * parameters are stored in `param_dtype` (float32 by default) so optimizer updates
    are exact enough;
  * matmuls and activations run in `dtype` (bfloat16 by default; float32 for checks);
  * normalisations, softmax weights, FM sums and the returned logits are float32.

Every float dtype is explicit: `import recis_jax` turns on x64, so a bare python float
inside a jnp op could otherwise produce float64.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from recis_jax.models.dots import add_bias, dense_dot_general

Dtype = Any

#: environment override for the attention backend: "xla" | "cudnn" (unset: automatic).
ATTENTION_ENV = "RECIS_ATTENTION"


class Dense(nn.Module):
    """`nn.Dense` (the same parameters: kernel [in, features] lecun-normal, bias
    [features] zeros; the same dtype promotion) with `dots.dense_dot_general` and
    `dots.add_bias`: its bias gradient is summed in float32 (in bfloat16 it was wrong on
    the CPU) and its bfloat16 weight gradient runs fast on XLA:CPU.

    Input [..., in]; output [..., features] in `dtype` (None: promoted from the input and
    the parameters).
    """

    features: int
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(x)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = dense_dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return y if bias is None else add_bias(y, bias)


class MLP(nn.Module):
    """A stack of Dense layers.

    Attributes:
      features: output width of each layer, e.g. (64, 16, 1).
      activation: applied after every layer but the last (and after the last too when
        `final_activation`).
      final_activation: True for towers whose output feeds another layer (DLRM's bottom
        MLP), False for those that end in a logit.
      dtype: compute dtype; param_dtype: storage dtype of kernels and biases.

    Input [..., d_in] any float dtype; output [..., features[-1]] in `dtype`.
    """

    features: Sequence[int]
    activation: Callable = nn.relu
    final_activation: bool = False
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        n = len(self.features)
        for i, f in enumerate(self.features):
            x = Dense(f, dtype=self.dtype, param_dtype=self.param_dtype, name=f"dense_{i}")(x)
            if i < n - 1 or self.final_activation:
                x = self.activation(x)
        return x


def layer_norm(name: str | None = None) -> nn.LayerNorm:
    """LayerNorm computed and returned in float32 (statistics of bf16 inputs lose bits)."""
    return nn.LayerNorm(dtype=jnp.float32, param_dtype=jnp.float32, name=name)


def attention_implementation(dtype: Dtype, head_dim: int, requested: str | None = None) -> str:
    """Pick the attention backend: "cudnn" (flash attention) or "xla".

    `requested` (or $RECIS_ATTENTION) wins when given. Otherwise cuDNN on a GPU for the
    shapes and dtypes it supports (bf16/fp16, head_dim a multiple of 8 and <= 128), XLA
    everywhere else (CPU, float32 checks).
    """
    requested = requested or os.environ.get(ATTENTION_ENV) or None
    if requested is not None:
        if requested not in ("xla", "cudnn"):
            raise ValueError(f"attention implementation must be 'xla' or 'cudnn', got {requested!r}")
        return requested
    on_gpu = jax.default_backend() == "gpu"
    ok = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if on_gpu and ok and head_dim % 8 == 0 and head_dim <= 128 else "xla"


def dot_product_attention(q, k, v, *, lengths=None, causal: bool = False,
                          implementation: str | None = None):
    """Multi-head attention over right-padded sequences.

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D] (same dtype; bf16 for cuDNN).
      lengths: int [B] or None: keys at positions >= lengths[b] are padding (the layout
        `EmbeddingEngine.pool(..., combiner="none")` produces: mask = pos < length).
        Query rows past the length are zeroed in the output, so both backends agree.
      causal: query i sees keys j <= i only.
      implementation: "xla" | "cudnn" | None (automatic, see `attention_implementation`).

    Returns [B, Lq, H, D] in q's dtype. Padding goes to cuDNN as sequence lengths, not as
    a dense [B, 1, Lq, Lk] mask: that would materialise L^2 memory at 16k tokens.
    """
    impl = attention_implementation(q.dtype, q.shape[-1], implementation)
    kw = {}
    if lengths is not None:
        lengths = lengths.astype(jnp.int32)
        kw = dict(query_seq_lengths=lengths, key_value_seq_lengths=lengths) \
            if q.shape[1] == k.shape[1] else dict(key_value_seq_lengths=lengths)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl, **kw)
    if lengths is not None and q.shape[1] == k.shape[1]:
        valid = jnp.arange(q.shape[1], dtype=jnp.int32)[None, :] < lengths[:, None]
        out = jnp.where(valid[:, :, None, None], out, jnp.zeros((), out.dtype))
    return out


def stack_fields(pooled: Mapping[str, Any], names: Sequence[str], dtype=None):
    """Stack pooled embeddings {name: [B, dim]} (EmbeddingEngine.pool's output) into the
    [B, F, dim] field array DeepFM and DCNv2 take, in the order of `names`."""
    out = jnp.stack([pooled[n] for n in names], axis=1)
    return out if dtype is None else out.astype(dtype)


def mask_to_lengths(mask):
    """bool [B, L] prefix mask -> int32 [B] lengths."""
    return jnp.sum(mask, axis=-1, dtype=jnp.int32)
