"""The columnar reader (RecIS's ColumnIO): ORC/Parquet files -> host batches.

    reader = Reader(paths, [FixedLenFeature("i1"), VarLenFeature("c1")], batch_size=4096)
    for batch in reader:            # Batch(features, mask, state)
        ...                         # batch.features["c1"] is a Ragged, ["i1"] [B, 1] float32

Work is split into *units* (ORC stripes / Parquet row groups). Worker w of W (default:
jax.process_index() of jax.process_count()) reads whole files round-robin when there
are at least W files, else units round-robin. Every worker reads every footer, so all
agree on the steps per epoch without communicating: the maximum over workers of
ceil(rows / batch_size); a worker that runs out first yields fully masked batches,
so no process waits alone in a collective and no row is skipped or repeated.
(`drop_remainder=True` instead yields the minimum over workers of full batches.)

Order is deterministic: sorted paths; with `shuffle`, the unit order of each epoch and
the rows inside each unit are permuted by generators seeded from (seed, epoch, unit).
Each batch carries the reader position *after* it (`ReaderState`); saving the state of
the last batch the trainer consumed and passing it to `batches(state)` continues with
exactly the next row, also mid-unit, with prefetch and shuffle on.

Reading and decoding run on a thread pool (pyarrow and the numpy hashing release the
GIL) with bounded prefetch of units and batches, so IO overlaps the training step.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

from recis_jax.io.columns import Feature, FixedLenFeature, check_schema, convert_column, source_columns
from recis_jax.io.files import DataError, FileInfo, file_info, list_files, read_unit
from recis_jax.ragged import Ragged, capacity_bucket, concat_rows, slice_rows


@dataclasses.dataclass(frozen=True)
class ReaderState:
    """A reader position: `unit` indexes this worker's unit order in `epoch`, `row` rows
    of that unit are consumed, `step` batches of the epoch are yielded. JSON-friendly
    through `to_dict`/`from_dict`."""

    epoch: int = 0
    unit: int = 0
    row: int = 0
    step: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ReaderState":
        return cls(**{k: int(d[k]) for k in ("epoch", "unit", "row", "step")})


@dataclasses.dataclass
class Batch:
    """One host batch.

    features: name -> float32/int64 [B, dim] array or Ragged (values padded to a
      capacity bucket); mask: [B] bool, False for padding rows (a partial last batch
      or a filler batch); state: the reader position after this batch.
    """

    features: dict[str, np.ndarray | Ragged]
    mask: np.ndarray
    state: ReaderState

    @property
    def num_rows(self) -> int:
        """Real (unmasked) rows."""
        return int(self.mask.sum())


@dataclasses.dataclass
class _Unit:
    """A decoded unit: its position in the epoch order and its converted columns."""

    pos: int
    num_rows: int
    columns: dict[str, np.ndarray | Ragged]


class Reader:
    """Reads ORC/Parquet files into fixed-size batches. See the module docstring.

    Args:
      paths: files, directories or globs (expanded and sorted).
      features: FixedLenFeature / VarLenFeature specs, output names must be unique.
      batch_size: rows per batch (B).
      format: "orc" | "parquet"; None infers from the suffix or magic bytes.
      shard_index, shard_count: this worker and the number of workers; default
        jax.process_index() and jax.process_count().
      shuffle, seed: permute unit order per epoch and rows inside each unit.
      num_epochs: epochs to read; None reads forever.
      drop_remainder: drop the rows that do not fill a batch in every worker's epoch.
      num_threads: decoding threads; prefetch: batches buffered ahead.
      min_capacity: smallest Ragged values capacity (default batch_size).
    Raises DataError (naming the file and column) for missing/unreadable files,
    absent columns and columns of the wrong type, before any data is read.
    """

    def __init__(
        self,
        paths: str | Sequence[str],
        features: Sequence[Feature],
        batch_size: int,
        *,
        format: str | None = None,
        shard_index: int | None = None,
        shard_count: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        num_epochs: int | None = 1,
        drop_remainder: bool = False,
        num_threads: int = 4,
        prefetch: int = 4,
        min_capacity: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        names = [f.name for f in features]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"feature names must be unique and non-empty, got {names}")
        if shard_index is None or shard_count is None:
            import jax

            shard_index, shard_count = jax.process_index(), jax.process_count()
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
        self.features = list(features)
        self.batch_size = batch_size
        self.shard_index, self.shard_count = shard_index, shard_count
        self.shuffle, self.seed = shuffle, seed
        self.num_epochs, self.drop_remainder = num_epochs, drop_remainder
        self.num_threads, self.prefetch = max(1, num_threads), max(1, prefetch)
        self.min_capacity = min_capacity or batch_size
        self._columns = source_columns(self.features)

        paths_ = list_files(paths, format)
        with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
            self.files: list[FileInfo] = list(pool.map(lambda p: file_info(p, format), paths_))
        for info in self.files:
            check_schema(self.features, info.schema, info.path)
        # Units of all workers; empty files (0 rows) contribute none.
        nonempty = [i for i, info in enumerate(self.files) if info.num_rows > 0]
        all_units = [(fi, u) for fi in nonempty for u in range(len(self.files[fi].unit_rows))]
        if len(nonempty) >= shard_count:
            self._by_worker = [[(fi, u) for fi, u in all_units if nonempty.index(fi) % shard_count == w]
                               for w in range(shard_count)]
        else:
            self._by_worker = [all_units[w::shard_count] for w in range(shard_count)]
        self.units: list[tuple[int, int]] = self._by_worker[shard_index]
        schema = self.files[0].schema if self.files else None
        self._ragged_rank = {f.name: max(1, _list_depth(schema.field(f.source).type)) if schema else 1
                             for f in self.features}
        self._stats = {"rows": 0, "decoded_bytes": 0, "file_bytes": 0.0, "seconds": 0.0}
        self._lock = threading.Lock()

    # -- planning -------------------------------------------------------------------
    def worker_rows(self) -> list[int]:
        """Rows per epoch of every worker (from footers)."""
        return [sum(self.files[fi].unit_rows[u] for fi, u in units) for units in self._by_worker]

    def steps_per_epoch(self) -> int:
        """Batches per epoch, the same on every worker (see the module docstring)."""
        rows = self.worker_rows()
        if self.drop_remainder:
            return min(r // self.batch_size for r in rows)
        return max(math.ceil(r / self.batch_size) for r in rows)

    @property
    def num_rows(self) -> int:
        """Rows per epoch of this worker."""
        return self.worker_rows()[self.shard_index]

    def _unit_order(self, epoch: int) -> list[tuple[int, int]]:
        if not self.shuffle:
            return list(self.units)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        return [self.units[i] for i in perm]

    # -- reading --------------------------------------------------------------------
    def _load(self, epoch: int, pos: int, fi: int, u: int) -> _Unit:
        t0 = time.perf_counter()
        info = self.files[fi]
        table = read_unit(info, u, self._columns)
        if self.shuffle:
            # Seeded by the unit's global identity, so a resumed run permutes identically.
            perm = np.random.default_rng([self.seed, epoch, fi, u]).permutation(table.num_rows)
            table = table.take(perm)
            row_base = 0  # rows no longer in file order; messages then name unit rows
        else:
            row_base = sum(info.unit_rows[:u])
        cols = {f.name: convert_column(f, table, info.path, row_base) for f in self.features}
        with self._lock:
            self._stats["rows"] += table.num_rows
            self._stats["decoded_bytes"] += table.nbytes
            self._stats["file_bytes"] += info.nbytes * info.unit_rows[u] / max(info.num_rows, 1)
            self._stats["seconds"] += time.perf_counter() - t0
        return _Unit(pos, table.num_rows, cols)

    def _epoch_units(self, epoch: int, start_unit: int, pool, stop: threading.Event) -> Iterator[_Unit]:
        """Decoded units of an epoch from `start_unit`, in order, `prefetch` in flight."""
        order = self._unit_order(epoch)
        pending: list[concurrent.futures.Future] = []
        nxt = start_unit
        while (nxt < len(order) or pending) and not stop.is_set():
            while nxt < len(order) and len(pending) < self.prefetch + self.num_threads:
                fi, u = order[nxt]
                pending.append(pool.submit(self._load, epoch, nxt, fi, u))
                nxt += 1
            yield pending.pop(0).result()

    def _epoch_batches(self, state: ReaderState, pool, stop: threading.Event) -> Iterator[Batch]:
        epoch, steps, b = state.epoch, self.steps_per_epoch(), self.batch_size
        step = state.step
        buf: list[tuple[_Unit, int]] = []  # (unit, first unconsumed row)
        buffered = 0
        skip = state.row
        for unit in self._epoch_units(epoch, state.unit, pool, stop):
            buf.append((unit, skip))
            buffered += unit.num_rows - skip
            skip = 0
            while buffered >= b and step < steps:
                batch, buf, buffered = self._take(buf, buffered, b)
                step += 1
                last_unit, row = buf[0] if buf else (unit, unit.num_rows)
                batch.state = self._position(epoch, last_unit, row, step)
                yield batch
            if step >= steps:
                break
        if stop.is_set():
            return
        if buffered and step < steps and not self.drop_remainder:
            batch, buf, buffered = self._take(buf, buffered, buffered)
            step += 1
            yield self._pad_batch(batch, ReaderState(epoch, len(self.units), 0, step))
        while step < steps:  # filler batches: this worker ran out before the others
            step += 1
            yield self._pad_batch(Batch({}, np.zeros(0, bool), None), ReaderState(epoch, len(self.units), 0, step))

    def _position(self, epoch: int, unit: _Unit, row: int, step: int) -> ReaderState:
        if row >= unit.num_rows:
            return ReaderState(epoch, unit.pos + 1, 0, step)
        return ReaderState(epoch, unit.pos, row, step)

    def _take(self, buf, buffered, n):
        """Removes the first n buffered rows as a batch (state filled in by the caller)."""
        parts, rest, need = [], [], n
        for unit, start in buf:
            if need == 0:
                rest.append((unit, start))
                continue
            k = min(need, unit.num_rows - start)
            parts.append((unit, start, start + k))
            need -= k
            if start + k < unit.num_rows:
                rest.append((unit, start + k))
        feats = {}
        for f in self.features:
            pieces = [_slice(u.columns[f.name], s, e) for u, s, e in parts]
            if isinstance(f, FixedLenFeature):
                feats[f.name] = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
            else:
                feats[f.name] = self._pad_capacity(concat_rows(pieces))
        return Batch(feats, np.ones(n, bool), None), rest, buffered - n

    def _pad_capacity(self, r: Ragged) -> Ragged:
        if isinstance(r.values, Ragged):
            inner = r.values
            inner = inner.pad(capacity_bucket(int(inner.row_splits[-1]), self.min_capacity))
            inner = inner.pad(capacity_bucket(inner.nrows, self.min_capacity), axis="rows")
            return Ragged(inner, r.row_splits.astype(inner.row_splits.dtype))
        return r.pad(capacity_bucket(int(r.row_splits[-1]), self.min_capacity))

    def _pad_batch(self, batch: Batch, state: ReaderState) -> Batch:
        """Pads a batch of n <= B rows to B rows: dense rows get the default, ragged rows
        are empty, and the mask marks them False."""
        n, b = len(batch.mask), self.batch_size
        feats = {}
        for f in self.features:
            col = batch.features.get(f.name)
            if isinstance(f, FixedLenFeature):
                dt = np.float32 if f.dtype == "float32" else np.int64
                pad = np.full((b - n, f.dim), f.default, dt)
                feats[f.name] = pad if col is None else np.concatenate([col, pad])
            else:
                col = self._empty_ragged(f) if col is None else col
                feats[f.name] = self._pad_capacity(col.pad(b, axis="rows"))
        return Batch(feats, np.concatenate([batch.mask, np.zeros(b - n, bool)]), state)

    def _empty_ragged(self, f) -> Ragged:
        dt = {"int64": np.int64, "float32": np.float32, "bytes": object}[f.dtype]
        empty = Ragged(np.zeros(0, dt), np.zeros(1, np.int32))
        if self._ragged_rank[f.name] == 2:
            return Ragged(Ragged(np.zeros(0, dt), np.zeros(1, np.int32)), np.zeros(1, np.int32))
        return empty

    def batches(self, state: ReaderState | None = None) -> Iterator[Batch]:
        """Yields batches from `state` (default: the start) to the last epoch.

        Each batch's `.state` resumes right after it. Closing the generator early stops
        the background threads.
        """
        state = state or ReaderState()
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def produce():
            try:
                with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
                    st = state
                    while self.num_epochs is None or st.epoch < self.num_epochs:
                        for batch in self._epoch_batches(st, pool, stop):
                            _put(q, batch, stop)
                        if stop.is_set():
                            return
                        st = ReaderState(st.epoch + 1)
                _put(q, done, stop)
            except BaseException as e:  # handed to the consumer, raised there
                _put(q, e, stop)

        thread = threading.Thread(target=produce, daemon=True, name="recis-reader")
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(0.01)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def stats(self) -> dict:
        """Decode throughput so far: rows, rows/s and MB/s (decoded arrow bytes and
        on-disk bytes) per decoding thread-second, plus totals."""
        with self._lock:
            s = dict(self._stats)
        secs = max(s["seconds"], 1e-9)
        s["rows_per_sec_per_thread"] = s["rows"] / secs
        s["decoded_mb_per_sec_per_thread"] = s["decoded_bytes"] / secs / 1e6
        s["file_mb_per_sec_per_thread"] = s["file_bytes"] / secs / 1e6
        return s


def _list_depth(t) -> int:
    import pyarrow as pa

    depth = 0
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        t, depth = t.value_type, depth + 1
    return depth


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _slice(col, start: int, stop: int):
    if isinstance(col, Ragged):
        return slice_rows(col, start, stop)
    return col[start:stop]




__all__ = ["Batch", "DataError", "Reader", "ReaderState"]
