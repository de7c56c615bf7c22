"""The sdpa-benchmark lab experiment: without a CUDA device it says so, at once, and never fails."""

from __future__ import annotations

import json
import time

import pytest

from flashmath.lab import registry, sdpa_benchmark
from flashmath.lab.experiment import Context, Result


def test_registered_under_its_name():
    assert "sdpa_benchmark" in registry.EXPERIMENT_MODULES
    assert sdpa_benchmark.NAME == "sdpa-benchmark" and sdpa_benchmark.SEEDS == ("002",)


def test_without_cuda_it_is_skipped_quickly_and_says_so(monkeypatch):
    from flashmath.lab.experiment import Skipped

    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    start = time.perf_counter()
    with pytest.raises(Skipped, match="skipped: no CUDA device; nothing was measured"):
        sdpa_benchmark.run(Context(name=sdpa_benchmark.NAME, quick=True))
    assert time.perf_counter() - start < 1.0


def test_the_run_marks_it_skipped_and_report_says_why(monkeypatch, tmp_path):
    from flashmath.lab import runner

    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    outcome = runner.run_lab(tmp_path, only=["sdpa-benchmark"], progress=False)
    assert outcome.statuses["sdpa-benchmark"] == "skipped"
    report = (outcome.run_dir / "report.md").read_text()
    assert "no CUDA device" in report
    assert "Reason: no CUDA device" in report and "skipped: no CUDA" not in report
    manifest = json.loads((outcome.run_dir / "manifest.json").read_text())
    (entry,) = [e for e in manifest["experiments"] if e["name"] == "sdpa-benchmark"]
    assert entry["reason"].startswith("skipped: no CUDA device")


def test_without_torch_it_is_skipped(monkeypatch):
    import sys

    from flashmath.lab.experiment import Skipped

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(Skipped, match=r"skipped: no CUDA device.*pip install 'flashmath\[gpu\]'"):
        sdpa_benchmark.run(Context(name=sdpa_benchmark.NAME))


@pytest.mark.gpu
def test_quick_run_on_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("triton")
    result = sdpa_benchmark.run(Context(name=sdpa_benchmark.NAME, quick=True))
    assert isinstance(result, Result) and "## The questions, answered" in result.readme
    assert result.summary["status"] == "measured" and result.records
    assert all(r["flashmath_tflops"] for r in result.records)
    assert "| float16 |" in result.readme


def test_the_no_gpu_wording_lives_below_both_users():
    """The lab and flashmath.triton.bench share measure.gpu's wording; neither imports the
    other (triton/bench used to import the lab for it)."""
    import ast
    from pathlib import Path

    from flashmath.measure import gpu

    assert sdpa_benchmark.SKIPPED is gpu.SKIPPED == "skipped: no CUDA device"
    root = Path(gpu.__file__).resolve().parent.parent
    tree = ast.parse((root / "triton" / "bench.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m and m.startswith("flashmath.lab") for m in imported), imported
