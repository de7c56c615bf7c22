"""Every experiment README: opens with its seed questions, in order, answered; every number
it quotes is one results.json holds, to the precision printed (nothing typed by hand).

One quick run of the whole lab (module fixture) feeds every check.
"""

from __future__ import annotations

import bisect
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from flashmath.lab import readme, registry, runner, seeds

#: Integers up to this are structure (question numbers, "1/sqrt(d)", "2 x"), not measurements.
SMALL_INT = 16
#: Units a README may print a results.json value in (bytes, seconds): factor to the unit.
UNITS = {"KB": 1e3, "kB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2.0**10, "MiB": 2.0**20,
         "GiB": 2.0**30, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "GbE": 1e9 / 8,
         "GB/s": 1e9, "TB/s": 1e12, "GFLOP/s": 1e9, "TFLOP/s": 1e12}
_NUMBER = re.compile(
    r"(?<![\w.^/\[])(?P<num>\d+(?:\.\d+)?(?:e[+-]?\d+)?)"
    r"(?P<unit>%|x\b| ?(?:GB/s|TB/s|GFLOP/s|TFLOP/s|GbE|KB|kB|MB|GB|KiB|MiB|GiB|ms|us|µs)"
    r"(?![\w/]))?(?![\w.]*\d)")


def numbers_in(text: str) -> list[tuple[str, str]]:
    """(token, unit) for each number of a README outside blockquotes and links' targets."""
    out = []
    for line in text.splitlines():
        if line.lstrip().startswith(">"):
            continue  # a quoted seed question
        line = re.sub(r"\]\([^)]*\)", "]", line)  # link targets are file names
        line = re.sub(r"`[^`]*`", "", line)  # code: names, not numbers
        out += [(m["num"], (m["unit"] or "").strip()) for m in _NUMBER.finditer(line)]
    return out


def values_in(obj: Any) -> list[float]:
    """Every number (not bool) anywhere in a JSON value, as abs floats."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [abs(float(obj))]
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in values_in(x)]
    if isinstance(obj, list):
        return [v for x in obj for v in values_in(x)]
    return []


def _tolerance(token: str) -> tuple[float, float]:
    """(value, half a unit of the last printed digit)."""
    mantissa, _, exp = token.partition("e")
    decimals = len(mantissa.partition(".")[2])
    e = int(exp) if exp else 0
    value = min(float(token), sys.float_info.max)  # "1.798e+308" parses as inf
    return value, 0.5 * 10.0 ** (e - decimals) * (1 + 1e-9)


def unmatched(text: str, pool: list[float]) -> list[str]:
    """The README's numbers that no results.json value rounds to."""
    pool = sorted(pool)
    missing = []
    for token, unit in numbers_in(text):
        value, tol = _tolerance(token)
        if unit == "" and "." not in token and "e" not in token and value <= SMALL_INT:
            continue
        targets = [(value, tol)]
        if unit == "%":
            targets.append((value / 100, tol / 100))
        if unit in UNITS:
            targets.append((value * UNITS[unit], tol * UNITS[unit]))
        if not any(_hit(pool, v, t) for v, t in targets):
            missing.append(token + unit)
    return missing


def _hit(pool: list[float], value: float, tol: float) -> bool:
    i = bisect.bisect_left(pool, value - tol)
    return i < len(pool) and pool[i] <= value + tol


def test_checker_finds_a_hand_typed_number() -> None:
    pool = values_in({"a": 0.0123456, "b": [2.5e-7, 1010.4], "c": True, "d": "88.7"})
    text = ("err 0.0123, 2.5e-07 and 1.01e+03 tokens; 12% of it, 1.01 KB.\n"
            "> the seed says 88.7\n")
    assert unmatched(text, pool) == ["12%"]
    assert unmatched("typed 88.7 by hand and 0.0124", pool) == ["88.7", "0.0124"]
    assert unmatched("float16, e4m3, p[0], 2^-10, `x = 99.5`, [f](a_99.png), 3 x", pool) == []


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lab")
    outcome = runner.run_lab(out, quick=True, seed=42, progress=False)
    assert outcome.exit_code == 0, outcome.statuses
    return outcome.run_dir


def _ran(run_dir: Path) -> list[str]:
    return [name for name in registry.experiments() if (run_dir / name / "README.md").exists()]


def test_every_registered_experiment_has_questions() -> None:
    assert set(registry.experiments()) <= set(seeds.QUESTIONS)


def test_readmes_open_with_their_questions_in_order(lab_run: Path) -> None:
    for name in _ran(lab_run):
        text = (lab_run / name / "README.md").read_text()
        first = text.index("## ")
        assert text[first:].startswith("## The questions, answered"), name
        at = 0
        for q in seeds.questions(name):
            at = text.index(f"> {q.text}", at)  # raises if missing or out of order


def test_every_number_in_a_readme_is_in_results_json(lab_run: Path) -> None:
    problems = {}
    for name in _ran(lab_run):
        text = (lab_run / name / "README.md").read_text()
        pool = values_in(json.loads((lab_run / name / "results.json").read_text()))
        missing = unmatched(text, pool)
        if missing:
            problems[name] = missing
    assert not problems, problems


def test_render_needs_one_answer_per_question() -> None:
    qs = seeds.questions("hbm-traffic")
    text = readme.render("hbm-traffic", ("002",), "headline", ["the answer"] * len(qs),
                         [("Table", ["| a |", "|---|"])])
    assert text.startswith("# hbm-traffic (seed lab 002; see docs/seeds.md)\n\nheadline.\n")
    assert f"> {qs[0].text}" in text and "## Table" in text
    with pytest.raises(ValueError, match="questions but"):
        readme.render("hbm-traffic", ("002",), "h", [])


def test_docs_seeds_lists_every_question() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "seeds.md").read_text()
    for name, qs in seeds.QUESTIONS.items():
        assert f"`{name}`" in docs, name
        for q in qs:
            assert q.text in docs, (name, q.text)
    for lab, title in seeds.LABS.items():
        assert f"seed {lab}" in docs.lower() and title in docs


def test_lab_sources_point_nowhere_outside_the_repository() -> None:
    root = Path(__file__).resolve().parents[1] / "flashmath" / "lab"
    outside = "|".join(["DESIGN" + r"\.md", r"\.\." + "/shared", "shared" + "/seeds",
                        r"seed 00\d, Block"])  # spelled in pieces: this file points nowhere
    bad = re.compile(outside, re.IGNORECASE)
    hits = [f"{p.name}:{i}" for p in root.glob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert not hits, hits

