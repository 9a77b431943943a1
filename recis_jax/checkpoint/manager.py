"""CheckpointManager: atomic step directories of sparse + dense state, retention, restore.

    mgr = CheckpointManager("/ckpt", keep_last=3, keep_every=10_000)
    mgr.save(step, tables=tables, engine=engine, dense={"params": p, "opt": o},
             meta={"reader": pos, "seed": 0}, config_hash=h)
    r = mgr.restore(engine=engine, optimizer=sparse_opt, dense_target={"params": p, "opt": o})
    r.step, r.tables, r.dense, r.meta

Layout of one checkpoint, ROOT/step_000000100/:

    manifest.json                written last; its presence makes the directory a checkpoint
    sparse/<table>/part-00000.safetensors            (see `checkpoint.sparse`)
    sparse/<table>/shard-00003-part-00000.safetensors   (saved from a sharded engine)
    sparse/<table>/sketch.safetensors                (admission count-min sketch, if any)
    dense/...                    orbax StandardCheckpointer (OCDBT/zarr; no pickle)

manifest.json: {"format": "recis-jax-checkpoint", "version": 1, "step", "created" (unix
time), "config_hash" (the caller's), "tables": {name: {dim, dtype, rows,
optimizer_step, capacity, num_shards, members, slots {name: {shape, dtype, default}}
(default: the slot's initial row, a number when uniform), sketch, files [{path, sha256,
rows, shard, bytes}]}}, "dense": {"path": "dense", "files": [{path, sha256, bytes}]} |
null, "meta": {...the caller's JSON...}}.

Atomicity. Everything is written into ROOT/tmp.step_<N>.<random>/, every file and
directory is fsynced, the manifest goes in last, then the directory is renamed to
ROOT/step_<N> (zero-padded to 9 digits) and ROOT is fsynced. A crash at any point leaves
either no step_<N> or a complete one; earlier checkpoints are never touched by a save
(retention runs after the rename, and deletes by renaming to a tmp name first). Leftover
tmp.* directories are ignored by the listing and removed by the next save. A step
directory without a readable manifest is not a checkpoint. One writer per ROOT; in a
`jax.distributed` run every process writes its own table shards into the same
temporary directory and process 0 writes the manifest (`_save_multiprocess`).

Retention (after each save, from the directory listing, so it survives restarts): keep
the `keep_last` most recent checkpoints (None: all), plus forever every checkpoint whose
step % keep_every == 0, plus the one just saved.

Restore verifies every file it reads against the manifest's sha256 (sparse and dense),
reads only inside the checkpoint directory, never unpickles, and raises CheckpointError
naming the file on any problem. Sparse tables load onto any device count (see
`checkpoint.sparse.load_sparse`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax

from recis_jax.checkpoint.sparse import (CheckpointError, fsync_dir, fsync_tree, json_default, load_sparse,
                                        safe_path, save_sparse, sha256_file, write_json)

log = logging.getLogger(__name__)

FORMAT = "recis-jax-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DENSE_DIR = "dense"
TMP_PREFIX = "tmp."
_STEP_RE = re.compile(r"^step_(\d+)$")


class Restored(NamedTuple):
    """What `CheckpointManager.restore` returns: the step, {table: TableState} (plain or
    stacked, as asked), the dense pytree (None if none was saved), the caller's meta
    dict, and the whole manifest."""

    step: int
    tables: dict
    dense: Any
    meta: dict
    manifest: dict


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def read_manifest(directory: str) -> dict:
    """The manifest of a checkpoint directory, structurally checked (CheckpointError
    naming the file otherwise)."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, "rb") as f:
            m = json.loads(f.read().decode())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing: {directory} is not a complete checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    v = m.get("version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {v!r} is not supported (this code reads <= {FORMAT_VERSION})")
    if not isinstance(m.get("step"), int) or not isinstance(m.get("tables"), dict):
        raise CheckpointError(f"{path}: manifest lacks an integer step or a tables dict")
    for name, t in m["tables"].items():
        if not isinstance(t, dict) or not isinstance(t.get("files"), list):
            raise CheckpointError(f"{path}: table {name!r} entry is malformed")
        for f in t["files"]:
            if (not isinstance(f, dict) or not isinstance(f.get("path"), str) or not isinstance(f.get("rows"), int)
                    or f["rows"] < 0 or not isinstance(f.get("sha256"), str)):
                raise CheckpointError(f"{path}: table {name!r} has a malformed file entry {f!r}")
    return m


def list_steps(root: str) -> list[int]:
    """Steps of the complete checkpoints under root (a step_<N> dir whose manifest is
    valid and says step N), ascending."""
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if not m or not os.path.isdir(os.path.join(root, name)):
            continue
        try:
            man = read_manifest(os.path.join(root, name))
        except CheckpointError:
            continue
        if man["step"] == int(m.group(1)):
            out.append(man["step"])
    return sorted(set(out))


def _dense_checkpointer():
    import orbax.checkpoint as ocp  # slow import: only when dense state is used

    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _list_files(directory: str) -> list[str]:
    out = []
    for root, _, files in os.walk(directory):
        for f in files:
            out.append(os.path.relpath(os.path.join(root, f), directory).replace(os.sep, "/"))
    return sorted(out)


class CheckpointManager:
    """Saves and restores checkpoints under `root` (see the module docstring).

    Args:
      root: the checkpoint root directory (created).
      keep_last: keep this many most recent checkpoints (>= 1), None keeps all.
      keep_every: also keep, forever, checkpoints whose step % keep_every == 0.
      rows_per_file: most rows per sparse safetensors file.
      threads: parallel file writers / readers.
    """

    def __init__(self, root: str, keep_last: int | None = 3, keep_every: int | None = None,
                 rows_per_file: int = 1 << 20, threads: int = 8):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        if keep_every is not None and keep_every < 1:
            raise ValueError(f"keep_every must be >= 1 or None, got {keep_every}")
        if rows_per_file < 1 or threads < 1:
            raise ValueError("rows_per_file and threads must be >= 1")
        self.root = os.path.abspath(root)
        self.keep_last, self.keep_every = keep_last, keep_every
        self.rows_per_file, self.threads = rows_per_file, threads
        os.makedirs(self.root, exist_ok=True)

    # -- listing ----------------------------------------------------------------------------
    def step_dir(self, step: int) -> str:
        return os.path.join(self.root, step_dir_name(step))

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints (a step_<N> dir with a valid manifest for
        step N), ascending."""
        return list_steps(self.root)

    def latest_step(self) -> int | None:
        s = self.steps()
        return s[-1] if s else None

    # -- save -------------------------------------------------------------------------------
    def save(self, step: int, *, tables: dict, engine, dense: Any = None, meta: dict | None = None,
             config_hash: str = "") -> str:
        """Writes checkpoint `step` atomically and applies retention; returns its dir.

        tables: an `EmbeddingEngine` state {name: TableState}, or a
          `ShardedEmbeddingEngine` stacked state; engine: the (plain or sharded) engine.
        dense: any pytree of arrays (params, optimizer state, ...), saved with orbax.
        meta: JSON-serializable host state (reader position, rng seed, ...).
        config_hash: the caller's hash of the config, stored as is.
        The device state is read synchronously: donate it to the next step afterwards.
        """
        if isinstance(step, bool) or int(step) != step or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        step = int(step)
        if jax.process_count() > 1:
            return self._save_multiprocess(step, tables, engine, dense, meta, config_hash)
        meta = dict(meta or {})
        try:
            json.dumps(meta, default=json_default)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"meta is not JSON-serializable: {e}") from e
        self._clean_tmp()
        tmp = os.path.join(self.root, f"{TMP_PREFIX}{step_dir_name(step)}.{secrets.token_hex(6)}")
        os.mkdir(tmp)
        try:
            table_part = save_sparse(tmp, tables, engine, rows_per_file=self.rows_per_file, threads=self.threads)
            dense_part = None
            if dense is not None:
                ddir = os.path.join(tmp, DENSE_DIR)
                try:
                    _dense_checkpointer().save(ddir, args=_standard_save(dense))
                except Exception as e:
                    raise CheckpointError(f"{ddir}: saving the dense state with orbax failed: {e}") from e
                fsync_tree(ddir)
                dense_part = {"path": DENSE_DIR, "files": [
                    {"path": f"{DENSE_DIR}/{rel}", "sha256": sha256_file(os.path.join(ddir, rel)),
                     "bytes": os.path.getsize(os.path.join(ddir, rel))} for rel in _list_files(ddir)]}
            manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "created": time.time(),
                        "config_hash": config_hash, "tables": table_part, "dense": dense_part, "meta": meta}
            fsync_tree(tmp)
            write_json(os.path.join(tmp, MANIFEST), manifest)  # last: it makes the directory a checkpoint
            fsync_dir(tmp)
            final = self.step_dir(step)
            old = None
            if os.path.lexists(final):  # re-saving a step: move the old one out of the way first
                old = os.path.join(self.root, f"{TMP_PREFIX}{step_dir_name(step)}.replaced.{secrets.token_hex(6)}")
                os.rename(final, old)
            os.rename(tmp, final)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._retain(step)
        return final

    def _save_multiprocess(self, step, tables, engine, dense, meta, config_hash) -> str:
        """`save` in a `jax.distributed` run (ROOT on a filesystem every process sees).

        Every process writes the sparse files of the table shards it holds and a small
        JSON of them into one temporary directory; orbax writes the dense state (all
        processes take part); then process 0 merges the parts into the manifest and
        renames the directory, as in a single-process save. Barriers keep the steps in
        order; a crash anywhere leaves the previous checkpoint the latest."""
        from jax.experimental import multihost_utils

        me = jax.process_index()
        tmp = os.path.join(self.root, f"{TMP_PREFIX}{step_dir_name(step)}.multiprocess")
        if me == 0:
            self._clean_tmp()
            os.mkdir(tmp)
            os.mkdir(os.path.join(tmp, "parts"))
        multihost_utils.sync_global_devices(f"recis-jax checkpoint {step}: begin")
        part = save_sparse(tmp, tables, engine, rows_per_file=self.rows_per_file, threads=self.threads,
                           local_only=True)
        write_part(os.path.join(tmp, "parts"), part)
        ddir = os.path.join(tmp, DENSE_DIR)
        if dense is not None:
            try:
                _dense_checkpointer().save(ddir, args=_standard_save(dense))
            except Exception as e:
                raise CheckpointError(f"{ddir}: saving the dense state with orbax failed: {e}") from e
        multihost_utils.sync_global_devices(f"recis-jax checkpoint {step}: written")
        final = self.step_dir(step)
        if me == 0:
            table_part = read_parts(os.path.join(tmp, "parts"))
            dense_part = None
            if dense is not None:
                fsync_tree(ddir)
                dense_part = {"path": DENSE_DIR, "files": [
                    {"path": f"{DENSE_DIR}/{rel}", "sha256": sha256_file(os.path.join(ddir, rel)),
                     "bytes": os.path.getsize(os.path.join(ddir, rel))} for rel in _list_files(ddir)]}
            manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "created": time.time(),
                        "config_hash": config_hash, "tables": table_part, "dense": dense_part,
                        "meta": dict(meta or {}, processes=jax.process_count())}
            shutil.rmtree(os.path.join(tmp, "parts"))
            fsync_tree(tmp)
            write_json(os.path.join(tmp, MANIFEST), manifest)
            fsync_dir(tmp)
            if os.path.lexists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.root)
            self._retain(step)
        multihost_utils.sync_global_devices(f"recis-jax checkpoint {step}: done")
        return final

    def _clean_tmp(self) -> None:
        """Removes leftovers of interrupted saves / deletions."""
        for name in os.listdir(self.root):
            if name.startswith(TMP_PREFIX + "step_"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def _retain(self, just_saved: int) -> None:
        if self.keep_last is None:
            return
        steps = self.steps()
        keep = set(steps[-self.keep_last:]) | {just_saved}
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        for s in steps:
            if s not in keep:
                self.delete(s)

    def delete(self, step: int) -> None:
        """Deletes a checkpoint: renamed out of the listing first (atomic), then removed."""
        src = self.step_dir(step)
        dst = os.path.join(self.root, f"{TMP_PREFIX}{step_dir_name(step)}.deleting.{secrets.token_hex(6)}")
        os.rename(src, dst)
        fsync_dir(self.root)
        shutil.rmtree(dst, ignore_errors=True)

    # -- restore ----------------------------------------------------------------------------
    def restore(self, step: int | None = None, *, engine, optimizer=None, dense_target: Any = None,
                tables: Sequence[str] | None = None, sharded=None, fallback: bool = False, **load_kwargs
                ) -> Restored:
        """Loads checkpoint `step` (default: the latest) and verifies it.

        engine / optimizer / tables / sharded: see `checkpoint.sparse.load_sparse` (as
          are `load_kwargs`: strict_slots, num_rows, max_rows, missing).
        dense_target: a pytree like the saved dense state (arrays or
          jax.ShapeDtypeStruct; their shardings place the result, so pass one to load
          onto another device count); None restores it as orbax saved it (the saved
          shardings: the same devices must exist).
        fallback: with step=None, if the latest checkpoint fails to verify, log it and
          try the next older one (default: raise).
        """
        if step is not None:
            return self._restore(step, engine, optimizer, dense_target, tables, sharded, load_kwargs)
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"{self.root}: no checkpoint found")
        for i, s in enumerate(reversed(steps)):
            try:
                return self._restore(s, engine, optimizer, dense_target, tables, sharded, load_kwargs)
            except CheckpointError as e:
                if not fallback or i == len(steps) - 1:
                    raise
                log.warning("checkpoint step %d is unusable (%s); trying the previous one", s, e)
        raise AssertionError("unreachable")

    def _restore(self, step, engine, optimizer, dense_target, tables, sharded, load_kwargs) -> Restored:
        d = self.step_dir(step)
        if not os.path.isdir(d):
            raise CheckpointError(f"{d}: no checkpoint for step {step} (have {self.steps()})")
        manifest = read_manifest(d)
        if manifest["step"] != step:
            raise CheckpointError(f"{os.path.join(d, MANIFEST)}: says step {manifest['step']}, expected {step}")
        dense = restore_dense(d, manifest, dense_target)
        out = load_sparse(d, manifest, engine, optimizer, tables=tables, sharded=sharded, threads=self.threads,
                          **load_kwargs)
        return Restored(step, out, dense, manifest.get("meta") or {}, manifest)


def write_part(parts_dir: str, part: dict) -> None:
    """This process's tables part (save_sparse(..., local_only=True)'s entries)."""
    write_json(os.path.join(parts_dir, f"process-{jax.process_index():05d}.json"), part)


def read_parts(parts_dir: str) -> dict:
    """The merged tables part of every process's `write_part` (after a barrier)."""
    names = sorted(os.listdir(parts_dir))
    if len(names) != jax.process_count():
        raise CheckpointError(f"{parts_dir}: holds {len(names)} parts, expected one per process "
                              f"({jax.process_count()}): is it on a filesystem every process sees?")
    parts = []
    for name in names:
        with open(os.path.join(parts_dir, name)) as f:
            parts.append(json.load(f))
    return _merge_parts(parts)


def _merge_parts(parts: list[dict]) -> dict:
    """The manifest's tables part from every process's part (each lists its own shards'
    files): rows add up, files are ordered by shard."""
    out: dict[str, dict] = {}
    for part in parts:
        for name, e in part.items():
            if name not in out:
                out[name] = dict(e, rows=0, files=[])
            m = out[name]
            m["rows"] += e["rows"]
            m["files"] += e["files"]
            m["optimizer_step"] = max(m["optimizer_step"], e["optimizer_step"])
    for m in out.values():
        m["files"].sort(key=lambda f: (f.get("shard") or 0, f["path"]))
    return out


def _standard_save(tree):
    import orbax.checkpoint as ocp

    return ocp.args.StandardSave(tree)


def restore_dense(directory: str, manifest: dict, target: Any = None) -> Any:
    """The dense pytree of a checkpoint (None if it has none), every file verified
    against the manifest's sha256 before orbax reads it."""
    part = manifest.get("dense")
    if not part:
        if target is not None:
            raise CheckpointError(f"{directory}: the checkpoint has no dense state but a dense_target was given")
        return None
    ddir = safe_path(directory, part.get("path"), "dense directory")
    listed = set()
    for f in part.get("files") or []:
        path = safe_path(directory, f.get("path"), "dense file")
        listed.add(os.path.relpath(path, ddir).replace(os.sep, "/"))
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: dense file listed in the manifest is missing")
        got = sha256_file(path)
        if got != f.get("sha256"):
            raise CheckpointError(f"{path}: sha256 mismatch (manifest {f.get('sha256')}, file {got}): the file is "
                                  f"corrupt or truncated")
    extra = sorted(set(_list_files(ddir)) - listed)
    if extra:
        raise CheckpointError(f"{ddir}: files not in the manifest: {extra[:5]}")
    import orbax.checkpoint as ocp

    try:
        if target is None:
            return _dense_checkpointer().restore(ddir)
        return _dense_checkpointer().restore(ddir, args=ocp.args.StandardRestore(target))
    except Exception as e:
        raise CheckpointError(f"{ddir}: orbax could not restore the dense state: {e}") from e


# -- describe (for `recis-jax inspect`) -------------------------------------------------------

def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table_lines(tables: dict, extra: Sequence[tuple[str, Any]] = ()) -> list[str]:
    header = ["table", "rows", "dim", "dtype", "opt_step", "shards", "files", "bytes", "slots"]
    header += [h for h, _ in extra]
    rows = []
    for name, t in tables.items():
        slots = ", ".join(f"{k} {s.get('dtype')}{s.get('shape')}" for k, s in (t.get("slots") or {}).items()) or "-"
        files = t.get("files") or []
        rows.append([name, str(t.get("rows")), str(t.get("dim")), str(t.get("dtype")),
                     str(t.get("optimizer_step", "-")), str(t.get("num_shards") or "-"), str(len(files)),
                     _fmt_bytes(sum(int(f.get("bytes", 0)) for f in files)), slots]
                    + [str(fn(t)) for _, fn in extra])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) if i in (0, 3, 8) else c.rjust(w) for i, (c, w) in
                              enumerate(zip(r, widths))).rstrip() for r in [header] + rows]


def describe_checkpoint(directory: str) -> str:
    m = read_manifest(directory)
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(m["created"])) if m.get("created") else "?"
    lines = [f"checkpoint {os.path.abspath(directory)}",
             f"  step {m['step']}   format {m['format']} v{m['version']}   saved {created}   "
             f"config_hash {m.get('config_hash') or '-'}",
             f"  tables: {len(m['tables'])}, {sum(int(t.get('rows', 0)) for t in m['tables'].values())} live rows"]
    lines += _table_lines(m["tables"])
    d = m.get("dense")
    if d:
        lines.append(f"  dense: {d.get('path')}/ ({len(d.get('files') or [])} files, "
                     f"{_fmt_bytes(sum(int(f.get('bytes', 0)) for f in d.get('files') or []))})")
    else:
        lines.append("  dense: none")
    lines.append(f"  meta: {json.dumps(m.get('meta') or {}, sort_keys=True)}")
    return "\n".join(lines)


def is_checkpoint_path(path: str) -> bool:
    """A checkpoint dir, a checkpoint root (holding step_<N> dirs) or an export dir."""
    if not os.path.isdir(path):
        return False
    if any(os.path.isfile(os.path.join(path, f)) for f in (MANIFEST, "export.json", "serving.json")):
        return True
    return any(_STEP_RE.match(n) or n.startswith("export_") for n in os.listdir(path))


def describe(path: str) -> str:
    """Human-readable summary of a checkpoint directory, a checkpoint root (its
    checkpoints, then the latest in detail), or an incremental export (dir or root)."""
    if os.path.basename(path) in (MANIFEST, "export.json") and os.path.isfile(path):
        path = os.path.dirname(path) or "."
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return describe_checkpoint(path)
    serving = os.path.join(path, "serving.json")  # a `recis-jax export` serving export
    if os.path.isfile(serving):
        with open(serving) as f:
            m = json.load(f)
        return "\n".join([f"serving export {path}: step {m.get('step')}, config hash {m.get('config_hash')}"]
                         + _table_lines(m.get("tables", {})))
    from recis_jax.checkpoint import incremental

    if os.path.isfile(os.path.join(path, incremental.EXPORT_JSON)):
        return incremental.describe_export(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    names = sorted(os.listdir(path))
    step_dirs = [n for n in names if _STEP_RE.match(n)]
    if step_dirs:
        root = os.path.abspath(path)
        steps = list_steps(root)
        lines = [f"checkpoint root {root}: {len(steps)} checkpoint(s), steps {steps}"]
        bad = [n for n in step_dirs if int(_STEP_RE.match(n).group(1)) not in steps]
        if bad:
            lines.append(f"  not checkpoints (no valid manifest): {bad}")
        tmp = [n for n in names if n.startswith(TMP_PREFIX)]
        if tmp:
            lines.append(f"  leftover temporary dirs (removed by the next save): {tmp}")
        if steps:
            lines.append(describe_checkpoint(os.path.join(root, step_dir_name(steps[-1]))))
        return "\n".join(lines)
    exports = incremental.list_exports(path)
    if exports:
        lines = [f"export root {os.path.abspath(path)}: {len(exports)} export(s), steps {[s for s, _ in exports]}"]
        lines.append(incremental.describe_export(exports[-1][1]))
        return "\n".join(lines)
    raise CheckpointError(f"{path}: not a checkpoint, checkpoint root or export")
