"""HTML cell helpers shared by the report and the column table (escaped by ``peftbench._text.html``: control
characters made visible, ``<>&"'`` escaped; deterministic)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._text import html as escape

if TYPE_CHECKING:
    from .board import Row

MISSING = '<td class="missing" title="empty: not every task it covers has a finished final run">–</td>'


def num(x, digits=2, signed=False) -> str:
    if x is None:
        return MISSING
    cls = ""
    if signed:
        cls = ' class="pos"' if x > 0 else (' class="neg"' if x < 0 else "")
        return f"<td{cls}>{x:+.{digits}f}</td>"
    return f"<td>{x:.{digits}f}</td>"


def mean_std(x, sd, digits=2) -> str:
    """``mean ± std`` (std smaller), or the mean alone without a std."""
    if x is None:
        return MISSING
    if sd is None:
        return f"<td>{x:.{digits}f}</td>"
    return f'<td>{x:.{digits}f}<span class="sd"> ± {sd:.{digits}f}</span></td>'


def integer(x) -> str:
    if x is None:
        return MISSING
    return f"<td>{int(round(x)):,}</td>"


def txt(s: str, cls: str = "text") -> str:
    return f'<td class="{cls}">{escape(str(s))}</td>'


def th(names: list[str], text_cols: int = 0) -> str:
    cells = "".join(f'<th class="text">{escape(n)}</th>' if i < text_cols else f"<th>{escape(n)}</th>"
                    for i, n in enumerate(names))
    return f"<thead><tr>{cells}</tr></thead>"


def row_cls(r: "Row") -> str:
    return ' class="reported"' if r.source == "reported" else ""
