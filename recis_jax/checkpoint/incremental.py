"""Incremental export of embedding rows for online serving.

    exp = IncrementalExporter("/serving/model")
    exp.export(step, tables=tables, engine=engine)              # first: a full export
    ...train...
    exp.export(step, tables=tables, engine=engine)              # then: deltas
    rows = materialize(list_exports_paths)                       # serving side: full + deltas

An export is a directory (written atomically: a temporary sibling, renamed) holding,
per physical table `tables/<table>/`:

    rows-part-00000.safetensors   the exported rows: ids int64, tables int32, embedding
                                  (float32, or bfloat16 as uint16 bits), last_seen int32,
                                  count int64 (+ slot.<name> with include_slots)
    tombstones.safetensors        ids, tables of keys to delete (deltas only)
    live_keys.safetensors         ids, tables of every live key now: with the watermark,
                                  what the *next* delta is computed from

and `export.json` (written last): format, kind ("full" | "delta"), step, base (the
previous export's step and directory name), and per table dim, dtype, members (logical
table name -> index), watermark, live row count and the files with sha256.

A full export writes every live row. A delta against the previous export P writes

  * changed rows: live rows whose key was not live at P (new, or evicted and re-admitted)
    or whose `last_seen` > P's watermark for the table. A row is changed iff a training
    lookup touched it since P: every lookup stamps `last_seen` with the current clock
    (the global step, or the table's step counter), which is later than any stamp made
    before P, and nothing else changes a row's values.
  * tombstones: keys live at P and not live now (evicted).

The watermark is the largest `last_seen` among the live rows at export time (at least
the previous watermark); with the global-step clock it is <= the export step, and
"last_seen > watermark" selects exactly the rows with "last_seen > last export step".
Replaying a full export and its deltas in order (upsert rows, delete tombstones) gives
the live rows of the latest export exactly (`materialize`).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import secrets
import shutil
from collections.abc import Sequence

import numpy as np

from recis_jax.checkpoint.sparse import (CheckpointError, _engine_of, _members, decode, fsync_dir, fsync_tree,
                                        read_verified, safe_path, stored_dtype, table_dirs, table_rows,
                                        write_json, write_safetensors)

EXPORT_JSON = "export.json"
FORMAT = "recis-jax-export"
FORMAT_VERSION = 1
_EXPORT_RE = re.compile(r"^export_(\d+)$")
_INT32_MIN = int(np.iinfo(np.int32).min)


def pair_isin(t_a: np.ndarray, i_a: np.ndarray, t_b: np.ndarray, i_b: np.ndarray) -> np.ndarray:
    """bool [len(a)]: is the key (t_a, i_a) among the keys (t_b, i_b)."""
    out = np.zeros(len(i_a), bool)
    for t in np.unique(t_a):
        sel = t_a == t
        out[sel] = np.isin(i_a[sel], i_b[t_b == t])
    return out


def _all_rows(ts, include_slots: bool) -> dict:
    parts = [r for _, r in table_rows(ts, slots=include_slots)]
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((rows["ids"], rows["tables"]))
    return {k: v[order] for k, v in rows.items()}


def read_export_info(directory: str) -> dict:
    path = os.path.join(directory, EXPORT_JSON)
    try:
        with open(path, "rb") as f:
            info = json.loads(f.read().decode())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing: {directory} is not a complete export") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable: {e}") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(info.get("tables"), dict):
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    if not isinstance(info.get("version"), int) or info["version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {info.get('version')!r} is not supported")
    return info


def _keys_file(directory: str, f: dict, what: str) -> tuple[np.ndarray, np.ndarray]:
    raw = read_verified(directory, f, what)
    path = safe_path(directory, f["path"], what)
    t, i = raw.get("tables"), raw.get("ids")
    if t is None or i is None or t.dtype != np.int32 or i.dtype != np.int64 or t.shape != i.shape or t.ndim != 1:
        raise CheckpointError(f"{path}: expected 1-D tensors tables int32 and ids int64 of one length")
    return t, i


def export_incremental(directory: str, tables: dict, engine, *, step: int, previous: str | None = None,
                       rows_per_file: int = 1 << 20, threads: int = 8, include_slots: bool = False,
                       meta: dict | None = None) -> dict:
    """Writes an export of `tables` into `directory` (which must not exist).

    tables / engine: a plain or sharded engine state and its engine (as for
      `CheckpointManager.save`). previous: the previous export's directory; None writes
      a full export. A table absent from `previous` is exported in full.
    Returns the export.json content.
    """
    directory = os.path.abspath(directory)
    if os.path.lexists(directory):
        raise CheckpointError(f"{directory}: already exists")
    eng = _engine_of(engine)
    prev = read_export_info(previous) if previous is not None else None
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(directory)}.tmp.{secrets.token_hex(6)}")
    os.mkdir(tmp)
    dirs = table_dirs(list(tables))
    info = {"format": FORMAT, "version": FORMAT_VERSION, "kind": "full" if prev is None else "delta",
            "step": int(step), "base": None if prev is None else {"step": prev["step"],
                                                                  "dir": os.path.basename(os.path.abspath(previous))},
            "tables": {}, "meta": dict(meta or {})}
    try:
        with cf.ThreadPoolExecutor(max(1, threads)) as pool:
            jobs = []

            def submit(rel, tensors, entry_files):
                f = {"path": rel, "rows": int(len(tensors["ids"]))}
                entry_files.append(f)
                jobs.append((f, pool.submit(write_safetensors, os.path.join(tmp, rel), tensors,
                                            {"format": FORMAT, "table": name})))
                return f

            for name, ts in tables.items():
                cfg = eng.physical[name]
                tdir = f"tables/{dirs[name]}"
                os.makedirs(os.path.join(tmp, tdir))
                rows = _all_rows(ts, include_slots)
                p = prev["tables"].get(name) if prev is not None else None
                prev_wm = int(p["watermark"]) if p is not None else _INT32_MIN
                if p is None:
                    sel = np.ones(len(rows["ids"]), bool)
                    tomb_t, tomb_i = np.zeros(0, np.int32), np.zeros(0, np.int64)
                else:
                    pt, pi = _keys_file(previous, p["live_keys"], "live-keys file")
                    was_live = pair_isin(rows["tables"], rows["ids"], pt, pi)
                    sel = ~was_live | (rows["last_seen"] > prev_wm)
                    gone = ~pair_isin(pt, pi, rows["tables"], rows["ids"])
                    tomb_t, tomb_i = pt[gone], pi[gone]
                wm = max(prev_wm, int(rows["last_seen"].max())) if len(rows["ids"]) else prev_wm
                out = {k: v[sel] for k, v in rows.items()}
                entry = {"dim": cfg.dim, "dtype": cfg.dtype, "members": _members(eng, name), "watermark": wm,
                         "live_rows": int(len(rows["ids"])), "rows": int(sel.sum()),
                         "tombstones": int(len(tomb_i)), "files": []}
                files: list = []
                n = len(out["ids"])
                for part, lo in enumerate(range(0, n, rows_per_file)):
                    submit(f"{tdir}/rows-part-{part:05d}.safetensors",
                           {k: v[lo:lo + rows_per_file] for k, v in out.items()}, files)
                entry["files"] = files
                entry["tombstone_file"] = submit(f"{tdir}/tombstones.safetensors",
                                                 {"ids": tomb_i, "tables": tomb_t}, [])
                entry["live_keys"] = submit(f"{tdir}/live_keys.safetensors",
                                            {"ids": rows["ids"], "tables": rows["tables"]}, [])
                info["tables"][name] = entry
            for f, fut in jobs:
                f.update(fut.result())
        fsync_tree(tmp)
        write_json(os.path.join(tmp, EXPORT_JSON), info)
        fsync_dir(tmp)
        os.rename(tmp, directory)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def read_export(directory: str, tables: Sequence[str] | None = None) -> dict:
    """{table: {"rows": {ids, tables, embedding, last_seen, count, [slot.<name>]},
    "tombstones": {ids, tables}, "members", "dim", "dtype"}} of one export, every file
    verified (sha256, confined to the directory), plus "_info": the export.json."""
    info = read_export_info(directory)
    names = list(info["tables"]) if tables is None else list(tables)
    out = {"_info": info}
    for name in names:
        if name not in info["tables"]:
            raise CheckpointError(f"{directory}: table {name!r} is not in the export (has {sorted(info['tables'])})")
        e = info["tables"][name]
        parts = []
        for f in e.get("files") or []:
            raw = read_verified(directory, f)
            path = safe_path(directory, f["path"])
            emb = raw.get("embedding")
            if (emb is None or emb.dtype != stored_dtype(e["dtype"]) or emb.shape != (f["rows"], e["dim"])
                    or any(raw.get(k) is None or raw[k].shape[0] != f["rows"]
                           for k in ("ids", "tables", "last_seen", "count"))):
                raise CheckpointError(f"{path}: tensors do not match export.json (table {name!r})")
            raw = dict(raw, embedding=decode(emb, e["dtype"]))
            parts.append(raw)
        if parts:
            rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        else:
            rows = {"ids": np.zeros(0, np.int64), "tables": np.zeros(0, np.int32),
                    "embedding": decode(np.zeros((0, e["dim"]), stored_dtype(e["dtype"])), e["dtype"]),
                    "last_seen": np.zeros(0, np.int32), "count": np.zeros(0, np.int64)}
        if len(rows["ids"]) != e["rows"]:
            raise CheckpointError(f"{directory}: table {name!r} files hold {len(rows['ids'])} rows, export.json "
                                  f"says {e['rows']}")
        tt, ti = _keys_file(directory, e["tombstone_file"], "tombstone file")
        out[name] = {"rows": rows, "tombstones": {"ids": ti, "tables": tt}, "members": e.get("members"),
                     "dim": e["dim"], "dtype": e["dtype"]}
    return out


def materialize(directories: Sequence[str], tables: Sequence[str] | None = None) -> dict:
    """Replays a full export and then its deltas, in order: {table: rows sorted by
    (table, id)} - what a serving store holds after applying them."""
    state: dict = {}
    for i, d in enumerate(directories):
        ex = read_export(d, tables)
        if i == 0 and ex["_info"]["kind"] != "full":
            raise CheckpointError(f"{d}: replay must start from a full export")
        for name, e in ex.items():
            if name == "_info":
                continue
            new = e["rows"]
            cur = state.get(name)
            if cur is None or ex["_info"]["kind"] == "full":
                state[name] = new
                continue
            drop_t = np.concatenate([new["tables"], e["tombstones"]["tables"]])
            drop_i = np.concatenate([new["ids"], e["tombstones"]["ids"]])
            keep = ~pair_isin(cur["tables"], cur["ids"], drop_t, drop_i)
            merged = {k: np.concatenate([cur[k][keep], new[k]]) for k in new}
            order = np.lexsort((merged["ids"], merged["tables"]))
            state[name] = {k: v[order] for k, v in merged.items()}
    return state


def list_exports(root: str) -> list[tuple[int, str]]:
    """[(step, dir)] of the complete exports (export_<step> with an export.json) in root."""
    out = []
    if not os.path.isdir(root):
        return out
    for n in os.listdir(root):
        m = _EXPORT_RE.match(n)
        if m and os.path.isfile(os.path.join(root, n, EXPORT_JSON)):
            out.append((int(m.group(1)), os.path.join(os.path.abspath(root), n)))
    return sorted(out)


class IncrementalExporter:
    """Exports into root/export_<step> (zero-padded): full the first time (or with
    full=True, or every `full_every` exports), otherwise a delta against the latest
    export. Leftover temporary dirs from crashed exports are removed on the next export.
    Old exports are never deleted here: a serving store replays from a full export."""

    def __init__(self, root: str, *, full_every: int | None = None, rows_per_file: int = 1 << 20,
                 threads: int = 8, include_slots: bool = False):
        self.root = os.path.abspath(root)
        self.full_every, self.rows_per_file, self.threads = full_every, rows_per_file, threads
        self.include_slots = include_slots
        os.makedirs(self.root, exist_ok=True)

    def exports(self) -> list[tuple[int, str]]:
        return list_exports(self.root)

    def chain(self) -> list[str]:
        """The directories to replay for the latest state: the last full export and the
        deltas after it."""
        ex = self.exports()
        for i in range(len(ex) - 1, -1, -1):
            if read_export_info(ex[i][1])["kind"] == "full":
                return [d for _, d in ex[i:]]
        return []

    def export(self, step: int, *, tables: dict, engine, full: bool = False, meta: dict | None = None) -> str:
        for n in os.listdir(self.root):
            if n.startswith(".export_") and ".tmp." in n:
                shutil.rmtree(os.path.join(self.root, n), ignore_errors=True)
        previous = [d for s, d in self.exports() if s < step]
        chain = self.chain()
        if self.full_every and len(chain) >= self.full_every:
            full = True
        directory = os.path.join(self.root, f"export_{int(step):09d}")
        export_incremental(directory, tables, engine, step=step,
                           previous=None if full or not previous else previous[-1],
                           rows_per_file=self.rows_per_file, threads=self.threads,
                           include_slots=self.include_slots, meta=meta)
        return directory


def describe_export(directory: str) -> str:
    info = read_export_info(directory)
    base = info.get("base")
    lines = [f"export {os.path.abspath(directory)}",
             f"  step {info['step']}   kind {info['kind']}" + (f"   base step {base['step']} ({base['dir']})"
                                                               if base else "")]
    hdr = ["table", "live_rows", "rows", "tombstones", "dim", "dtype", "watermark", "files"]
    rows = [[n, str(t["live_rows"]), str(t["rows"]), str(t["tombstones"]), str(t["dim"]), t["dtype"],
             str(t["watermark"]), str(len(t["files"]))] for n, t in info["tables"].items()]
    widths = [max(len(r[i]) for r in [hdr] + rows) for i in range(len(hdr))]
    lines += ["  " + "  ".join(c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              .rstrip() for r in [hdr] + rows]
    return "\n".join(lines)
