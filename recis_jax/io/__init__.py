"""Columnar IO: ORC/Parquet files -> host batches of dense arrays and Ragged features."""

from recis_jax.io.columns import FixedLenFeature, VarLenFeature
from recis_jax.io.files import DataError, FileInfo, file_info, list_files
from recis_jax.io.reader import Batch, Reader, ReaderState

__all__ = ["Batch", "DataError", "FileInfo", "FixedLenFeature", "Reader", "ReaderState", "VarLenFeature",
           "file_info", "list_files"]
