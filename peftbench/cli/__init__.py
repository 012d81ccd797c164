"""The ``peftbench`` command. Each subcommand is one module of this package exposing
``register(subparsers)``; this module only discovers them and turns user errors
(:class:`~peftbench.errors.PeftbenchError`) into one-line messages with exit status 2.

The commands import the rest of peftbench inside their functions, so that ``peftbench --help`` and
``peftbench list`` start fast.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from .._version import __version__
from ..errors import PeftbenchError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftbench",
        description="Benchmark parameter-efficient fine-tuning methods on Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"peftbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PeftbenchError as exc:
        print(f"peftbench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are kept; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
