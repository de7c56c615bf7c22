"""softmax-stability (seed 001): the battery, the oracle, the diagnosis, the README."""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import pytest

from flashmath import dtypes
from flashmath.lab import runner
from flashmath.lab import softmax_stability as ss
from flashmath.lab.experiment import Context, Result

SEED_CASES = ["small magnitudes", "mixed magnitudes", "large positive", "large negative",
              "all identical", "masked entry", "single element", "verb vocabulary"]


@pytest.fixture(scope="module")
def result() -> Result:
    return ss.run(Context(name=ss.NAME, seed=0, quick=True))


def battery(result: Result) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["case"], r["dtype"]): r for r in result.records if r["section"] == "battery"}


def test_protocol() -> None:
    assert (ss.NAME, ss.SEEDS) == ("softmax-stability", ("001",))
    assert [c for c, _ in ss.CASES] == SEED_CASES
    assert ss.BATTERY_DTYPES[0] == "float32"


def test_every_case_in_every_dtype(result: Result) -> None:
    assert set(battery(result)) == {(c, d) for c in SEED_CASES for d in ss.BATTERY_DTYPES}
    assert result.records[0]["oracle_source"] == "mpmath, 50 digits"
    runner.dumps_json(result.records)  # everything is writable


def test_stable_never_nan_and_within_bound(result: Result) -> None:
    for r in battery(result).values():
        assert not r["stable_nan"] and not r["stable_inf"], r["case"]
        assert r["stable_err"] <= ss.DIVERGE_EPS * float(dtypes.finfo(r["dtype"]).eps)
        assert not r["stable_diverged"]
        assert r["stable_sum"] == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize(("case", "dtype", "nan", "mechanism"), [
    ("large positive", "float32", True, "overflow: exp(92) = inf"),
    ("large positive", "float16", True, "overflow"),
    ("large positive", "bfloat16", True, "overflow"),
    ("large negative", "float32", False, None),      # exp(-100) is a float32 subnormal
    ("large negative", "float16", True, "underflow: every exp(x) rounds to 0"),
    ("single element", "float16", True, "overflow: exp(42) = inf"),
    ("single element", "float32", False, None),
    ("verb vocabulary", "bfloat16", False, "accumulation: the bfloat16 sum of exp(x) is 256"),
    ("small magnitudes", "float32", False, None),
])
def test_naive_breaks_where_the_arithmetic_says(
    result: Result, case: str, dtype: str, nan: bool, mechanism: str | None
) -> None:
    r = battery(result)[(case, dtype)]
    assert r["naive_nan"] is nan
    if mechanism is None:
        assert r["naive_mechanism"] is None and not r["naive_diverged"]
    else:
        assert r["naive_mechanism"].startswith(mechanism) and r["naive_diverged"]


def test_cross_entropy_against_the_oracle(result: Result) -> None:
    b = battery(result)
    assert b[("large negative", "float32")]["oracle_ce"] == 100.0
    assert b[("large negative", "float32")]["stable_ce"] == pytest.approx(100.0, rel=1e-6)
    assert b[("large negative", "float32")]["naive_ce"] == math.inf  # p[1] underflowed to 0
    exact = math.log1p(sum(math.exp(v - 92.0) for v in (1.0, 3.0, 0.0, 2.0)))
    assert b[("large positive", "float32")]["oracle_ce"] == pytest.approx(exact, rel=1e-12)
    for dtype in ss.BATTERY_DTYPES:
        masked = b[("masked entry", dtype)]
        assert masked["oracle_ce"] == masked["stable_ce"] == masked["naive_ce"] == math.inf


def test_single_element_cross_entropy_is_undefined_not_a_crash(result: Result) -> None:
    for dtype in ss.BATTERY_DTYPES:
        r = battery(result)[("single element", dtype)]
        assert r["oracle_ce"] is None and r["stable_ce"] is None and r["naive_ce"] is None
        assert "labels" in r["stable_ce_undefined"] and "[1]" in r["stable_ce_undefined"]
        assert r["naive_ce_undefined"]


def test_scipy_cross_check(result: Result) -> None:
    rows = [r for r in result.records if r["section"] == "float64"]
    assert [r["case"] for r in rows] == SEED_CASES
    for r in rows:
        assert r["scipy_softmax_max_abs_diff"] <= 1e-15
        assert r["scipy_logsumexp_max_abs_diff"] <= 1e-13  # a few ulps of |logsumexp| <= 92
        assert r["scipy_log_softmax_max_abs_diff"] <= 1e-13
        assert r["stable_err"] <= 1e-15
    assert result.summary["scipy_note"] is None


def test_readme_is_generated_from_the_records(result: Result) -> None:
    readme = result.readme
    diverged = [r for r in result.records if r.get("naive_diverged")]
    assert diverged
    for r in diverged:
        assert f"**{r['case']}, {r['dtype']}**" in readme
        assert r["naive_mechanism"] in readme
    for r in battery(result).values():
        if not r["naive_diverged"]:
            assert f"**{r['case']}, {r['dtype']}**" not in readme
    assert "Block D of seed 001" in readme and "softmax_break.png" in readme
    # the seed's CE guesses are read against the label they belong to
    assert "~91 is the loss of label 0: logsumexp(x) - x[0] = 92 - (1) = 91" in readme
    assert "logsumexp(x) = x[1] + 3.459e-39 (printed as 92" in readme  # not "92 - (92)"
    assert "92 - (92)" not in readme
    assert "the guess is a rough estimate" in readme  # small magnitudes: ~1.5 by hand
    assert "float32 falls short of the seed's 2 cases" in readme
    assert "flashmath returns zeros (and logsumexp -inf)" in readme
    assert "stable, empty='uniform' gives [0.2, 0.2, 0.2, 0.2, 0.2]" in readme
    assert "cancels; choosing c = max(x)" in readme
    assert result.headline.startswith("naive softmax gives NaN in 1/8 float32")


def test_heatmap(result: Result) -> None:
    fig = result.figures["softmax_break"]
    axes = fig.get_axes()
    titles = [ax.get_title() for ax in axes]
    for dtype in ss.BATTERY_DTYPES:
        assert f"naive softmax, {dtype}" in titles and f"stable softmax, {dtype}" in titles
    naive32 = axes[titles.index("naive softmax, float32")]
    assert "NaN" in [t.get_text() for t in naive32.texts]


def test_oracle_falls_back_without_mpmath(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mpmath", None)  # import mpmath -> ImportError
    probs, lse, ce, source = ss._oracle(np.array([1.0, 92.0, 3.0, 0.0, 2.0]))
    assert "mpmath not installed" in source
    assert probs[1] == pytest.approx(1.0) and lse == pytest.approx(92.0)
    assert ce == pytest.approx(0.0, abs=1e-12)


def test_deterministic() -> None:
    a = ss.run(Context(name=ss.NAME, seed=1, quick=True))
    b = ss.run(Context(name=ss.NAME, seed=1, quick=True))
    assert runner.dumps_json(a.records) == runner.dumps_json(b.records)
    assert a.readme == b.readme


def test_runs_without_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy -> ImportError
    res = ss.run(Context(name=ss.NAME, quick=True))
    rows = [r for r in res.records if r["section"] == "float64"]
    assert len(rows) == len(SEED_CASES)
    assert all(r["scipy_softmax_max_abs_diff"] is None and r["stable_err"] <= 1e-15
               for r in rows)
    assert "scipy is not installed" in res.readme and res.summary["scipy_max_abs_diff"] is None
