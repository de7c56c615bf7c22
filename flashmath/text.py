"""Markdown tables for experiment READMEs, built from the records an experiment measured."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = ["fmt_bytes", "markdown_table"]

Column = tuple[str, str | Callable[[Mapping[str, Any]], Any]]


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[Column],
                   fmt: Callable[[Any], str] | None = None) -> str:
    """A Markdown table: one line per row, one column per (header, key or function of the row).

    Floats are written with 3 significant digits unless ``fmt`` says otherwise; None as "—".
    """
    def cell(value: Any) -> str:
        if fmt is not None:
            return fmt(value)
        if value is None:
            return "—"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:.3g}"
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
