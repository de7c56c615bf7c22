"""report.md: one page that links every experiment's README, results and plots.

Rendered from the manifest alone (``render_report``), so the runner can rewrite it after
every experiment and the page always matches manifest.json.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flashmath.lab.experiment import Result

__all__ = ["fmt_value", "headline_of", "render_report"]

_STATUS_ORDER = ("ok", "failed", "interrupted", "skipped", "running", "pending")


def headline_of(result: Result, limit: int = 480) -> str:
    """One line for report.md: ``result.headline``, else ``summary["headline"]``, else the
    README's first line of prose (headings, tables, lists and code skipped).

    Whitespace is collapsed. A headline is kept whole up to ``limit`` characters (the report's
    table cell wraps it); a longer one is cut at the last word boundary before the limit and
    ends in "…", never mid-word or mid-number.
    """
    text = result.headline or result.summary.get("headline") or ""
    if not text:
        in_code = False
        for line in result.readme.splitlines():
            stripped = line.strip()
            if stripped.startswith("```"):
                in_code = not in_code
                continue
            if in_code or not stripped or stripped[0] in "#|-*>!<":
                continue
            text = stripped
            break
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip(" ,;:") + "…"


def fmt_value(v: Any) -> str:
    """A measured value as README tables and sentences show it.

    None "–", bools "yes"/"no", strings as they are, NaN/inf spelled out, integral floats
    below 1e6 as integers, 6 significant digits in [1e-3, 1e5), else 4 in e-notation;
    lists and arrays element by element in brackets.
    """
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple, np.ndarray)):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    f = float(v)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    if f == int(f) and abs(f) < 1e6:
        return str(int(f))
    return f"{f:.6g}" if 1e-3 <= abs(f) < 1e5 else f"{f:.4g}"


def _cell(text: Any) -> str:
    return str(text).replace("|", r"\|").replace("\n", " ")


def _seconds(entry: dict[str, Any]) -> str:
    value = entry.get("duration_s")
    return "" if value is None else f"{value:.2f} s"


def _counts(entries: list[dict[str, Any]]) -> str:
    counts = {s: sum(e["status"] == s for e in entries) for s in _STATUS_ORDER}
    return " · ".join(f"{n} {s}" for s, n in counts.items() if n) or "no experiments"


def _versions(manifest: dict[str, Any]) -> str:
    versions = manifest.get("versions") or {}
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v)


def _git(manifest: dict[str, Any]) -> str:
    git = manifest.get("git")
    if not git:
        return "not a git checkout"
    return f"`{git['commit'][:12]}`" + (" (uncommitted changes)" if git.get("dirty") else "")


def render_report(manifest: dict[str, Any]) -> str:
    """The Markdown of report.md for the run described by ``manifest``."""
    entries: list[dict[str, Any]] = manifest["experiments"]
    machine = manifest.get("machine") or {}
    lines = [
        f"# flashmath lab: run `{manifest['run_id']}`",
        "",
        f"**{manifest['status']}**: {_counts(entries)}. "
        f"Seed {manifest['seed']}, {'quick' if manifest.get('quick') else 'full'} mode.",
        "",
        "| | |",
        "|---|---|",
        f"| started | {manifest.get('started_at')} |",
        f"| ended | {manifest.get('ended_at') or '(still running)'} |",
        f"| source | {_git(manifest)} |",
        f"| versions | {_cell(_versions(manifest))} |",
        f"| machine | {_cell(machine.get('platform'))}, {machine.get('cpu_count')} CPUs |",
        "| files | [manifest.json](manifest.json) |",
        "",
        "| experiment | status | time | headline |",
        "|---|---|---|---|",
    ]
    for e in entries:
        name = e["name"]
        link = f"[{name}]({name}/README.md)" if "README.md" in e.get("files", ()) else name
        lines.append(f"| {link} | {e['status']} | {_seconds(e)} | {_cell(_line_of(e))} |")
    for e in entries:
        lines += ["", *_section(e)]
    return "\n".join(lines) + "\n"


def _line_of(entry: dict[str, Any]) -> str:
    """The short status line of an experiment: its headline, error or reason."""
    if entry["status"] == "ok":
        return str(entry.get("headline", ""))
    if entry["status"] == "failed":
        err = entry.get("error") or {}
        return f"{err.get('type')}: {err.get('message')}"
    return _reason(entry)


def _reason(entry: dict[str, Any]) -> str:
    """The entry's reason, without a leading "skipped: " beside a status that says so."""
    reason = str(entry.get("reason", ""))
    prefix = f"{entry['status']}: "
    return reason[len(prefix):] if reason.lower().startswith(prefix) else reason


def _section(entry: dict[str, Any]) -> list[str]:
    name, status = entry["name"], entry["status"]
    seeds = ", ".join(entry.get("seeds", [])) or "none"
    out = [f"## {name}: {entry.get('title', '')}", "",
           f"Status **{status}**{' in ' + _seconds(entry) if _seconds(entry) else ''}. "
           f"Seed labs: {seeds}.", ""]
    files = entry.get("files", [])
    if status == "ok":
        out += [str(entry.get("headline", "")), ""]
        links = [f"[{f}]({name}/{f})" for f in files if not f.endswith(".png")]
        out.append("Files: " + " · ".join(links))
        for f in (f for f in files if f.endswith(".png")):
            out += ["", f"![{f}]({name}/{f})"]
    elif status == "failed":
        err = entry.get("error") or {}
        out.append(f"`{err.get('type')}`: {_cell(err.get('message'))}. "
                   f"Traceback: [{err.get('traceback')}]({err.get('traceback')}).")
    elif entry.get("reason"):
        out.append(f"Reason: {_reason(entry)}.")
    return out
