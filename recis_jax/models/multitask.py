"""Multi-task heads: shared-bottom and MMoE (Ma et al. 2018).

Both take one feature vector per sample (the caller concatenates pooled embeddings,
dense features and multimodal vectors) and return one logit per task; the losses are
`losses.multitask_loss` (per-task weights, per-sample weights).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from recis_jax.models.layers import MLP, Dtype


class SharedBottom(nn.Module):
    """x -> shared MLP -> one tower per task -> logits.

    Attributes: num_tasks; bottom (shared widths, ReLU after each); tower (per-task
    widths before its logit); dtype / param_dtype.
    """

    num_tasks: int = 2
    bottom: Sequence[int] = (256, 128)
    tower: Sequence[int] = (64,)
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: [B, d] float. Returns float32 logits [B, num_tasks]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = MLP(self.bottom, final_activation=True, name="bottom", **kw)(x.astype(self.dtype))
        outs = [MLP((*self.tower, 1), name=f"tower_{t}", **kw)(h) for t in range(self.num_tasks)]
        return jnp.concatenate(outs, axis=-1).astype(jnp.float32)


class MMoE(nn.Module):
    """Multi-gate mixture of experts.

    E expert MLPs see x; task t mixes them with softmax gate g_t(x) (float32, sums to 1
    over experts), then its tower gives the logit.

    Attributes: num_tasks; num_experts; expert (expert widths, ReLU after each);
    tower (per-task widths before its logit); dtype / param_dtype.
    """

    num_tasks: int = 2
    num_experts: int = 4
    expert: Sequence[int] = (128, 64)
    tower: Sequence[int] = (32,)
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, return_gates: bool = False):
        """x: [B, d] float. Returns float32 logits [B, num_tasks] (and float32 gates
        [B, num_tasks, num_experts] if return_gates)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        xc = x.astype(self.dtype)
        # experts as one vmapped MLP: E small matmuls batched into one
        experts = nn.vmap(MLP, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=None, out_axes=1, axis_size=self.num_experts)(
            self.expert, final_activation=True, name="experts", **kw)(xc)   # [B, E, h]
        gate_logits = nn.Dense(self.num_tasks * self.num_experts, dtype=jnp.float32,
                               param_dtype=self.param_dtype, name="gates")(x.astype(jnp.float32))
        gates = jax.nn.softmax(gate_logits.reshape(-1, self.num_tasks, self.num_experts), axis=-1)
        mixed = jnp.einsum("bte,beh->bth", gates, experts.astype(jnp.float32))  # [B, T, h]
        outs = [MLP((*self.tower, 1), name=f"tower_{t}", **kw)(mixed[:, t].astype(self.dtype))
                for t in range(self.num_tasks)]
        logits = jnp.concatenate(outs, axis=-1).astype(jnp.float32)
        return (logits, gates) if return_gates else logits
