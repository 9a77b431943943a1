"""`recis-jax` command line: thin wrappers over importable functions.

Each subcommand lives in the module that owns the work and registers itself through an
`add_cli(subparsers)` function that sets `func` on its parser.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands, in --help order.
_COMMAND_MODULES = (
    "recis_jax.train.main",
    "recis_jax.train.export",
    "recis_jax.io.convert",
    "recis_jax.io.synthetic",
    "recis_jax.io.inspect",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recis-jax",
        description="Sparse + dense recommendation training on JAX/XLA.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # not built yet
        module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
