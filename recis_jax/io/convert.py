"""CSV/TSV -> ORC/Parquet conversion (`recis-jax convert SRC [SRC...] DST`).

The training readers take columnar files; public CTR samples (Criteo, Avazu, MovieLens)
come as delimited text. This module converts one or many text files with pyarrow,
streaming block by block, so a file larger than memory converts in bounded memory
(under ``schema="infer"`` every input is read twice: types first, then data).

Column types come from one of three places:

* ``schema="infer"`` (default): every column is read as text, then typed by what *all*
  of its non-empty values (over all input files) parse as:

  ===================================================  ===========
  every value is a decimal integer that fits int64      int64
  ... some exceed int64 but all fit uint64 (>= 0)       uint64
  ... some fit neither (or a redundant leading zero,    string
      e.g. a zip code ``02134``)
  every value parses as a float (``260.0``, ``1e3``,    float64
  ``nan``, ``inf``)
  anything else (hex IDs such as ``05db9164``, text)    string
  no value at all (the column is empty everywhere)      string
  ===================================================  ===========

  Integers never pass through float: Avazu's 20-digit ``id`` column keeps its exact
  values as uint64. Hex strings are never read as hex numbers.
* ``schema="criteo"``: ``label`` int64, ``I1..I13`` float64, ``C1..C26`` string (40
  columns). Raw Criteo TSV has no header and gets those names; a file with a header keeps
  its own names (the types are by position).
* ``schema="FILE.json"``: a JSON object mapping every column name to a type, in file
  order, e.g. ``{"label": "int64", "price": "float64", "tags": "list<string>"}``. Types:
  ``int64``, ``uint64``, ``float64`` (alias ``double``), ``string``, ``list<T>`` with T
  one of those four. With a header the names must match the header's (in any order);
  without one the mapping's order names the columns.

Empty fields are nulls (missing), never zero. List columns (``list_columns``, or a
``list<T>`` schema type) split each field on a separator (default ``|``): ``a|b`` ->
``[a, b]``; an empty field is an empty list (not null) and empty elements (``a||b``) are
dropped; under ``infer`` the element type follows the same rules as above.

ORC has no unsigned integer types: there a uint64 column (or list element) is stored as
int64 holding the same 64 bits, still exact (``10000169349117863715`` reads back as
``-8446574724591687901``; ``numpy.view(np.uint64)`` restores it) and the natural form
for the int64 feature-ID pipeline. Parquet stores uint64 as such.

Output: one ``.orc``/``.parquet`` per input file, written to a temp file and renamed,
so a reader never sees a partial file. ``row_group_size`` is the exact number of rows
per Parquet row group (the last one holds the remainder). pyarrow's ORC writer only takes
a stripe size in bytes; `TableWriter` hands it batches of exactly ``row_group_size`` rows
with a 1-byte stripe bound, so every batch ends a stripe, exactly, when uncompressed.
Compressed, the writer sees a stripe's size only once some column stream has filled a
64 KiB compression block, so small groups merge: a stripe then holds the smallest
multiple of ``row_group_size`` rows that fills one block (8,192 rows of one-ID-per-row
int64 columns are exactly 64 KiB: two groups per stripe; at the default 65,536 rows
stripes are exact). Stripe boundaries always fall on row-group boundaries.

Every input problem (missing/empty/binary file, ragged rows, a value that does not fit
its declared type, an unknown format) raises `ConvertError` with the file and, where
known, the line and column; the CLI prints it as ``error: ...`` and exits with 2.
"""

from __future__ import annotations

import argparse
import codecs
import csv
import dataclasses
import gc
import io
import json
import os
import pathlib
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.orc as porc
import pyarrow.parquet as pq

FORMATS = ("parquet", "orc")

CRITEO_NAMES = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
CRITEO_TYPES = [pa.int64()] + [pa.float64()] * 13 + [pa.string()] * 26

_SCALAR_TYPES = {
    "int64": pa.int64(),
    "uint64": pa.uint64(),
    "float64": pa.float64(),
    "double": pa.float64(),
    "string": pa.string(),
}
# Compression names per format; "none" and "gzip"/"zlib" are accepted for both.
_COMPRESSION = {
    "parquet": {"none": "none", "uncompressed": "none", "snappy": "snappy", "gzip": "gzip",
                "zlib": "gzip", "brotli": "brotli", "lz4": "lz4", "zstd": "zstd"},
    "orc": {"none": "uncompressed", "uncompressed": "uncompressed", "snappy": "snappy",
            "zlib": "zlib", "gzip": "zlib", "lz4": "lz4", "zstd": "zstd"},
}
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
_INT_RE = r"^-?[0-9]+$"
_LEADING_ZERO_RE = r"^-?0[0-9]"
_HEADER_NAME_RE = r"^[A-Za-z_][A-Za-z0-9_.\- ]*$"
_SNIFF_BYTES = 1 << 16
_BLOCK_BYTES = 1 << 22  # pyarrow CSV block: the unit of streaming and of type evidence


class ConvertError(ValueError):
    """A problem with the input or the arguments, with a message naming the file/line."""


# --------------------------------------------------------------------------- writing


def _check_format(format: str) -> str:
    fmt = str(format).lower().lstrip(".")
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format {format!r}: expected one of {', '.join(FORMATS)}")
    return fmt


def _check_compression(format: str, compression: str | None) -> str:
    name = "none" if compression is None else str(compression).lower()
    table = _COMPRESSION[format]
    if name not in table:
        raise ConvertError(
            f"unknown compression {compression!r} for {format}: expected one of {', '.join(sorted(table))}"
        )
    return table[name]


def _orc_schema(schema: pa.Schema) -> pa.Schema:
    def signed(t: pa.DataType) -> pa.DataType:
        if t == pa.uint64():
            return pa.int64()
        if pa.types.is_list(t):
            return pa.list_(signed(t.value_type))
        return t

    return pa.schema([pa.field(f.name, signed(f.type)) for f in schema])


class TableWriter:
    """Writes a stream of same-schema tables to one ORC/Parquet file, atomically.

    Data goes to a hidden temp file next to `path`; `close()` renames it into place and
    `abort()` removes it. Use as a context manager: an exception aborts.

    Args:
      path: the output file.
      schema: the arrow schema every written table has.
      format: "parquet" or "orc".
      compression: codec name (see `_COMPRESSION`; "none" for none).
      row_group_size: rows per Parquet row group / ORC stripe (tables are re-chunked;
        the last group holds the remainder; small compressed ORC stripes merge, see the
        module docstring).
    """

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, *, format: str = "parquet",
                 compression: str | None = "zstd", row_group_size: int = 65536):
        self.path = pathlib.Path(path)
        self.schema = schema
        self.format = _check_format(format)
        self.compression = _check_compression(self.format, compression)
        if int(row_group_size) <= 0:
            raise ConvertError(f"row_group_size must be > 0, got {row_group_size}")
        self.row_group_size = int(row_group_size)
        self.rows = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}"
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: Any = None
        # ORC has no unsigned integer types: uint64 (and list<uint64>) columns are stored
        # as int64 holding the same 64 bits (exact; values >= 2**63 read back negative).
        self.stored_schema = schema if self.format == "parquet" else _orc_schema(schema)
        self.reinterpreted = [f.name for f, g in zip(schema, self.stored_schema) if f.type != g.type]
        if self.format == "parquet":
            self._writer = pq.ParquetWriter(self._tmp, schema, compression=self.compression)
        else:
            # pyarrow's ORC writer only bounds stripes in bytes, but it checks that bound
            # after every internal batch of `batch_size` rows: with batches of exactly
            # row_group_size rows and a 1-byte bound, each batch ends a stripe (once the
            # compressed size is non-zero: see the module docstring).
            self._writer = porc.ORCWriter(str(self._tmp), compression=self.compression,
                                          batch_size=self.row_group_size, stripe_size=1)

    def _write_rows(self, table: pa.Table) -> None:
        if self.format == "parquet":
            self._writer.write_table(table, row_group_size=self.row_group_size)
        else:
            if self.reinterpreted:
                table = table.cast(self.stored_schema, safe=False)  # uint64 -> int64 wraps
            self._writer.write(table)

    def write(self, table: pa.Table) -> None:
        """Append `table` (must match the schema)."""
        if not table.schema.equals(self.schema):
            table = table.cast(self.schema)
        self.rows += table.num_rows
        # A row group / stripe never spans write calls, so buffer until full groups.
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.row_group_size:
            buf = pa.concat_tables(self._pending)
            full = (buf.num_rows // self.row_group_size) * self.row_group_size
            self._write_rows(buf.slice(0, full))
            rest = buf.slice(full)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        """Flush, close and rename the temp file into place."""
        if self._pending or (self.format == "orc" and self.rows == 0):
            self._write_rows(pa.concat_tables(self._pending) if self._pending else self.schema.empty_table())
            self._pending = []
        self._writer.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the partial output."""
        try:
            if self._writer is not None:
                self._writer.close()
        except Exception:  # the writer may be in a failed state; the temp file goes anyway
            pass
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "TableWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_table(table: pa.Table, path: str | os.PathLike, *, format: str = "parquet",
                compression: str | None = "zstd", row_group_size: int = 65536) -> None:
    """Write one arrow table to `path` as ORC or Parquet, atomically (temp + rename)."""
    with TableWriter(path, table.schema, format=format, compression=compression,
                     row_group_size=row_group_size) as w:
        w.write(table)


# --------------------------------------------------------------------------- types


def parse_type(spec: str) -> pa.DataType:
    """A schema type name -> arrow type: int64, uint64, float64/double, string, list<T>."""
    s = str(spec).strip().lower().replace(" ", "")
    if s.startswith("list<") and s.endswith(">"):
        inner = s[5:-1]
        inner = inner[5:] if inner.startswith("item:") else inner
        if inner in _SCALAR_TYPES:
            return pa.list_(_SCALAR_TYPES[inner])
    elif s in _SCALAR_TYPES:
        return _SCALAR_TYPES[s]
    raise ConvertError(
        f"unknown column type {spec!r}: expected int64, uint64, float64, string or list<one of those>"
    )


def _casts(values: pa.Array, typ: pa.DataType) -> bool:
    try:
        pc.cast(values, typ)
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False


@dataclasses.dataclass
class _Evidence:
    """What the non-empty values of one column (or list column's elements) parse as."""

    seen: bool = False
    all_int: bool = True
    fits_int64: bool = True
    fits_uint64: bool = True
    all_float: bool = True
    leading_zero: bool = False

    def update(self, values: pa.Array) -> None:
        values = values.drop_null()
        if len(values) == 0:
            return
        self.seen = True
        if not (self.all_int or self.all_float):
            return  # already a string column: nothing can change that
        if self.all_int:
            if pc.all(pc.match_substring_regex(values, _INT_RE)).as_py():
                if pc.any(pc.match_substring_regex(values, _LEADING_ZERO_RE)).as_py():
                    self.leading_zero = True
                # Exact integer parsing (never through float): Avazu IDs need all 64 bits.
                self.fits_int64 = self.fits_int64 and _casts(values, pa.int64())
                self.fits_uint64 = self.fits_uint64 and _casts(values, pa.uint64())
                return  # integers also parse as floats
            self.all_int = False
        self.all_float = self.all_float and _casts(values, pa.float64())

    def decide(self) -> pa.DataType:
        if not self.seen:
            return pa.string()
        if self.all_int:
            if self.leading_zero:
                return pa.string()  # identifiers like zip codes: converting loses digits
            if self.fits_int64:
                return pa.int64()
            if self.fits_uint64:
                return pa.uint64()
            return pa.string()  # beyond 64 bits: keep the digits exactly
        return pa.float64() if self.all_float else pa.string()


def _split_list(arr: pa.Array, sep: str) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """Split a string column into (offsets int32 [n+1], element strings, element row ids).

    Null (empty) fields give empty lists; empty elements are dropped.
    """
    n = len(arr)
    parts = pc.split_pattern(pc.fill_null(arr, ""), sep)
    flat = pc.list_flatten(parts)
    parents = pc.list_parent_indices(parts).to_numpy(zero_copy_only=False)
    keep = pc.not_equal(flat, "")
    flat = flat.filter(keep)
    parents = parents[keep.to_numpy(zero_copy_only=False)]
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(np.bincount(parents, minlength=n), out=offsets[1:])
    return offsets, flat, parents


# --------------------------------------------------------------------------- reading


@dataclasses.dataclass
class _Source:
    """One input file as sniffed: its delimiter, header and column names."""

    path: pathlib.Path
    delimiter: str
    header: bool
    names: list[str]


def _open_stream(path: pathlib.Path) -> pa.NativeFile:
    # "detect" decompresses .gz/.bz2/.zst/.lz4 files by extension.
    return pa.input_stream(str(path), compression="detect")


def _first_line(path: pathlib.Path) -> tuple[str, bytes]:
    """(first non-empty line decoded, first chunk) with binary/empty-file checks."""
    try:
        with _open_stream(path) as f:
            chunk = f.read(_SNIFF_BYTES)
            while b"\n" not in chunk:
                more = f.read(_SNIFF_BYTES)
                if not more:
                    break
                chunk += more
                if len(chunk) > (64 << 20):
                    raise ConvertError(f"{path}: first line longer than 64 MiB: not a CSV/TSV file?")
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e}") from None
    if b"\x00" in chunk[:_SNIFF_BYTES]:
        raise ConvertError(f"{path}: binary data (NUL bytes) in the first {_SNIFF_BYTES} bytes: not a CSV/TSV text file")
    try:
        # final=False: a multi-byte character cut at the chunk's end is not an error.
        text = codecs.getincrementaldecoder("utf-8")().decode(chunk, final=False)
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path}: not UTF-8 text (byte offset {e.start}): not a CSV/TSV text file") from None
    for line in text.lstrip("\ufeff").splitlines():  # a UTF-8 BOM is not part of a name
        if line.strip():
            return line, chunk
    raise ConvertError(f"{path}: empty file (no data lines)")


def _split_line(line: str, delimiter: str) -> list[str]:
    return next(csv.reader([line], delimiter=delimiter, quotechar='"'))


def _looks_like_header(fields: list[str]) -> bool:
    pattern = re.compile(_HEADER_NAME_RE)
    return (all(f and pattern.match(f) for f in fields) and len(set(fields)) == len(fields))


def _sniff(path: pathlib.Path, delimiter: str | None, header: bool | None,
           fixed_names: list[str] | None) -> _Source:
    line, _ = _first_line(path)
    if delimiter is None:
        # Tab wins when present: CSV text rarely holds tabs, TSV text often holds commas.
        delimiter = "\t" if "\t" in line else ","
    fields = _split_line(line, delimiter)
    if header is None:
        header = _looks_like_header(fields)
    if header:
        names = [f.strip() for f in fields]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ConvertError(f"{path}: line 1: duplicate column names in the header: {dup}")
        if any(not n for n in names):
            raise ConvertError(f"{path}: line 1: empty column name in the header")
    elif fixed_names is not None:
        names = list(fixed_names)
    else:
        names = [f"f{i}" for i in range(len(fields))]
    if len(fields) != len(names):
        raise ConvertError(
            f"{path}: line 1: expected {len(names)} fields, got {len(fields)} "
            f"(delimiter {delimiter!r}; pass --delimiter if that is wrong)"
        )
    return _Source(path=path, delimiter=delimiter, header=bool(header), names=names)


def _records(src: _Source) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of the data records, with Python's csv module (error paths)."""
    with _open_stream(src.path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
        reader = csv.reader(text, delimiter=src.delimiter, quotechar='"')
        first = True
        for fields in reader:
            if not fields or fields == [""]:
                continue  # pyarrow skips empty lines too
            if first and src.header:
                first = False
                continue
            first = False
            yield reader.line_num, fields


def _line_of_row(src: _Source, row: int) -> int | None:
    for i, (line, _) in enumerate(_records(src)):
        if i == row:
            return line
    return None


def _first_ragged_line(src: _Source) -> tuple[int, int] | None:
    for line, fields in _records(src):
        if len(fields) != len(src.names):
            return line, len(fields)
    return None


def _read_batches(src: _Source) -> Iterator[pa.RecordBatch]:
    """The file's data as record batches of nullable strings (empty field = null)."""
    bad_rows: list[Any] = []

    def on_invalid(row: Any) -> str:
        bad_rows.append(row)
        return "error"

    def fail(e: Exception) -> ConvertError:
        if bad_rows:
            row = bad_rows[0]
            where = _first_ragged_line(src)
            if where is not None:
                line, got = where
                return ConvertError(f"{src.path}: line {line}: expected {len(src.names)} fields, got {got}")
            return ConvertError(
                f"{src.path}: a row has {row.actual_columns} fields, expected {row.expected_columns}: "
                f"{row.text[:200]!r}"
            )
        msg = str(e)
        if "UTF8" in msg or "UTF-8" in msg:
            return ConvertError(f"{src.path}: not UTF-8 text (binary data?): {msg}")
        return ConvertError(f"{src.path}: cannot parse as delimited text: {msg}")

    read_opts = pacsv.ReadOptions(column_names=src.names, skip_rows=1 if src.header else 0,
                                  block_size=_BLOCK_BYTES)
    parse_opts = pacsv.ParseOptions(delimiter=src.delimiter, quote_char='"',
                                    invalid_row_handler=on_invalid)
    convert_opts = pacsv.ConvertOptions(
        column_types={n: pa.string() for n in src.names},
        null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=True,
    )
    stream = _open_stream(src.path)
    try:
        try:
            reader = pacsv.open_csv(stream, read_options=read_opts, parse_options=parse_opts,
                                    convert_options=convert_opts)
        except pa.ArrowInvalid as e:
            raise fail(e) from None
        with reader:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except pa.ArrowInvalid as e:
                    raise fail(e) from None
                yield batch
    finally:
        # Close readers and streams promptly: pyarrow threads still alive at interpreter
        # exit can abort the process (apache/arrow#34314).
        stream.close()


# --------------------------------------------------------------------------- converting


def _cast_checked(values: pa.Array, typ: pa.DataType, src: _Source, column: str,
                  row_of: Any) -> pa.Array:
    """Cast strings to `typ`; on failure, name the first bad value's file, line, column."""
    if typ == pa.string():
        return values
    try:
        return pc.cast(values, typ)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # Bisect for the first value that does not cast (error path only).
    lo, hi = 0, len(values)  # invariant: values[:lo] casts, values[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _casts(values.slice(0, mid), typ):
            lo = mid
        else:
            hi = mid
    bad = hi - 1
    line = _line_of_row(src, row_of(bad))
    where = f"line {line}" if line is not None else f"data row {row_of(bad) + 1}"
    raise ConvertError(
        f"{src.path}: {where}, column {column!r}: value {values[bad].as_py()!r} is not a valid {typ}"
    )


def _convert_batch(batch: pa.RecordBatch, schema: pa.Schema, seps: dict[str, str],
                   src: _Source, row0: int) -> pa.Table:
    arrays = []
    for field in schema:
        arr = batch.column(field.name)
        if pa.types.is_list(field.type):
            offsets, flat, parents = _split_list(arr, seps[field.name])
            values = _cast_checked(flat, field.type.value_type, src, field.name,
                                   lambda i: row0 + int(parents[i]))
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values,
                                                   type=field.type))
        else:
            arrays.append(_cast_checked(arr, field.type, src, field.name, lambda i: row0 + i))
    return pa.Table.from_arrays(arrays, schema=schema)


def _expand_sources(src: str | os.PathLike | Sequence[str | os.PathLike]) -> list[pathlib.Path]:
    items = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    if not items:
        raise ConvertError("no input files given")
    paths: list[pathlib.Path] = []
    for item in items:
        p = pathlib.Path(item)
        if p.is_dir():
            # Every visible regular file except outputs of a previous run (raw Criteo days
            # have no extension, so no extension filter).
            found = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                           and f.suffix.lower() not in (".orc", ".parquet"))
            if not found:
                raise ConvertError(f"{p}: directory holds no input files")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        elif p.exists():
            raise ConvertError(f"{p}: not a regular file or directory")
        else:
            raise ConvertError(f"{p}: no such file or directory")
    return paths


def _output_stem(path: pathlib.Path) -> str:
    name = path.name
    for suffix in _COMPRESSED_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return pathlib.Path(name).stem or name


def _parse_list_columns(list_columns: Any, list_sep: str) -> dict[str, str]:
    if not list_columns:
        return {}
    if isinstance(list_columns, dict):
        seps = {str(k): str(v) for k, v in list_columns.items()}
    else:
        seps = {str(name): list_sep for name in list_columns}
    for name, sep in seps.items():
        if not sep:
            raise ConvertError(f"list column {name!r}: empty separator")
    return seps


def _load_schema(schema: Any) -> tuple[str, dict[str, pa.DataType] | None]:
    """('infer'|'criteo'|'json', {name: type} for json)."""
    if isinstance(schema, dict):
        return "json", {str(k): parse_type(v) for k, v in schema.items()}
    s = str(schema)
    if s in ("infer", "criteo"):
        return s, None
    path = pathlib.Path(s)
    if not path.is_file():
        raise ConvertError(f"schema {s!r}: expected 'infer', 'criteo' or a JSON file path (no such file)")
    try:
        mapping = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: cannot read schema JSON: {e}") from None
    if not isinstance(mapping, dict) or not mapping:
        raise ConvertError(f"{path}: schema must be a non-empty JSON object {{column: type}}")
    return "json", {str(k): parse_type(v) for k, v in mapping.items()}


def convert(src: str | os.PathLike | Sequence[str | os.PathLike], dst: str | os.PathLike, *,
            format: str = "parquet", schema: str | dict = "infer", delimiter: str | None = None,
            header: bool | None = None, list_columns: Sequence[str] | dict[str, str] | None = None,
            list_sep: str = "|", compression: str | None = "zstd",
            row_group_size: int = 65536) -> dict:
    """Convert CSV/TSV files to ORC or Parquet.

    Args:
      src: a file or directory path, or a list of them (a directory contributes every
        visible regular file in it, sorted; .gz/.bz2/.zst/.lz4 are decompressed).
      dst: with one input file, the output file path (unless it is an existing directory
        or ends with a path separator); otherwise a directory that receives one
        `<stem>.<format>` per input.
      format: "parquet" or "orc".
      schema: "infer", "criteo", a JSON schema file path or a {name: type} dict (see the
        module docstring).
      delimiter: field separator; None detects it from the first line (tab if it holds
        one, else comma).
      header: whether the first line names the columns; None detects it (every field a
        distinct identifier such as `label` or `I1`). Without one, columns are named
        f0, f1, ... (criteo/JSON schemas supply the names).
      list_columns: names of columns to split into lists, or {name: separator}.
      list_sep: the separator for names given without one.
      compression: "zstd" (default), "snappy", "lz4", "gzip"/"zlib", "brotli" (Parquet
        only) or "none".
      row_group_size: rows per Parquet row group / ORC stripe.

    Returns:
      dict(format, rows (total), columns {name: arrow type string}, uint64_as_int64 (names
      of uint64 columns stored as int64 bits, ORC only), files [{src, dst, rows}]).

    Raises:
      ConvertError: bad arguments or input, with the file and line in the message.
    """
    fmt = _check_format(format)
    _check_compression(fmt, compression)
    if int(row_group_size) <= 0:
        raise ConvertError(f"row_group_size must be > 0, got {row_group_size}")
    if delimiter is not None and len(delimiter) != 1:
        raise ConvertError(f"delimiter must be one character, got {delimiter!r}")
    mode, declared = _load_schema(schema)
    seps = _parse_list_columns(list_columns, list_sep)
    paths = _expand_sources(src)

    fixed_names = CRITEO_NAMES if mode == "criteo" else (list(declared) if declared else None)
    sources = [_sniff(p, delimiter, header, fixed_names) for p in paths]
    names = sources[0].names
    for s in sources[1:]:
        if s.names != names:
            raise ConvertError(f"{s.path}: columns {s.names} differ from {sources[0].path}'s {names}")

    # Column types.
    if mode == "criteo":
        if len(names) != len(CRITEO_NAMES):
            raise ConvertError(f"{sources[0].path}: criteo schema needs {len(CRITEO_NAMES)} columns, "
                               f"the file has {len(names)}")
        types = dict(zip(names, CRITEO_TYPES))
    elif mode == "json":
        assert declared is not None
        if set(declared) != set(names):
            raise ConvertError(
                f"{sources[0].path}: schema columns {sorted(declared)} do not match the file's {sorted(names)}"
            )
        types = dict(declared)
    else:
        types = {}
    for name in seps:
        if name not in names:
            raise ConvertError(f"list column {name!r} is not a column of {sources[0].path} ({names})")
        if mode != "infer" and not pa.types.is_list(types[name]):
            raise ConvertError(f"list column {name!r} has the non-list schema type {types[name]}")
    if mode != "infer":
        for name, typ in types.items():
            if pa.types.is_list(typ):
                seps.setdefault(name, list_sep)
    else:
        # Pass 1: type evidence over every file, so all outputs share one schema.
        evidence = {n: _Evidence() for n in names}
        for s in sources:
            for batch in _read_batches(s):
                for n in names:
                    col = batch.column(n)
                    evidence[n].update(_split_list(col, seps[n])[1] if n in seps else col)
        types = {n: (pa.list_(evidence[n].decide()) if n in seps else evidence[n].decide()) for n in names}
    out_schema = pa.schema([pa.field(n, types[n]) for n in names])

    # Output paths.
    dst_path = pathlib.Path(dst)
    to_dir = len(sources) > 1 or dst_path.is_dir() or str(dst).endswith(("/", os.sep))
    if to_dir:
        if dst_path.exists() and not dst_path.is_dir():
            raise ConvertError(f"{dst_path}: exists and is not a directory (several inputs need a directory)")
        outs = [dst_path / f"{_output_stem(s.path)}.{fmt}" for s in sources]
        dups = {o for o in outs if outs.count(o) > 1}
        if dups:
            raise ConvertError(f"several inputs map to the same output: {sorted(map(str, dups))}")
    else:
        outs = [dst_path]
    for s, o in zip(sources, outs):
        if o.resolve() == s.path.resolve():
            raise ConvertError(f"{o}: output would overwrite its input")

    # Pass 2: convert and write.
    files = []
    reinterpreted: list[str] = []
    for s, out in zip(sources, outs):
        rows = 0
        try:
            with TableWriter(out, out_schema, format=fmt, compression=compression,
                             row_group_size=row_group_size) as writer:
                reinterpreted = writer.reinterpreted
                for batch in _read_batches(s):
                    writer.write(_convert_batch(batch, out_schema, seps, s, rows))
                    rows += batch.num_rows
        except OSError as e:
            raise ConvertError(f"{s.path} -> {out}: {e}") from None
        files.append({"src": str(s.path), "dst": str(out), "rows": rows})
    return {
        "format": fmt,
        "rows": sum(f["rows"] for f in files),
        "columns": {f.name: str(f.type) for f in out_schema},
        "uint64_as_int64": reinterpreted,
        "files": files,
    }


# --------------------------------------------------------------------------- CLI


def _delimiter_arg(value: str) -> str:
    aliases = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|", "space": " "}
    return aliases.get(value.lower(), value)


def _list_columns_arg(value: str) -> dict[str, str | None]:
    """'a,b=;,c' -> {'a': None, 'b': ';', 'c': None} (None = --list-sep)."""
    out: dict[str, str | None] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        name, eq, sep = item.partition("=")
        out[name] = sep if eq else None
    return out


def _run_cli(args: argparse.Namespace) -> int:
    *srcs, dst = args.paths
    if not srcs:
        print("error: convert needs at least one SRC and a DST", file=sys.stderr)
        return 2
    fmt = args.format
    if fmt is None:
        suffix = pathlib.Path(dst).suffix.lower().lstrip(".")
        fmt = suffix if suffix in FORMATS else "parquet"
    list_columns = None
    if args.list_columns:
        list_columns = {k: (v if v is not None else args.list_sep)
                        for k, v in _list_columns_arg(args.list_columns).items()}
    try:
        stats = convert(srcs, dst, format=fmt, schema=args.schema, delimiter=args.delimiter,
                        header=args.header, list_columns=list_columns, list_sep=args.list_sep,
                        compression=args.compression, row_group_size=args.row_group_size)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        gc.collect()  # join pyarrow's reader threads now, not during interpreter teardown
    for f in stats["files"]:
        print(f"{f['src']} -> {f['dst']} ({f['rows']} rows)")
    print(f"{stats['rows']} rows, {len(stats['columns'])} columns:")
    for name, typ in stats["columns"].items():
        note = " (stored as int64 with the same bits: ORC has no unsigned types)" if name in stats["uint64_as_int64"] else ""
        print(f"  {name}: {typ}{note}")
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `recis-jax convert SRC [SRC...] DST`."""
    p = subparsers.add_parser(
        "convert", help="convert CSV/TSV files to ORC or Parquet",
        description="Convert CSV/TSV files to ORC or Parquet with typed columns. "
                    "One input: DST is the output file (or a directory); several: DST is a directory.",
    )
    p.add_argument("paths", nargs="+", metavar="SRC... DST",
                   help="input files/directories, then the output file or directory")
    p.add_argument("--format", default=None,
                   help="parquet or orc (default: from DST's extension, else parquet)")
    p.add_argument("--schema", default="infer",
                   help="'infer' (default), 'criteo', or a JSON file {column: type}")
    p.add_argument("--delimiter", type=_delimiter_arg, default=None,
                   help="field separator (tab, comma or a character; default: detected)")
    p.add_argument("--header", action=argparse.BooleanOptionalAction, default=None,
                   help="the first line is (--header) / is not (--no-header) a header (default: detected)")
    p.add_argument("--list-columns", default=None,
                   help="comma-separated columns to split into lists; NAME=SEP sets a column's separator")
    p.add_argument("--list-sep", default="|", help="list element separator (default '|')")
    p.add_argument("--compression", default="zstd",
                   help="zstd (default), snappy, lz4, gzip/zlib, brotli (Parquet), none")
    p.add_argument("--row-group-size", type=int, default=65536,
                   help="rows per Parquet row group / ORC stripe (default 65536)")
    p.set_defaults(func=_run_cli)
