"""Every error peftbench reports to a user, under one base class.

A :class:`PeftbenchError` is an input problem the user can fix: the CLI prints its message on one
line (``peftbench <command>: error: ...``) and exits with status 2, before any compute is spent. The
message names the file (and line), the option or the flag that is wrong. Anything else raised inside
a run is a bug or a numerical problem: the engine records it in the run's record (``failed``) and the
sweep goes on.
"""
from __future__ import annotations


class PeftbenchError(Exception):
    """Base class of the errors the CLI reports as one line (exit status 2)."""


class SettingsError(PeftbenchError, ValueError):
    """Bad command-line or sweep-file input (a flag, a value, a combination)."""


class OptionError(SettingsError):
    """A method option that does not exist or whose value cannot be read."""


class UnknownNameError(PeftbenchError, KeyError):
    """An unknown method, task, suite, protocol, ... name; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class PluginError(PeftbenchError):
    """A plugin that cannot be used: it fails to import, or its name clashes with another one."""


class DataError(PeftbenchError, ValueError):
    """Bad or missing data. The message names the file (and line) and says how to get the data."""


class BackboneError(PeftbenchError, ValueError):
    """A backbone name or checkpoint file that cannot be used."""


class CorruptRecord(PeftbenchError, ValueError):
    """A run record file that cannot be read as a record."""


class StoreError(PeftbenchError):
    """The run store cannot be used: not writable, full, or holding a file it refuses to read."""


class PipelineError(PeftbenchError, RuntimeError):
    """A pipeline cannot go on (e.g. every search run diverged); the sweep reports it for its pair."""


class Diverged(RuntimeError):
    """Raised inside a run when the loss is not finite; the run is recorded as ``diverged``."""


def bounds_problem(value, lo: float | None, hi: float | None) -> str | None:
    """``is below its minimum 1`` / ``is above its maximum 5`` for a number outside [lo, hi] (a bound of None is no
    bound), else None: the one wording of the sweep fields, the executor settings and the method options."""
    if lo is not None and value < lo:
        return f"is below its minimum {lo:g}"
    if hi is not None and value > hi:
        return f"is above its maximum {hi:g}"
    return None
