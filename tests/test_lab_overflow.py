"""overflow (seed 004): thresholds, naive breaking points, the stress test, the README."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import flashmath as fm
from flashmath import dtypes
from flashmath.lab import overflow as ov
from flashmath.lab import runner
from flashmath.lab.experiment import Context, Result


@pytest.fixture(scope="module")
def result() -> Result:
    return ov.run(Context(name=ov.NAME, seed=0, quick=True))


def section(result: Result, name: str) -> list[dict[str, Any]]:
    return [r for r in result.records if r["section"] == name]


def test_protocol() -> None:
    assert (ov.NAME, ov.SEEDS) == ("overflow", ("004",))
    assert ov.SEQ_LENS == (32, 64, 128, 256) and ov.D_MODELS == (32, 64, 128)
    assert ov.QUICK_TRIALS < ov.TRIALS


def test_thresholds_for_every_dtype(result: Result) -> None:
    rows = section(result, "thresholds")
    assert [r["dtype"] for r in rows] == list(dtypes.DTYPES)
    for r in rows:
        assert r["overflow_found"] == float(fm.overflow_threshold(r["dtype"]))
        assert r["overflow_closed_form"] == math.log(float(dtypes.finfo(r["dtype"]).max))
        assert r["overflow_verified"] is True, r["dtype"]
        assert r["underflow_verified"] is not False, r["dtype"]
        assert abs(r["overflow_gap"]) <= r["overflow_step"], r["dtype"]
    by = {r["dtype"]: r for r in rows}
    assert by["float64"]["overflow_found"] == pytest.approx(709.78, abs=0.01)
    assert by["float16"]["overflow_found"] == 11.0859375
    assert by["float32"]["underflow_gap"] == pytest.approx(-math.log(2), abs=1e-3)


@pytest.mark.parametrize(("dtype", "m"), [("float64", 710), ("float32", 89), ("float16", 12),
                                           ("bfloat16", 89), ("float8_e4m3fn", 7)])
def test_naive_breaking_point(result: Result, dtype: str, m: int) -> None:
    r = {r["dtype"]: r for r in section(result, "breaking_point")}[dtype]
    assert r["break_at"] == m and r["agrees"]
    x = np.array([0.0, m, 0.0, 0.0]).astype(dtypes.DTYPES[dtype])
    before = np.array([0.0, m - 1, 0.0, 0.0]).astype(dtypes.DTYPES[dtype])
    assert not np.all(np.isfinite(fm.naive.softmax(x).astype(np.float64)))
    assert np.all(np.isfinite(fm.naive.softmax(before).astype(np.float64)))


def test_breaking_points_follow_the_thresholds(result: Result) -> None:
    for r in section(result, "breaking_point"):
        assert r["break_at"] is not None
        assert r["agrees"] or not r["zero_representable"], r["dtype"]


def test_stress_grid(result: Result) -> None:
    rows = section(result, "stress")
    grid = {(r["seq_len"], r["d_model"], r["scores"]) for r in rows}
    assert grid == {(s, d, k) for s in ov.SEQ_LENS for d in ov.D_MODELS
                    for k in ov.SCORE_KINDS}
    assert all(r["trials"] == ov.QUICK_TRIALS and r["dtype"] == "float16" for r in rows)
    by = {(r["seq_len"], r["d_model"], r["scores"]): r for r in rows}
    for s in ov.SEQ_LENS:
        for d in ov.D_MODELS:
            unscaled, scaled = by[(s, d, "unscaled")], by[(s, d, "scaled")]
            assert unscaled["mean_max_score"] > scaled["mean_max_score"]
            assert unscaled["failure_rate"] >= scaled["failure_rate"]
            # the seed's outlier K[5] = Q[10] * 3 gives a scaled score of about 3 sqrt(d) > 11
            assert by[(s, d, "scaled, outlier")]["failure_rate"] >= 0.8
    # the prediction is exact: max score above the threshold <=> exp overflowed in float16
    assert result.summary["prediction_matches"] == result.summary["stress_trials"]
    for r in rows:
        assert r["predicted_overflow_rate"] == r["naive_failure_rate"]
        assert r["mismatch_max_scores"] == []


def test_figures_and_readme(result: Result) -> None:
    assert set(result.figures) == {"exp_vs_dtype_max", "score_histograms"}
    hist = result.figures["score_histograms"].get_axes()
    assert any("float16 exp overflow" in t.get_text()
               for ax in hist for t in ax.get_legend().get_texts())
    for name in dtypes.DTYPES:
        assert f"| {name} |" in result.readme
    assert result.headline.startswith("exp overflows above 11.0859 (float16)")
    assert "scaled with the seed's outlier" in result.headline
    assert "The key's answer c) is wrong" in result.readme  # [0, nan, 0, 0], not all NaN
    assert "Only 1 of the 4 entries is NaN" in result.readme
    runner.dumps_json(result.records)


def test_reflections(result: Result) -> None:
    (built,) = section(result, "constructed")
    assert built["scaled_score"] == pytest.approx(built["closed_form"])
    assert built["naive_nan"] and built["scaled_score"] > built["threshold"]
    for r in section(result, "very_negative"):
        assert r["naive_nan_count"] == 4 and r["stable"] == pytest.approx([0.25] * 4)
    for r in section(result, "quiz_q3"):
        assert r["naive_nan_count"] == 1 and r["stable"] == pytest.approx([0, 1, 0, 0])
    (bw,) = section(result, "bandwidth")
    assert bw["kv_bytes"]["float64"] == 4 * bw["kv_bytes"]["bfloat16"]


def test_exp_figure_shows_every_series(result: Result) -> None:
    """Every dtype's threshold marker is drawn and distinguishable (marker or size), and no
    legend sits inside the axes over the points."""
    axes = result.figures["exp_vs_dtype_max"].get_axes()
    seen = {}
    for ax in axes:
        for line in ax.get_lines():
            label = line.get_label()
            if ":" in label:
                seen[label.split(":")[0]] = (line.get_marker(), line.get_markersize(),
                                             line.get_linestyle())
        legend = ax.get_legend()
        assert legend is not None
        # anchored below the axes (y < 0 in axes coordinates)
        assert legend.get_bbox_to_anchor().transformed(ax.transAxes.inverted()).y1 <= 0
    assert set(seen) == set(dtypes.DTYPES)
    assert len(set(seen.values())) == len(seen)


def test_max_lines_that_coincide_are_dashed_in_turn(result: Result) -> None:
    """Lines a few pixels apart (e4m3 and e4m3fnuz both at 240; float32, bfloat16 and
    e8m0fnu near 3e38) would print as one: each gets its own phase of one dash pattern."""
    from flashmath.lab import overflow

    rows = [{"dtype": "a", "finfo_max": 240.0}, {"dtype": "b", "finfo_max": 240.0},
            {"dtype": "c", "finfo_max": 448.0}]
    assert overflow._shared_lines(rows, tol=0.1) == {"a": (0, ["b"]), "b": (1, ["a"]),
                                                     "c": (0, [])}
    for ax in result.figures["exp_vs_dtype_max"].get_axes():
        flat = [ln for ln in ax.get_lines() if len(set(ln.get_ydata())) == 1
                and len(ln.get_ydata()) == 2]  # the axhlines
        by_y: dict[float, list[Any]] = {}
        for ln in flat:
            by_y.setdefault(round(float(ln.get_ydata()[0]), 6), []).append(ln)
        for lines in by_y.values():
            if len(lines) > 1:  # same y: the dash phases differ, so every colour shows
                phases = {ln._dash_pattern[0] for ln in lines}
                assert len(phases) == len(lines)


def test_quick_and_full_differ_only_in_trials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ov, "SEQ_LENS", (32,))
    monkeypatch.setattr(ov, "D_MODELS", (32,))
    monkeypatch.setattr(ov, "HISTOGRAM_CONFIG", (32, 32))
    full = ov.run(Context(name=ov.NAME, seed=3, quick=False))
    again = ov.run(Context(name=ov.NAME, seed=3, quick=False))
    assert {r["trials"] for r in section(full, "stress")} == {ov.TRIALS}
    assert runner.dumps_json(full.records) == runner.dumps_json(again.records)
