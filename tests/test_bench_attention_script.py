"""benchmarks/bench_attention.py: runs at a tiny shape and writes the Markdown table it
prints, naming the machine (no timing is asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from flashmath.attention import schedule

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("bench_attention",
                                                  ROOT / "benchmarks" / "bench_attention.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_writes_the_table_with_the_machine(tmp_path, monkeypatch, capsys):
    mod = _script()
    monkeypatch.setattr(mod, "SHAPES", {"tiny": (1, 3, 128, 8)})
    monkeypatch.setattr(mod.cpu, "peak_memory", lambda s, **kw: {
        "peak_bytes": 2**20, "scores_bytes": 64 * 2**20, "peak_fraction": 1 / 64})
    target = tmp_path / "attention-cpu.md"
    assert mod.main(["--shapes", "tiny", "--repeat", "1", "--write", str(target)]) == 0
    text = target.read_text()
    info = mod.machine()
    assert info["cpu"] in text and f"{info['cores']} cores" in text and "NumPy" in text
    assert text.count("| B=1 H=3 S=128 D=8 |") == 2  # causal and not
    assert "1.56%" in text and "Regenerate: `python benchmarks/bench_attention.py" in text
    assert "| B=1 H=3 S=128 D=8 |" in capsys.readouterr().out
    assert "the fast float32 loops these sizes take" in text
    assert schedule.FORCE_FAST is None  # --path auto leaves the choice to the call


def test_rejects_zero_rounds():
    with pytest.raises(SystemExit):
        _script().main(["--repeat", "0"])
