"""The README's tour shows real output: running its code prints exactly what it shows."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_tour_output_is_what_the_code_prints() -> None:
    tour = README.read_text().split("## A tour", 1)[1]
    code, shown = re.findall(r"```(?:python)?\n(.*?)```", tour, flags=re.S)[:2]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README tour", "exec"), {})
    assert printed.getvalue() == shown


def test_generated_figures_are_the_measured_ones() -> None:
    """Every figure block in the README is its docs/figures source, verbatim (the sources
    are written by the benchmarks and scripts/readme.py, each naming its machine)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_script",
                                                  README.parent / "scripts" / "readme.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = README.read_text()
    assert mod.BLOCK.search(text), "no generated blocks found"
    _, stale = mod.render(text)
    assert stale == [], f"stale README blocks {stale}: run python scripts/readme.py"


def test_use_it_in_your_model_runs_as_written() -> None:
    import pytest

    pytest.importorskip("transformers")
    section = README.read_text().split("## Use it in your model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    for code in blocks:
        exec(compile(code, "README: Use it in your model", "exec"), {})
