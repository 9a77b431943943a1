"""`recis-jax inspect PATH...`: footer facts of columnar files (no data is read), or a
summary of checkpoints (a step directory with a manifest.json, a checkpoint root holding
step_<N> directories, or an incremental export): tables, live rows, dims, dtypes, step."""

from __future__ import annotations

import json
import os

from recis_jax.io.files import DataError, file_info, list_files


def inspect(paths, format: str | None = None) -> dict:
    """Per-file format, rows, units (stripes / row groups) and the schema, plus totals."""
    files = [file_info(p, format) for p in list_files(paths, format)]
    return {
        "files": [{"path": f.path, "format": f.format, "rows": f.num_rows, "units": len(f.unit_rows),
                   "bytes": f.nbytes} for f in files],
        "schema": {name: str(t) for name, t in zip(files[0].schema.names, files[0].schema.types)} if files else {},
        "total_rows": sum(f.num_rows for f in files),
        "total_bytes": sum(f.nbytes for f in files),
    }


def add_cli(sub) -> None:
    p = sub.add_parser("inspect", help="show rows, units and schema of ORC/Parquet files, or summarize checkpoints")
    p.add_argument("paths", nargs="+", help="files, directories or globs; or checkpoint / export directories")
    p.add_argument("--format", choices=["orc", "parquet"], default=None)
    p.set_defaults(func=_main)


def _is_checkpoint(path: str) -> bool:
    if not os.path.isdir(path) and os.path.basename(path) not in ("manifest.json", "export.json"):
        return False
    from recis_jax.checkpoint.manager import is_checkpoint_path  # imports jax: only for directories

    return is_checkpoint_path(path if os.path.isdir(path) else os.path.dirname(path) or ".")


def _main(args) -> int:
    checkpoints = [p for p in args.paths if _is_checkpoint(p)]
    data = [p for p in args.paths if p not in checkpoints]
    if checkpoints:
        from recis_jax.checkpoint import CheckpointError, describe

        for p in checkpoints:
            try:
                print(describe(p))
            except CheckpointError as e:
                print(f"error: {e}")
                return 2
    if data:
        try:
            print(json.dumps(inspect(data, args.format), indent=2))
        except DataError as e:
            print(f"error: {e}")
            return 2
    return 0
