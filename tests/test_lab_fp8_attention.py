"""fp8-attention: FlashAttention-3's FP8 accuracy table and the P cast under a sink, measured."""

from __future__ import annotations

import pytest

from flashmath.lab import fp8_attention, registry
from flashmath.lab.experiment import Context, Result, strip_volatile
from flashmath.lab.runner import dumps_json


@pytest.fixture(scope="module")
def quick() -> Result:
    return fp8_attention.run(Context(name=fp8_attention.NAME, quick=True))


def test_registered() -> None:
    assert "fp8_attention" in registry.EXPERIMENT_MODULES
    assert registry.experiments()["fp8-attention"] is fp8_attention


def test_summary_keys_and_ratio(quick: Result) -> None:
    s = quick.summary
    assert s["fp8_error_ratio"] == pytest.approx(
        s["rmse_fp8_per_tensor"] / s["rmse_fp8_block_hadamard"])
    assert s["paper_fp8_error_ratio"] == pytest.approx(2.4e-2 / 9.1e-3)
    assert s["plot"] == "fp8_rmse.png" and "fp8_rmse" in quick.figures
    assert {(r["setup"], r["config"]) for r in s["table"]} == {
        (setup, c) for setup in ("outliers", "control") for c in fp8_attention.LABELS}


def test_measured_figures_are_fp8_sized_and_ordered(quick: Result) -> None:
    rows = {(r["setup"], r["config"]): r for r in quick.records if r["section"] == "table"}
    for setup in ("outliers", "control"):
        fp16 = rows[(setup, "fp16")]["rmse"]
        for c in fp8_attention.CONFIGS:
            assert 10 * fp16 < rows[(setup, c)]["rmse"] < 0.05  # e4m3: ~2^-4 relative casts
    # outliers make FP8 worse, and the Hadamard transform takes back part of it
    assert rows[("outliers", "fp8_per_tensor")]["rmse"] > rows[("control", "fp8_per_tensor")][
        "rmse"]
    assert quick.summary["fp8_error_ratio"] > 1.1
    # the transform spreads the outliers: the largest |entry| of Q and K falls
    r = rows[("outliers", "fp8_per_tensor")]
    assert r["amax_qk_hadamard"] < r["amax_qk"] / 3


def test_sink_underflow_and_its_fix(quick: Result) -> None:
    sink = [r for r in quick.records if r["section"] == "sink"]
    by = {(r["delta"], r["order"], r["p_scale"]): r for r in sink}
    strong = max(r["delta"] for r in sink)
    assert by[(strong, "forward", 1.0)]["flushed_share"] > 0.1
    # counted in each order's own tiles: reverse meets the sink last and flushes far less
    assert (by[(strong, "reverse", 1.0)]["flushed_share"]
            < by[(strong, "forward", 1.0)]["flushed_share"] / 2)
    assert by[(strong, "reverse", 256.0)]["flushed_share"] < 0.01
    assert by[(strong, "reverse", 256.0)]["mse_gain_vs_forward_1"] > 1.5
    assert by[(0, "reverse", 256.0)]["mse_gain_vs_forward_1"] == pytest.approx(1.0, abs=0.1)


def test_readme_compares_with_the_paper(quick: Result) -> None:
    text = quick.readme
    assert text.startswith("# fp8-attention (beyond the seed labs)")
    assert "Where and why the figures differ" in text
    assert f"{quick.summary['fp8_error_ratio']:.3g}x lower here" in text
    assert f"the paper's {quick.summary['paper_fp8_error_ratio']:.3g}x" in text
    assert "![fp8_rmse](fp8_rmse.png)" in text


def test_same_seed_same_results(quick: Result) -> None:
    again = fp8_attention.run(Context(name=fp8_attention.NAME, quick=True))
    assert dumps_json(strip_volatile(again.records)) == dumps_json(strip_volatile(quick.records))
    assert again.readme == quick.readme


def test_figure_shows_every_series(quick: Result) -> None:
    bars, sink = quick.figures["fp8_rmse"].get_axes()
    lines = [ln for ln in sink.get_lines() if ln.get_label().endswith(("1", "256"))]
    assert len(lines) == len(fp8_attention.SINK_VARIANTS)
    # coinciding variants stay apart: each has its own marker, size and dash pattern
    assert len({(ln.get_marker(), ln.get_markersize(), ln.get_linestyle()) for ln in lines}) == 4
    assert len(bars.patches) == 2 * len(fp8_attention.LABELS)
