"""Collision-free dynamic embedding tables: hashtable state, dedup, pooling, engine,
growth and eviction. The public entry points:

    from recis_jax.embedding import EmbeddingEngine, EmbeddingOption, Admission, EvictionPolicy, Initializer
"""

from recis_jax.embedding.engine import Admission, EmbeddingEngine, EmbeddingOption, TableState
from recis_jax.embedding.eviction import EvictionPolicy
from recis_jax.embedding.initializers import Initializer

__all__ = ["Admission", "EmbeddingEngine", "EmbeddingOption", "EvictionPolicy", "Initializer", "TableState"]
