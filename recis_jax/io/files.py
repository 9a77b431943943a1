"""Columnar files: listing, footer metadata (row counts per unit), reading one unit.

A *unit* is the smallest piece a worker reads: a Parquet row group or an ORC stripe.
Row counts come from footers only, so every process can plan the whole epoch (and agree
on steps per epoch) before reading any data.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.orc as orc
import pyarrow.parquet as pq

FORMATS = ("orc", "parquet")
_SUFFIXES = {".orc": "orc", ".parquet": "parquet", ".pq": "parquet"}


class DataError(ValueError):
    """Bad input data; the message names the file (and column, where it applies)."""


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """Footer facts of one file.

    path: the file; format: "orc" | "parquet"; unit_rows: rows per stripe / row group;
    schema: the arrow schema; nbytes: file size on disk.
    """

    path: str
    format: str
    unit_rows: tuple[int, ...]
    schema: pa.Schema
    nbytes: int

    @property
    def num_rows(self) -> int:
        return sum(self.unit_rows)


def list_files(paths: str | Sequence[str], format: str | None = None) -> list[str]:
    """Expands files, directories (their ORC/Parquet files, recursively) and globs into a
    sorted list of paths. Raises DataError for a path that matches nothing."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in map(str, paths):
        if os.path.isdir(p):
            found = [
                os.path.join(root, f)
                for root, _, names in os.walk(p)
                for f in names
                if not f.startswith((".", "_")) and _format_of(f, None) in ((format,) if format else FORMATS)
            ]
            if not found:
                raise DataError(f"{p}: directory holds no .orc/.parquet files")
            out.extend(found)
        elif os.path.exists(p):
            out.append(p)
        else:
            matches = [m for m in glob.glob(p) if os.path.isfile(m)]
            if not matches:
                raise DataError(f"{p}: no such file or directory")
            out.extend(matches)
    return sorted(set(out))


def _format_of(path: str, format: str | None) -> str | None:
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        return format
    return _SUFFIXES.get(os.path.splitext(path)[1].lower())


def file_info(path: str, format: str | None = None) -> FileInfo:
    """Reads a file's footer. Raises DataError naming the file if it is missing, empty,
    truncated or not ORC/Parquet."""
    fmt = _format_of(path, format)
    if fmt is None:
        fmt = _sniff_format(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    if size == 0:
        raise DataError(f"{path}: empty file (0 bytes), not a valid {fmt} file")
    try:
        if fmt == "parquet":
            meta = pq.ParquetFile(path).metadata
            rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
            schema = meta.schema.to_arrow_schema()
        else:
            f = orc.ORCFile(path)
            rows = _orc_stripe_rows(f)
            schema = f.schema
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable {fmt} file (truncated or corrupt?): {e}") from None
    return FileInfo(path, fmt, rows, schema, size)


def _sniff_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    if head == b"PAR1":
        return "parquet"
    if head[:3] == b"ORC":
        return "orc"
    raise DataError(f"{path}: unknown format (not ORC or Parquet; name it .orc/.parquet or pass format=)")


def read_unit(info: FileInfo, unit: int, columns: Sequence[str]) -> pa.Table:
    """Reads one stripe / row group of `columns`. Raises DataError naming the file."""
    try:
        if info.format == "parquet":
            table = pq.ParquetFile(info.path).read_row_group(unit, columns=list(columns), use_threads=False)
        else:
            batch = orc.ORCFile(info.path).read_stripe(unit, columns=list(columns))
            table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{info.path}: failed to read {'row group' if info.format == 'parquet' else 'stripe'} "
                        f"{unit}: {e}") from None
    if table.num_rows != info.unit_rows[unit]:
        raise DataError(f"{info.path}: unit {unit} has {table.num_rows} rows, footer says {info.unit_rows[unit]}")
    return table


# -- ORC footer: stripe row counts --------------------------------------------------
# pyarrow exposes an ORC file's total rows but not rows per stripe; both live in the
# footer protobuf (FileTail.footer.stripes[i].numberOfRows), which we decode directly.


def _orc_stripe_rows(f: orc.ORCFile) -> tuple[int, ...]:
    tail = f.reader.serialized_file_tail()
    footer = _pb_fields(tail).get(2, [b""])[0]  # FileTail.footer
    stripes = _pb_fields(footer).get(3, [])  # Footer.stripes
    rows = tuple(_pb_fields(s).get(5, [0])[0] for s in stripes)  # StripeInformation.numberOfRows
    if sum(rows) != f.nrows or len(rows) != f.nstripes:
        raise DataError(f"ORC footer stripe rows {rows} disagree with nrows {f.nrows}")
    return rows


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, i
        shift += 7


def _pb_fields(buf: bytes) -> dict[int, list]:
    """Decodes one protobuf message level: field number -> list of values (ints for
    varints, bytes for length-delimited); fixed-width fields are skipped."""
    fields: dict[int, list] = {}
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            val, i = buf[i:i + n], i + n
        elif wire == 1:
            val, i = None, i + 8
        elif wire == 5:
            val, i = None, i + 4
        else:
            raise DataError(f"ORC footer: unsupported protobuf wire type {wire}")
        fields.setdefault(num, []).append(val)
    return fields
