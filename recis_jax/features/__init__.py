"""Feature transforms: raw columns -> embedding IDs and dense inputs.

`functional` holds the transforms as jit-compatible functions; `ops` the declarative
ops with RecIS's names (SelectField, SelectFields, Hash, Mod, Bucketize, IDMultiHash,
FeatureCross, SequenceTruncate) plus numeric ops for dense columns; `engine` the
FeatureEngine that runs a list of `Feature`s over a batch dict.
"""

from recis_jax.features import functional
from recis_jax.features.engine import HOST_PREFIX, OVERFLOW_KEY, FeatureEngine
from recis_jax.features.functional import TableIdPairs, table_id_pairs
from recis_jax.features.ops import (
    Bucketize,
    Clip,
    Feature,
    FeatureCross,
    FillMissing,
    Hash,
    IDMultiHash,
    Log1p,
    Mod,
    SelectField,
    SelectFields,
    SequenceTruncate,
    Standardize,
)

__all__ = [
    "HOST_PREFIX",
    "OVERFLOW_KEY",
    "Bucketize",
    "Clip",
    "Feature",
    "FeatureCross",
    "FeatureEngine",
    "FillMissing",
    "Hash",
    "IDMultiHash",
    "Log1p",
    "Mod",
    "SelectField",
    "SelectFields",
    "SequenceTruncate",
    "Standardize",
    "TableIdPairs",
    "functional",
    "table_id_pairs",
]
