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
