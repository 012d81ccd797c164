"""The ``peftbench`` command. Each subcommand is one module of this package exposing
``register(subparsers)``; this module only discovers them and turns user errors
(:class:`~peftbench.errors.PeftbenchError`) into one-line messages with exit status 2.

While a command runs, stdout and stderr are :class:`OutputSurvives` wrappers: an output error (the reader of
a ``| head`` or a ``| tee`` went away, a full disk under ``> log``) mutes that stream and never reaches the
code that printed, so a sweep whose output pipe closes goes on training and records its runs as they end.

The commands import the rest of peftbench inside their functions, so that ``peftbench --help`` and
``peftbench list`` start fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
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
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = OutputSurvives(sys.stdout), OutputSurvives(sys.stderr)
    try:
        return int(args.func(args) or 0)
    except PeftbenchError as exc:
        _say(f"peftbench {args.command}: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _say("\ninterrupted: finished runs are kept; run the same command again to resume")
        _mute_stdout()
        return 130
    except BrokenPipeError:  # the reader of our output went away (`peftbench list methods | head`)
        _mute_stdout()
        return 141
    except OSError as exc:  # the last resort for a disk or permission error no command turned into its own message
        where = f"{exc.filename}: " if exc.filename else ""
        _say(f"peftbench {args.command}: error: {where}{exc.strerror or exc}")
        return 2
    finally:
        sys.stdout, sys.stderr = streams


class OutputSurvives:
    """A text stream whose write and flush never raise: after the first output error (``EPIPE``, ``ENOSPC``,
    a closed file) the stream is muted (its file descriptor pointed at /dev/null, so the interpreter's own
    last flush does not fail either) and what is written later is dropped. Everything else is the stream's."""

    def __init__(self, stream):
        self._stream = stream
        self.broken = False

    def _mute(self) -> None:
        self.broken = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):
                self._mute()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._mute()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _say(msg: str) -> None:
    """A last message on stderr, even when stdout or stderr is a pipe whose reader is gone."""
    try:
        print(msg, file=sys.stderr, flush=True)
    except (BrokenPipeError, OSError):
        try:
            with open("/dev/tty", "w") as tty:
                print(msg, file=tty, flush=True)
        except OSError:
            pass


def _mute_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail on a dead pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
