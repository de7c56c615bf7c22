"""Text for people: the one number formatter and Markdown tables.

Owns how a measured number is written (None, NaN and inf included) and how records
become a Markdown table; every table and message in flashmath (the checker, the
benchmarks, the lab) uses these. May import: nothing of flashmath.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = ["MISSING", "fmt_bytes", "markdown_table", "number"]

#: How a value that was not measured reads in every table.
MISSING = "-"

Column = tuple[str, str | Callable[[Mapping[str, Any]], Any]]


def number(x: float | None, spec: str = ".3g", *, missing: str = MISSING) -> str:
    """``format(x, spec)``, with None as ``missing``, NaN as "nan" and infinities as
    "inf" / "-inf" whatever the spec (so a padded column stays aligned: the spec's width
    is kept)."""
    width = "".join(c for c in spec.split(".")[0] if c.isdigit())
    if x is None:
        return missing.rjust(int(width)) if width else missing
    f = float(x)
    if math.isnan(f) or math.isinf(f):
        word = "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")
        return word.rjust(int(width)) if width else word
    return format(x, spec)


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[Column],
                   fmt: Callable[[Any], str] | None = None) -> str:
    """A Markdown table: one line per row, one column per (header, key or function of the row).

    Floats are written by :func:`number` (3 significant digits) unless ``fmt`` says
    otherwise; None as :data:`MISSING`.
    """
    def cell(value: Any) -> str:
        if fmt is not None:
            return fmt(value)
        if isinstance(value, bool):
            return "yes" if value else "no"
        if value is None or isinstance(value, float):
            return number(value)
        return str(value)

    def get(row: Mapping[str, Any], how: str | Callable[[Mapping[str, Any]], Any]) -> Any:
        return how(row) if callable(how) else row.get(how)

    lines = ["| " + " | ".join(h for h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(get(r, how)) for _, how in columns) + " |" for r in rows]
    return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    """Bytes in decimal units as seed 002 prints them: 1.05 MB, 134 MB, 2.15 GB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"
