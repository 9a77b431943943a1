"""`recis-jax inspect PATH...`: footer facts of columnar files (no data is read)."""

from __future__ import annotations

import json

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
    p = sub.add_parser("inspect", help="show rows, units and schema of ORC/Parquet files")
    p.add_argument("paths", nargs="+", help="files, directories or globs")
    p.add_argument("--format", choices=["orc", "parquet"], default=None)
    p.set_defaults(func=_main)


def _main(args) -> int:
    try:
        print(json.dumps(inspect(args.paths, args.format), indent=2))
    except DataError as e:
        print(f"error: {e}")
        return 2
    return 0
