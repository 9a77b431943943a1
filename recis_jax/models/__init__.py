"""Dense models (Flax linen): DeepFM, DCNv2, DIN target attention, sequence Transformer,
multi-task heads; losses in `recis_jax.models.losses`.

Models take arrays, not tables: stacked field embeddings [B, F, dim], dense features
[B, n] float32, sequences [B, L, dim] with a right-padding mask [B, L]. Parameters are
float32, compute is `dtype` (bfloat16 by default), losses/norms/logits are float32.

Why linen, not NNX: a linen model is a pure function `apply(params, inputs)` of a
params pytree. That is the shape of everything else here (hashtables are state pytrees
passed into and out of one jitted, donated `train_step`; optax states are pytrees), so
dense and sparse state travel together with no split/merge at the jit boundary, and
`jax.grad` / `shard_map` / donation apply to the params directly.
"""

from recis_jax.models.attention import DIN, TargetAttention
from recis_jax.models.dcnv2 import DCNv2, LowRankCross
from recis_jax.models.deepfm import DeepFM
from recis_jax.models.layers import (MLP, attention_implementation, dot_product_attention,
                                     stack_fields)
from recis_jax.models.losses import (multitask_loss, multitask_metrics, sigmoid_bce_with_logits,
                                     softmax_ce)
from recis_jax.models.multitask import MMoE, SharedBottom
from recis_jax.models.registry import MODELS, from_config
from recis_jax.models.transformer import (SequenceTransformer, TransformerBlock,
                                          transformer_flops)

__all__ = [
    "DIN", "TargetAttention", "DCNv2", "LowRankCross", "DeepFM", "MLP",
    "attention_implementation", "dot_product_attention", "multitask_loss",
    "multitask_metrics", "sigmoid_bce_with_logits", "softmax_ce", "MMoE", "SharedBottom",
    "SequenceTransformer", "TransformerBlock", "transformer_flops", "MODELS", "from_config",
    "stack_fields",
]
