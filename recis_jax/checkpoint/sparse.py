"""Sparse (hashtable) state as safetensors files: live rows only, loadable anywhere.

Per physical table, the *live* rows, sorted by (table index, id), split into files of at
most `rows_per_file` rows (one or more files per shard of a sharded table), written in
parallel by a thread pool. Each file holds (safetensors, read and written with the
`safetensors.numpy` API, so no pickle anywhere):

    ids        int64   [L]         the feature IDs
    tables     int32   [L]         logical table index (merged tables key on (table, id))
    embedding  float32 [L, dim]    or uint16 [L, dim]: bfloat16 rows as their bit
                                   pattern (safetensors.numpy has no bfloat16), so they
                                   round-trip exactly; the manifest records "bfloat16"
    slot.<name> float32 [L, ...]   every optimizer slot (same encoding rule)
    last_seen  int32   [L]         eviction clock stamp of the row's last lookup
    count      int64   [L]         occurrences (LFU)

plus, for a table with admission, `sketch.safetensors` (the count-min sketch, int32
[depth, width]). The manifest's `tables` part (what `save_sparse` returns) holds per
table: dim, dtype, live row count, the optimizer step counter, the slot names / shapes /
dtypes / initial values, the logical tables (`members`: name -> table index), the
shard count it was saved from, and the files with their sha256 and row counts.

Loading (`load_sparse`) reads only files inside the checkpoint directory (absolute
paths, `..` and symlinks out of it are refused), verifies every file's sha256, tensor
names, shapes and dtypes, and *re-inserts* the rows into freshly created tables: rows
0..L-1 of a new slab in (table, id) order, and an index built on the host as linear
probing would build it (`place_keys`: vectorised numpy, O(L log L); the device's
`rebuild_index` took ~10 s per million rows on a 2-core CPU). IDs, embedding values,
optimizer slots, last_seen and count are carried exactly; row numbers and index slots
are new (nothing in training depends on them: initial
values are f(id, seed) and reductions are ordered by key). So a checkpoint loads onto
any device count: into an `EmbeddingEngine` state, or into a `ShardedEmbeddingEngine`'s
stacked state with every row routed to its owner `owner_of(table, id, n)`.

Admission sketch: saved exactly and restored when the target table has admission with
the same sketch shape (a resumed run then admits exactly as an uninterrupted one);
otherwise (other shape, sharded target) it restarts at zeros, i.e. IDs that had not yet
reached `min_count` start counting again. It is approximate state by design.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy as stnp
from jax.sharding import NamedSharding, PartitionSpec as P

from recis_jax.embedding import capacity as cap_lib
from recis_jax.embedding import hashtable as ht
from recis_jax.embedding.engine import EmbeddingEngine, TableState

FORMAT = "recis-jax-sparse"
FORMAT_VERSION = 1
_ROW_TENSORS = {"ids": np.dtype(np.int64), "tables": np.dtype(np.int32), "last_seen": np.dtype(np.int32),
                "count": np.dtype(np.int64)}
_MAX_ROWS = np.iinfo(np.int32).max
_MAX_INDEX_DOUBLINGS = 4


class CheckpointError(Exception):
    """A checkpoint cannot be written or read; the message names the file or table."""


# -- small file helpers ------------------------------------------------------------------

def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Makes a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsyncs every file and directory under `path` (bottom-up), and `path` itself."""
    for root, dirs, files in os.walk(path, topdown=False):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                fsync_file(p)
        fsync_dir(root)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def write_json(path: str, obj: Any) -> None:
    """Writes JSON and fsyncs it (not the directory: the caller does)."""
    data = json.dumps(obj, indent=1, default=json_default, allow_nan=True).encode()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def json_default(x):
    """numpy / jax scalars and arrays in JSON metadata."""
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def safe_path(directory: str, rel: Any, what: str = "file") -> str:
    """The absolute path of `rel` inside `directory`; refuses anything that could read
    outside it: a non-string, an absolute path, a `..` component, or a symlink (at
    any level) that resolves outside the directory."""
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{directory}: {what} path {rel!r} in the manifest is not a relative path")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
        raise CheckpointError(f"{directory}: refusing absolute {what} path {rel!r} in the manifest")
    parts = re.split(r"[/\\]", rel)
    if any(p in ("..", "") for p in parts):
        raise CheckpointError(f"{directory}: refusing {what} path {rel!r} in the manifest (escapes the checkpoint)")
    root = os.path.realpath(directory)
    full = os.path.realpath(os.path.join(root, *parts))
    if os.path.commonpath([root, full]) != root:
        raise CheckpointError(f"{directory}: refusing {what} path {rel!r}: it resolves outside the checkpoint "
                              f"(symlink to {full})")
    return full


# -- dtype encoding ------------------------------------------------------------------------

def _dtype_name(dt) -> str:
    dt = np.dtype(dt)
    return "bfloat16" if dt == ml_dtypes.bfloat16 else dt.name


def encode(a: np.ndarray) -> np.ndarray:
    """A safetensors.numpy-storable, C-contiguous view: bfloat16 -> its uint16 bits."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a


def stored_dtype(name: str) -> np.dtype:
    """The dtype a tensor of logical dtype `name` is stored as."""
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)


def decode(a: np.ndarray, name: str) -> np.ndarray:
    return a.view(ml_dtypes.bfloat16) if name == "bfloat16" else a


# -- reading a table's rows out of the state -----------------------------------------------

def _engine_of(engine) -> EmbeddingEngine:
    """The EmbeddingEngine of a plain or sharded engine (duck-typed: `.engine`)."""
    return engine if isinstance(engine, EmbeddingEngine) else engine.engine


def is_sharded_state(ts: TableState) -> bool:
    """Stacked per-device state ([n, R] row arrays) vs a single table ([R])."""
    return ts.table.row_live.ndim == 2


def _host_shards(ts: TableState, slots: bool = True, local_only: bool = False) -> list[tuple[int | None, dict]]:
    """[(shard or None, {leaf: numpy})] of the leaves a save needs, per shard (only the
    shards this process holds with `local_only`, for multi-process saves)."""
    t = ts.table
    leaves = {"live": t.row_live, "ids": t.row_keys, "tables": t.row_tables, "embedding": t.embedding,
              "last_seen": t.last_seen, "count": t.count}
    if slots:
        leaves.update({f"slot.{k}": v for k, v in t.slots.items()})
    if not is_sharded_state(ts):
        return [(None, {k: np.asarray(v) for k, v in leaves.items()})]
    n = t.row_live.shape[0]
    per = {}
    for k, v in leaves.items():
        for s in v.addressable_shards:
            for i, row in zip(range(*s.index[0].indices(n)), np.asarray(s.data)):
                per.setdefault(i, {})[k] = row
    if not local_only and sorted(per) != list(range(n)):
        raise CheckpointError(f"this process holds shards {sorted(per)} of {n}: multi-process sparse saves are "
                              f"not supported yet (gather the table to one process first)")
    return [(i, per[i]) for i in sorted(per)]


def live_rows(h: dict) -> dict:
    """The live rows of one shard's host leaves, sorted by (table, id)."""
    idx = np.flatnonzero(h["live"])
    order = np.lexsort((h["ids"][idx], h["tables"][idx]))
    idx = idx[order]
    return {k: v[idx] for k, v in h.items() if k != "live"}


def table_rows(ts: TableState, slots: bool = True, local_only: bool = False) -> list[tuple[int | None, dict]]:
    """[(shard or None, live rows sorted by (table, id))] for a plain or stacked table:
    ids, tables, embedding, last_seen, count and (slots=True) slot.<name>."""
    return [(s, live_rows(h)) for s, h in _host_shards(ts, slots, local_only)]


def _compact(a: np.ndarray):
    """A slot's initial row for JSON: one number when every element is equal (the usual
    case), else the nested list (float64 holds every float32 / bfloat16 exactly)."""
    a = np.asarray(a).astype(np.float64)
    if a.size and np.all(a == a.flat[0]) and not np.isnan(a.flat[0]):
        return a.flat[0].item()
    return a.tolist()


def _members(eng: EmbeddingEngine, pname: str) -> dict[str, int]:
    return {(m.option.shared_name or m.feature): m.table_index for m in eng.members[pname]}


def table_dirs(names: Sequence[str]) -> dict[str, str]:
    """A distinct, file-system safe directory name per table name."""
    out, used = {}, set()
    for i, name in enumerate(names):
        d = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:100]
        if d in ("", ".", "..") or d.lower() in used:
            d = f"{d.strip('.')}_{i}"
        used.add(d.lower())
        out[name] = d
    return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> dict:
    """Writes, fsyncs and hashes one file; returns {sha256, bytes}."""
    stnp.save_file({k: encode(v) for k, v in tensors.items()}, path, metadata=metadata)
    fsync_file(path)
    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}


# -- save --------------------------------------------------------------------------------

def save_sparse(directory: str, tables: dict[str, TableState], engine, *, rows_per_file: int = 1 << 20,
                threads: int = 8, local_only: bool = False) -> dict:
    """Writes every table's live rows under `directory/sparse/` and returns the
    manifest's `tables` part ({name: entry}; see the module docstring).

    tables: an `EmbeddingEngine` state ({name: TableState}) or a `ShardedEmbeddingEngine`
      stacked state (leaves [n, ...]); engine: the (plain or sharded) engine that made it.
    Files are fsynced; their directories are not (the caller fsyncs the tree).
    """
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
    eng = _engine_of(engine)
    unknown = sorted(set(tables) - set(eng.physical))
    if unknown:
        raise CheckpointError(f"tables {unknown} are not tables of the engine (have {sorted(eng.physical)})")
    dirs = table_dirs(list(tables))
    entries: dict[str, dict] = {}
    with cf.ThreadPoolExecutor(max(1, threads)) as pool:
        jobs = []
        for name, ts in tables.items():
            cfg = eng.physical[name]
            sharded = is_sharded_state(ts)
            tdir = f"sparse/{dirs[name]}"
            os.makedirs(os.path.join(directory, tdir), exist_ok=True)
            t = ts.table
            slot_defaults = {k: np.asarray(v.addressable_shards[0].data)[0] if sharded else np.asarray(v)
                             for k, v in t.slot_defaults.items()}
            steps = np.concatenate([np.asarray(sh.data).reshape(-1) for sh in t.step.addressable_shards]) \
                if sharded else np.asarray(t.step).reshape(-1)
            entry = {
                "dim": cfg.dim, "dtype": cfg.dtype,
                "rows": 0, "optimizer_step": int(steps.max()),
                "capacity": int(t.capacity if not sharded else t.row_live.shape[1]),
                "num_shards": int(t.row_live.shape[0]) if sharded else None,
                "members": _members(eng, name),
                "slots": {k: {"shape": list(v.shape[2 if sharded else 1:]), "dtype": _dtype_name(v.dtype),
                              "default": _compact(slot_defaults[k]) if k in slot_defaults else None}
                          for k, v in t.slots.items()},
                "sketch": None, "files": [],
            }
            entries[name] = entry
            meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "table": name, "dim": str(cfg.dim),
                    "embedding_dtype": cfg.dtype}
            for shard, rows in table_rows(ts, local_only=local_only):
                n_rows = len(rows["ids"])
                entry["rows"] += n_rows
                for part, lo in enumerate(range(0, n_rows, rows_per_file)):
                    fname = (f"part-{part:05d}.safetensors" if shard is None
                             else f"shard-{shard:05d}-part-{part:05d}.safetensors")
                    rel = f"{tdir}/{fname}"
                    chunk = {k: v[lo:lo + rows_per_file] for k, v in rows.items()}
                    fmeta = dict(meta, shard=str(shard if shard is not None else 0))
                    f = {"path": rel, "rows": len(chunk["ids"]), "shard": shard}
                    entry["files"].append(f)
                    jobs.append((f, pool.submit(write_safetensors, os.path.join(directory, rel), chunk, fmeta)))
            if not sharded and ts.sketch.size:
                rel = f"{tdir}/sketch.safetensors"
                sk = np.asarray(ts.sketch)
                f = {"path": rel, "shape": list(sk.shape)}
                entry["sketch"] = f
                jobs.append((f, pool.submit(write_safetensors, os.path.join(directory, rel), {"sketch": sk},
                                            dict(meta, kind="admission_sketch"))))
        for f, fut in jobs:
            try:
                f.update(fut.result())
            except OSError as e:
                raise CheckpointError(f"writing {f['path']} failed: {e}") from e
    return entries


# -- load --------------------------------------------------------------------------------

def read_verified(directory: str, f: dict, what: str = "file") -> dict[str, np.ndarray]:
    """Reads one safetensors file listed in a manifest: path confined to `directory`,
    sha256 checked, no pickle. Returns its raw (still encoded) tensors."""
    rel = f.get("path") if isinstance(f, dict) else None
    path = safe_path(directory, rel, what)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} listed in the manifest is missing") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    want = f.get("sha256")
    got = hashlib.sha256(data).hexdigest()
    if want != got:
        raise CheckpointError(f"{path}: sha256 mismatch (manifest {want}, file {got}; {len(data)} bytes): "
                              f"the file is corrupt or truncated")
    try:
        return stnp.load(data)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a valid safetensors file: {e}") from e


def _check_tensor(path, name, a, dtype, shape):
    if a is None:
        raise CheckpointError(f"{path}: tensor {name!r} is missing")
    if a.dtype != dtype or tuple(a.shape) != tuple(shape):
        raise CheckpointError(f"{path}: tensor {name!r} is {a.dtype}{list(a.shape)}, "
                              f"the manifest says {dtype}{list(shape)}")


def _read_table(directory: str, name: str, entry: dict, pool: cf.Executor) -> dict:
    """All of a table's rows from its files, verified, decoded, concatenated."""
    dim, dtype = int(entry["dim"]), entry["dtype"]
    slots = entry.get("slots") or {}
    expect = dict(_ROW_TENSORS, embedding=stored_dtype(dtype))
    expect.update({f"slot.{k}": stored_dtype(s["dtype"]) for k, s in slots.items()})
    files = entry.get("files") or []

    def one(f):
        path = safe_path(directory, f.get("path"))
        raw = read_verified(directory, f)
        n = int(f.get("rows", -1))
        extra = sorted(set(raw) - set(expect))
        if extra:
            raise CheckpointError(f"{path}: unexpected tensors {extra} (table {name!r})")
        for k, dt in expect.items():
            if k == "embedding":
                shape = (n, dim)
            elif k.startswith("slot."):
                shape = (n, *slots[k[5:]]["shape"])
            else:
                shape = (n,)
            _check_tensor(path, k, raw.get(k), dt, shape)
        out = {k: v for k, v in raw.items()}
        out["embedding"] = decode(out["embedding"], dtype)
        for k, s in slots.items():
            out[f"slot.{k}"] = decode(out[f"slot.{k}"], s["dtype"])
        return out

    parts = list(pool.map(one, files))
    total = sum(len(p["ids"]) for p in parts)
    if total != int(entry.get("rows", -1)):
        raise CheckpointError(f"{directory}: table {name!r} files hold {total} rows, the manifest says "
                              f"{entry.get('rows')}")
    if not parts:
        empty = {k: np.zeros((0,), dt) for k, dt in _ROW_TENSORS.items()}
        empty["embedding"] = decode(np.zeros((0, dim), stored_dtype(dtype)), dtype)
        for k, s in slots.items():
            empty[f"slot.{k}"] = decode(np.zeros((0, *s["shape"]), stored_dtype(s["dtype"])), s["dtype"])
        return empty
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _remap_tables(name: str, entry: dict, eng: EmbeddingEngine, rows: dict) -> dict:
    """Checkpoint table indices -> the engine's, by logical table name."""
    saved = entry.get("members") or {}
    now = _members(eng, name)
    if saved == now or not saved:
        return rows
    missing = sorted(set(saved) - set(now))
    if missing:
        raise CheckpointError(f"table {name!r}: logical tables {missing} of the checkpoint are not in the engine's "
                              f"table (which holds {sorted(now)})")
    lut = np.full(max(saved.values()) + 1, -1, np.int32)
    for k, i in saved.items():
        lut[i] = now[k]
    t = rows["tables"]
    if len(t) and (t.min() < 0 or t.max() >= len(lut) or (lut[t] < 0).any()):
        raise CheckpointError(f"table {name!r}: rows carry table indices outside the manifest's members")
    return dict(rows, tables=lut[t] if len(t) else t)


def _order_and_check(name: str, rows: dict) -> dict:
    order = np.lexsort((rows["ids"], rows["tables"]))
    rows = {k: v[order] for k, v in rows.items()}
    t, i = rows["tables"], rows["ids"]
    if len(i) > 1 and np.any((t[1:] == t[:-1]) & (i[1:] == i[:-1])):
        raise CheckpointError(f"table {name!r}: the checkpoint holds the same (table, id) twice")
    return rows


def _slot_plan(name, entry, cfg, trainable, optimizer, strict_slots) -> dict[str, tuple[tuple, np.ndarray]]:
    """{slot: (per-row shape, default row float32)} of the restored table, and checks
    the checkpoint's slots against the optimizer's."""
    saved = entry.get("slots") or {}
    if optimizer is None:
        plan = {}
        for k, s in saved.items():
            if s.get("default") is None:
                raise CheckpointError(f"table {name!r}: slot {k!r} has no initial value in the manifest; "
                                      f"pass the optimizer to restore it")
            d = np.asarray(s["default"], np.float64).astype(_np_dtype(s["dtype"]))
            if d.ndim == 0:
                d = np.full(tuple(s["shape"]), d)
            if d.shape != tuple(s["shape"]):
                raise CheckpointError(f"table {name!r}: slot {k!r} initial value has shape {list(d.shape)}, "
                                      f"the manifest says {s['shape']}")
            plan[k] = (tuple(s["shape"]), d)
        return plan
    dt = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    init = {k: np.asarray(v)[0] for k, v in optimizer.init(1, cfg.dim, dt).items()} if trainable else {}
    if strict_slots and set(init) != set(saved):
        raise CheckpointError(f"table {name!r}: the checkpoint has optimizer slots {sorted(saved)}, the optimizer "
                              f"{sorted(init)} (pass strict_slots=False to reset missing ones and drop extras)")
    plan = {}
    for k, d in init.items():
        if k in saved and tuple(saved[k]["shape"]) != d.shape:
            raise CheckpointError(f"table {name!r}: slot {k!r} is {saved[k]['shape']} per row in the checkpoint, "
                                  f"the optimizer's is {list(d.shape)}")
        plan[k] = (d.shape, d)
    return plan


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def home_slots(tables: np.ndarray, keys: np.ndarray, num_slots: int) -> np.ndarray:
    """`hashtable.home_slot` in numpy (uint64 arithmetic wraps the same way)."""
    x = keys.astype(np.int64).view(np.uint64) ^ (tables.astype(np.uint64) * _GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x & np.uint64(num_slots - 1)).astype(np.int64)


def place_keys(tables: np.ndarray, keys: np.ndarray, num_slots: int, max_probes: int) -> np.ndarray | None:
    """Index slots for distinct keys, as linear probing places them. Any insertion order
    gives a valid table; inserting in order of home slot can be vectorised: every key
    sits within `max_probes` slots of its home and every slot in between is taken,
    which is what `hashtable.find` relies on. None if some probe distance would reach
    max_probes (the caller doubles the slots)."""
    n, s = len(keys), num_slots
    if n == 0:
        return np.zeros(0, np.int64)
    home = home_slots(tables, keys, s)
    order = np.argsort(home, kind="stable")
    h = home[order]
    i = np.arange(n, dtype=np.int64)
    # pos_i = max(h_i, pos_{i-1} + 1) on an unwrapped line, as a running max.
    pos = i + np.maximum.accumulate(h - i)
    wrapped = pos >= s
    if wrapped.any():
        # A run past the end continues at slot 0: the first free slots, in order.
        taken = np.zeros(s, bool)
        taken[pos[~wrapped]] = True
        pos[wrapped] = np.flatnonzero(~taken)[:int(wrapped.sum())]
    if ((pos - h) % s).max() >= max_probes:
        return None
    out = np.empty(n, np.int64)
    out[order] = pos
    return out


def _host_table(cfg: ht.TableConfig, rows: dict, r: int, plan: dict, step: int, num_slots: int
                ) -> ht.HashTableState | None:
    """A numpy HashTableState of `r` slab rows and `num_slots` index slots holding
    `rows` in rows 0..L-1 (None if the index needs more slots, see `place_keys`)."""
    n = len(rows["ids"])
    if n > r:
        raise CheckpointError(f"table {cfg.name!r}: {n} rows do not fit {r} slab rows")
    placed = place_keys(rows["tables"], rows["ids"], num_slots, cfg.max_probes)
    if placed is None:
        return None
    emb_dt = _np_dtype(cfg.dtype)

    def slab(shape, dtype, fill=0):
        a = np.empty((r, *shape), dtype)
        a[n:] = fill
        return a

    emb = slab((cfg.dim,), emb_dt)
    emb[:n] = rows["embedding"].astype(emb_dt)
    slots, defaults = {}, {}
    for k, (shape, d) in plan.items():
        a = slab(shape, d.dtype, d)
        a[:n] = rows[f"slot.{k}"].astype(a.dtype) if f"slot.{k}" in rows else d
        slots[k], defaults[k] = a, np.array(d, a.dtype)
    keys, tabs = slab((), np.int64), slab((), np.int32)
    keys[:n], tabs[:n] = rows["ids"], rows["tables"]
    live = np.zeros(r, bool)
    live[:n] = True
    last_seen, count = slab((), np.int32), slab((), np.int64)
    last_seen[:n], count[:n] = rows["last_seen"], rows["count"]
    row_slot = slab((), np.int32)
    row_slot[:n] = placed
    slot_keys, slot_tables = np.zeros(num_slots, np.int64), np.zeros(num_slots, np.int32)
    slot_rows, slot_state = np.zeros(num_slots, np.int32), np.zeros(num_slots, np.int8)
    slot_keys[placed], slot_tables[placed] = rows["ids"], rows["tables"]
    slot_rows[placed], slot_state[placed] = np.arange(n, dtype=np.int32), ht.LIVE
    # Free rows n, n+1, ... are popped first (the top of the stack is free_rows[num_free-1]),
    # as in a fresh table that handed out rows 0..n-1.
    free = np.concatenate([np.arange(r - 1, n - 1, -1, dtype=np.int32), np.arange(n - 1, -1, -1, dtype=np.int32)])
    return ht.HashTableState(
        slot_keys=slot_keys, slot_tables=slot_tables, slot_rows=slot_rows, slot_state=slot_state,
        embedding=emb, slots=slots, slot_defaults=defaults, row_keys=keys, row_tables=tabs,
        row_slot=row_slot, row_live=live, last_seen=last_seen, count=count, free_rows=free,
        num_free=np.asarray(r - n, np.int32), num_tombstones=np.asarray(0, np.int32),
        step=np.asarray(step, np.int32))


def _host_tables(cfg, per_shard: list[dict], r: int, plan: dict, step: int) -> list[ht.HashTableState]:
    """`_host_table` for each shard, all with one index size: the power of two >= 2R
    (load <= 0.5 when full, as `hashtable.create`), doubled while a probe chain would
    exceed max_probes."""
    s = cap_lib.next_pow2(2 * r)
    for _ in range(_MAX_INDEX_DOUBLINGS + 1):
        hosts = [_host_table(cfg, p, r, plan, step, s) for p in per_shard]
        if all(h is not None for h in hosts):
            return hosts
        s *= 2
    raise CheckpointError(f"table {cfg.name!r}: could not build the index within max_probes={cfg.max_probes} "
                          f"even with {s // 2} slots")


def _resolve_rows(name, live, base, num_rows, max_rows):
    """Slab rows for a table holding `live` rows: the engine's (or the override), grown
    to the power of two >= live when needed, within `max_rows`."""
    r = num_rows.get(name) if isinstance(num_rows, dict) else num_rows
    r = int(r) if r is not None else int(base)
    if live > r:
        r = cap_lib.next_pow2(live)
    budget = max_rows.get(name) if isinstance(max_rows, dict) else max_rows
    limit = min(_MAX_ROWS, int(budget)) if budget is not None else _MAX_ROWS
    if live > limit:
        raise CheckpointError(f"table {name!r}: the checkpoint holds {live} live rows (on one shard), more than "
                              f"max_rows={limit} allows")
    return min(r, limit)


def load_sparse(directory: str, manifest: dict, engine, optimizer=None, *, tables: Sequence[str] | None = None,
                sharded=None, strict_slots: bool = True, num_rows: int | dict | None = None,
                max_rows: int | dict | None = None, missing: str = "error", threads: int = 8
                ) -> dict[str, TableState]:
    """Restores tables from a checkpoint directory (manifest already read).

    Args:
      engine: the `EmbeddingEngine` to load into (its table configs must agree on dim
        and dtype; logical tables are matched by name, so merging may differ).
        A `ShardedEmbeddingEngine` here means `sharded=engine`.
      optimizer: the sparse optimizer training will use; its slots must match the
        checkpoint's (`strict_slots=False`: missing slots start at their initial value,
        extra ones are dropped). None: the slots are restored as saved.
      tables: physical table names to load (default: all of the engine's tables).
      sharded: a `ShardedEmbeddingEngine`: returns its stacked state (leaves [n, ...]
        on its mesh), each row on its owner `owner_of(table, id, n)`.
      num_rows: slab rows per table (int or {table: int}; sharded: per shard); default
        the engine's (`engine.num_rows`, `sharded.rows_per_shard`). A table with more
        live rows grows to the power of two >= them (a sharded engine's
        `rows_per_shard` is updated to the grown size).
      max_rows: a budget in rows (int or {table: int}): more live rows -> CheckpointError.
      missing: "error" (an engine table not in the checkpoint is an error) or "init"
        (it starts empty, as `engine.init` makes it).
    Returns {table: TableState} for the loaded tables.
    """
    if missing not in ("error", "init"):
        raise ValueError(f"missing must be 'error' or 'init', got {missing!r}")
    if sharded is None and not isinstance(engine, EmbeddingEngine):
        sharded = engine
    eng = _engine_of(engine if sharded is None else sharded)
    saved = manifest.get("tables")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{directory}: manifest has no tables")
    names = list(eng.physical) if tables is None else list(tables)
    bad = [t for t in names if t not in eng.physical]
    if bad:
        raise CheckpointError(f"tables {bad} are not tables of the engine (have {sorted(eng.physical)})")
    absent = [t for t in names if t not in saved]
    if absent and (tables is not None or missing != "init"):
        raise CheckpointError(f"{directory}: tables {absent} are not in the checkpoint (it has {sorted(saved)})")
    out = {}
    n = sharded.n if sharded is not None else None
    with cf.ThreadPoolExecutor(max(1, threads)) as pool:
        for name in names:
            cfg = eng.physical[name]
            trainable = eng._trainable[name]
            if name not in saved:
                out[name] = _fresh(eng, sharded, name, optimizer)
                continue
            entry = saved[name]
            if int(entry.get("dim", -1)) != cfg.dim or entry.get("dtype") != cfg.dtype:
                raise CheckpointError(f"table {name!r}: the checkpoint's is dim {entry.get('dim')} "
                                      f"{entry.get('dtype')}, the engine's dim {cfg.dim} {cfg.dtype}")
            plan = _slot_plan(name, entry, cfg, trainable, optimizer, strict_slots)
            rows = _order_and_check(name, _remap_tables(name, entry, eng, _read_table(directory, name, entry, pool)))
            step = int(entry.get("optimizer_step", 0))
            if sharded is None:
                r = _resolve_rows(name, len(rows["ids"]), eng.num_rows[name], num_rows, max_rows)
                (host,) = _host_tables(cfg, [rows], r, plan, step)
                out[name] = TableState(jax.device_put(host), _sketch(directory, name, entry, eng))
            else:
                own = owner_of_host(rows["tables"], rows["ids"], n)
                order = np.argsort(own, kind="stable")  # stable: (table, id) order within a shard
                cut = np.searchsorted(own[order], np.arange(n + 1))
                per = [{k: v[order[cut[i]:cut[i + 1]]] for k, v in rows.items()} for i in range(n)]
                most = max(len(p["ids"]) for p in per)
                r = _resolve_rows(name, most, sharded.rows_per_shard[name], num_rows, max_rows)
                sharded.rows_per_shard[name] = max(sharded.rows_per_shard[name], r)
                stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *_host_tables(cfg, per, r, plan, step))
                out[name] = TableState(_put(sharded, stacked), _put(sharded, np.zeros((n, 0, 0), np.int32)))
    return out


def owner_of_host(tables: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    from recis_jax.sharding.mesh import owner_of
    if len(ids) == 0:
        return np.zeros(0, np.int32)
    return np.asarray(owner_of(jnp.asarray(tables, jnp.int32), jnp.asarray(ids, jnp.int64), n))


def _put(sharded, x):
    """Host [n, ...] arrays -> global arrays sharded over the mesh; each process
    places the shards of its own devices (every process built the same x)."""
    from recis_jax.sharding.mesh import AXIS
    sharding = NamedSharding(sharded.mesh, P(AXIS))
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda idx, a=a: np.asarray(a)[idx]), x)


def _sketch(directory, name, entry, eng):
    adm = eng._admission[name]
    shape = (adm.depth, adm.width) if adm else (0, 0)
    sk = entry.get("sketch")
    if adm is not None and sk and tuple(sk.get("shape", ())) == shape:
        raw = read_verified(directory, sk, "sketch file")
        a = raw.get("sketch")
        _check_tensor(safe_path(directory, sk["path"]), "sketch", a, np.dtype(np.int32), shape)
        return jnp.asarray(a)
    return jnp.zeros(shape, jnp.int32)


def _fresh(eng, sharded, name, optimizer):
    """An empty table, as `engine.init` / `sharded.init` makes it."""
    if sharded is not None:
        return sharded.init(optimizer)[name]
    cfg = eng.physical[name]
    dt = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    slots = optimizer.init(eng.num_rows[name], cfg.dim, dt) if optimizer is not None and eng._trainable[name] else None
    adm = eng._admission[name]
    sketch = jnp.zeros((adm.depth, adm.width) if adm else (0, 0), jnp.int32)
    return TableState(ht.create(cfg, eng.num_rows[name], slot_init=slots), sketch)
