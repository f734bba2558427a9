"""The ``sparseinfer`` command line. Each subcommand lives in ``sparseinfer/commands/<name>.py``
and exposes ``register(subparsers)``, which adds its parser with ``func=<callable(args) -> int>``."""

from __future__ import annotations

import argparse
import importlib
import sys

from ._version import __version__

COMMANDS = ("compress", "inspect", "run", "generate", "demo", "bench", "sweep", "calibrate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseinfer", description="Compress PyTorch models and run them fast.")
    parser.add_argument("--version", action="version", version=f"sparseinfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"sparseinfer.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as err:  # bad input or a missing extra: a message
        print(f"sparseinfer {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
