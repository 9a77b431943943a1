"""Evaluation metrics: exact host metrics (`auc`, `gauc`, `logloss`, `calibration`, NumPy)
and on-device streaming ones (`streaming.init / update / merge / result`, float32,
jittable, psum-able).
"""

from recis_jax.metrics.auc import auc, calibration, gauc, logloss
from recis_jax.metrics import streaming
from recis_jax.metrics.streaming import StreamingState

__all__ = ["auc", "gauc", "logloss", "calibration", "StreamingState", "streaming"]
