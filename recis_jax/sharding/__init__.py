"""Row-sharded embedding tables over a device mesh (all_to_all by ID owner)."""

from recis_jax.sharding.mesh import (AXIS, make_mesh, owner_of, put, put_process_local, split_features,
                                     squeeze, stack, unsqueeze)
from recis_jax.sharding.sharded_engine import ShardedEmbeddingEngine, ShardedLookup, make_train_step

__all__ = ["AXIS", "make_mesh", "owner_of", "put", "put_process_local", "split_features", "squeeze", "stack",
           "unsqueeze", "ShardedEmbeddingEngine", "ShardedLookup", "make_train_step"]
