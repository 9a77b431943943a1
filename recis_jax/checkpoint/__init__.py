"""Checkpoints: sparse tables as safetensors (live rows, any device count), dense state
with orbax, one atomic step directory with a checksummed manifest; incremental exports
of changed rows for online serving.

See `manager` (layout, atomicity, retention), `sparse` (the per-table files, loading
onto another device count) and `incremental` (full / delta exports).
"""

from recis_jax.checkpoint.incremental import (IncrementalExporter, export_incremental, list_exports, materialize,
                                              read_export)
from recis_jax.checkpoint.manager import (CheckpointManager, Restored, describe, read_manifest, restore_dense,
                                          step_dir_name)
from recis_jax.checkpoint.sparse import CheckpointError, load_sparse, save_sparse

__all__ = ["CheckpointError", "CheckpointManager", "IncrementalExporter", "Restored", "describe",
           "export_incremental", "list_exports", "load_sparse", "materialize", "read_export", "read_manifest",
           "restore_dense", "save_sparse", "step_dir_name"]
