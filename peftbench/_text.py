"""Output safety: a string that comes from a run record (a label, a config, a task name, an error) or
from a user's file is text in every file and terminal peftbench writes, never code.

One function per kind of output, every writer goes through them (docs/reliability.md §9):

* :func:`printable`: control and format characters (ANSI escapes, the bell, NUL, carriage returns,
  bidirectional overrides) spelled as visible escapes (``\\x1b``); the basis of all the others and what
  a terminal gets (:func:`terminal` keeps line breaks);
* :func:`csv_cell`: a cell that a spreadsheet would read as a formula (it starts with ``=``, ``+``,
  ``-``, ``@``, a tab or a carriage return) gets a leading ``'``, unless it is a number (``-0.5``);
* :func:`html`: HTML-escaped (``<script>`` stays text);
* :func:`markdown`: Markdown table cell: HTML-escaped and Markdown's own characters escaped;
* :func:`latex`: every LaTeX special character escaped (``\\input{...}`` prints, never runs);
* :func:`plot_text`: matplotlib text (SVG/PNG): no ``$`` mathtext, nothing XML 1.0 forbids;
* :func:`unsafe_component`: why a name cannot be one file name (the rule of
  :func:`peftbench._io.safe_component`, and of the registries' names).

Standard library only: every layer of peftbench may use it.
"""
from __future__ import annotations

import html as _html
import re
import unicodedata
from typing import Any

_CONTROL = frozenset(("Cc", "Cf", "Cs", "Zl", "Zp"))  # control, format, surrogates, line/paragraph separators
_NOT_XML = frozenset(("\ufffe", "\uffff"))  # not characters in XML 1.0 (the C categories cover the rest)


def _escape_char(ch: str) -> str:
    o = ord(ch)
    return f"\\x{o:02x}" if o < 0x100 else (f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")


def printable(text: Any, keep: str = "") -> str:
    """``str(text)`` with every control or format character, and every character XML 1.0 forbids, written
    as a visible escape (``\\x1b``, ``\\u202e``); the characters in ``keep`` (e.g. ``"\\n"``) stay."""
    s = "" if text is None else str(text)
    if s.isascii() and s.isprintable():  # the common case: nothing to do
        return s
    return "".join(ch if ch in keep or (unicodedata.category(ch) not in _CONTROL and ch not in _NOT_XML)
                   else _escape_char(ch) for ch in s)


def terminal(text: Any) -> str:
    """What may be printed on a terminal: :func:`printable`, line breaks kept."""
    return printable(text, keep="\n")


_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:inf|nan)", re.IGNORECASE)
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    """A CSV cell: :func:`printable` (line breaks kept: the CSV writer quotes them), and a leading ``'``
    when a spreadsheet would read the text as a formula. Numbers (``-0.5``, ``+1e-3``) stay numbers."""
    raw = "" if value is None else str(value)
    if raw.startswith(_FORMULA) and not _NUMBER.fullmatch(raw):
        return "'" + printable(raw, keep="\n")
    return printable(raw, keep="\n")


def html(text: Any) -> str:
    """HTML text or attribute value: :func:`printable` (line breaks kept), then ``& < > " '`` escaped."""
    return _html.escape(printable(text, keep="\n"), quote=True)


_MD = str.maketrans({c: "\\" + c for c in "\\`*_[]|~"})


def markdown(text: Any) -> str:
    """One Markdown (GitHub) table cell of plain text: on one line, Markdown's characters escaped and HTML
    escaped (a renderer that allows inline HTML shows ``<script>`` as text)."""
    return _html.escape(printable(text).translate(_MD), quote=False)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
        "|": r"\textbar{}", "±": r"$\pm$", "–": "--", "−": "$-$", "≈": r"$\approx$", "×": r"$\times$"}


def latex(text: Any) -> str:
    """LaTeX text: :func:`printable` (one line), then every special character escaped: ``\\input{x}``
    prints as text, a ``%`` comments nothing out, a ``&`` opens no table cell."""
    return "".join(_TEX.get(ch, ch) for ch in printable(text))


def plot_text(text: Any) -> str:
    """Text for a matplotlib figure (its SVG keeps the text in comments): :func:`printable`, on one line,
    with ``$`` escaped so that no label is read as mathtext."""
    return printable(text).replace("$", r"\$")


MAX_COMPONENT_BYTES = 200  # a file system allows 255; the writers add suffixes such as "-leaderboard.csv"


def unsafe_component(name: Any) -> str | None:
    """Why ``name`` cannot be used as one file or folder name inside another folder; None when it can.

    A safe component is a non-empty string without a path separator (``/``, ``\\``), without control or
    format characters (NUL, newlines, ANSI escapes, bidirectional overrides), that is not ``.`` or
    ``..`` and does not start with ``.`` (no hidden files, no ``.peftbench`` folders of the store), at
    most :data:`MAX_COMPONENT_BYTES` bytes of UTF-8."""
    if not isinstance(name, str):
        return f"not a string ({type(name).__name__})"
    if not name:
        return "empty"
    if name in (".", ".."):
        return "a relative path"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if any(unicodedata.category(c) in _CONTROL for c in name):
        return "contains a control character"
    if name.startswith("."):
        return "starts with '.'"
    if name != name.strip():
        return "starts or ends with white space"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
        return f"longer than {MAX_COMPONENT_BYTES} bytes"
    return None
