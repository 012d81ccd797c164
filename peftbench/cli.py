"""The ``peftbench`` command. Each subcommand lives in ``peftbench/commands/<name>.py`` and exposes
``register(subparsers)``; this module only discovers them and turns known errors into clear messages."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import __version__



def _user_errors() -> tuple[type[BaseException], ...]:
    from .backbone import BackboneError
    from .method import OptionError
    from .registry import UnknownNameError
    from .sweep import SettingsError
    from .task import DataError

    return (BackboneError, OptionError, UnknownNameError, SettingsError, DataError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftbench",
        description="Benchmark parameter-efficient fine-tuning methods on Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"peftbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        print(f"peftbench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are kept; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
