"""Specification of flashmath.softmax.safety: exact exp overflow/underflow thresholds per dtype
(seed 004), checked against their definition, an enumeration, and the closed forms."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import mpmath
import numpy as np
import pytest

import flashmath as fm
from flashmath.dtypes import DTYPES, finfo
from flashmath.softmax.safety import overflow_closed_form, underflow_closed_form

SMALL = [name for name, dt in DTYPES.items() if dt.itemsize <= 2]
SIGNED = [name for name in DTYPES if name != "float8_e8m0fnu"]

# The thresholds, as the dtype holds them: (overflow, underflow).
THRESHOLDS = [
    ("float64", 709.782712893384, -745.1332191019411),
    ("float32", 88.72283172607422, -103.97207641601562),
    ("float16", 11.0859375, -17.328125),
    ("bfloat16", 88.5, -92.5),
    ("float8_e3m4", 2.75, -4.75),
    ("float8_e4m3", 5.5, -6.5),
    ("float8_e4m3b11fnuz", 3.25, -9.0),
    ("float8_e4m3fn", 6.0, -6.5),
    ("float8_e4m3fnuz", 5.5, -7.5),
    ("float8_e5m2", 10.0, -10.0),
    ("float8_e5m2fnuz", 10.0, -12.0),
    ("float8_e8m0fnu", 64.0, 2.0**-127),  # no negatives: its smallest value (docstring)
]


def exp_in(x: Any, dt: np.dtype) -> float:  # type: ignore[type-arg]
    with np.errstate(all="ignore"):
        return float(np.exp(np.asarray(x, dtype=dt)))


def step(x: Any, dt: np.dtype, up: bool) -> Any:  # type: ignore[type-arg]
    """The dtype's next value above (up) or below ``x``: the bit pattern one step on."""
    if dt in (np.float64, np.float32):
        return np.nextafter(np.asarray(x, dt), np.asarray(np.inf if up else -np.inf, dt))
    values = all_values(dt)
    i = int(np.searchsorted(values.astype(np.float64), float(x)))
    return values[i + 1] if up else values[i - 1]


def all_values(dt: np.dtype) -> np.ndarray:  # type: ignore[type-arg]
    """Every finite value of an 8- or 16-bit dtype, sorted, without duplicates (+0/-0)."""
    uint = {1: np.uint8, 2: np.uint16}[dt.itemsize]
    v = np.arange(2 ** (8 * dt.itemsize), dtype=np.uint32).astype(uint).view(dt)
    with np.errstate(invalid="ignore"):  # NaN patterns
        v64 = v.astype(np.float64)
    keep = np.isfinite(v64)
    _, first = np.unique(v64[keep], return_index=True)
    return v[keep][first]


@pytest.mark.parametrize(("name", "over", "under"), THRESHOLDS)
def test_thresholds_table(name: str, over: float, under: float) -> None:
    dt = DTYPES[name]
    assert fm.overflow_threshold(name).dtype == dt
    assert float(fm.overflow_threshold(name)) == over
    assert float(fm.underflow_threshold(name)) == under


@pytest.mark.parametrize("name", list(DTYPES))
def test_overflow_threshold_is_the_last_value_with_finite_exp(name: str) -> None:
    dt = DTYPES[name]
    t = fm.overflow_threshold(dt)
    assert math.isfinite(exp_in(t, dt))
    assert not math.isfinite(exp_in(step(t, dt, up=True), dt))


@pytest.mark.parametrize("name", SIGNED)
def test_underflow_threshold_is_the_last_value_with_positive_exp(name: str) -> None:
    dt = DTYPES[name]
    u = fm.underflow_threshold(dt)
    assert exp_in(u, dt) > 0
    assert exp_in(step(u, dt, up=False), dt) == 0


@pytest.mark.parametrize("name", SMALL)
def test_bisection_equals_enumerating_every_value(name: str) -> None:
    dt = DTYPES[name]
    values = all_values(dt)
    with np.errstate(all="ignore"):
        e = np.exp(values).astype(np.float64)
    finite = np.isfinite(e)
    assert float(fm.overflow_threshold(dt)) == float(values[finite][-1])
    assert float(fm.underflow_threshold(dt)) == float(values[finite & (e > 0)][0])
    # exp in the dtype is monotone, which the bisection relies on:
    assert (np.diff(np.where(finite, e, np.inf)[finite]) >= 0).all()


def exact_log(x: Any) -> Any:
    with mpmath.workdps(50):
        return mpmath.log(x)


@pytest.mark.parametrize("name", SIGNED)
def test_thresholds_against_the_rounding_closed_forms(name: str) -> None:
    """exp(x) stays finite while it rounds to at most max: exact exp(x) < max + ulp/2;
    and positive while it rounds to at least the smallest subnormal s: exp(x) > s/2."""
    dt = DTYPES[name]
    info = finfo(dt)
    big = mpmath.mpf(float(info.max))
    ulp = big - mpmath.mpf(float(step(info.max, dt, up=False)))
    t = fm.overflow_threshold(dt)
    edge = exact_log(big + ulp / 2)
    assert mpmath.mpf(float(t)) <= edge < mpmath.mpf(float(step(t, dt, up=True)))
    u = fm.underflow_threshold(dt)
    low = exact_log(mpmath.mpf(float(info.smallest_subnormal)) / 2)
    assert mpmath.mpf(float(step(u, dt, up=False))) <= low < mpmath.mpf(float(u))


@pytest.mark.parametrize("name", list(DTYPES))
def test_closed_form_log_max_is_within_one_step_of_the_threshold(name: str) -> None:
    dt = DTYPES[name]
    t = fm.overflow_threshold(dt)
    closed = overflow_closed_form(dt)
    assert closed == math.log(float(finfo(dt).max))
    assert float(step(t, dt, up=False)) < closed < float(step(t, dt, up=True))


@pytest.mark.parametrize(
    ("name", "over", "under"),
    [
        ("float64", 709.782712893384, -744.4400719213812),
        ("float32", 88.72283905206835, -103.27892990343184),
        ("float16", 11.089866488461016, -16.635532333438686),
        ("float8_e4m3fn", 6.104793232414985, -6.238324625039508),
    ],
)
def test_closed_forms(name: str, over: float, under: float) -> None:
    assert overflow_closed_form(name) == pytest.approx(over, rel=1e-15)
    assert underflow_closed_form(name) == pytest.approx(under, rel=1e-15)


def test_float64_underflow_sits_log2_below_log_of_the_smallest_subnormal() -> None:
    gap = underflow_closed_form("float64") - float(fm.underflow_threshold("float64"))
    assert gap == pytest.approx(math.log(2), abs=1e-12)


@pytest.mark.parametrize("dtype", ["fp16", "half", "float16", np.float16, np.dtype("float16")])
def test_dtype_names_and_dtypes_are_accepted(dtype: Any) -> None:
    assert fm.overflow_threshold(dtype) == np.float16(11.0859375)
    assert fm.analyze_softmax_safety(np.zeros(2), dtype).dtype == "float16"


@pytest.mark.parametrize("dtype", ["float128", "int32", np.int64, np.complex64])
def test_unsupported_dtype_is_a_type_error(dtype: Any) -> None:
    with pytest.raises(TypeError, match="dtype"):
        fm.overflow_threshold(dtype)


# --------------------------------------------------------------------------------------
# analyze_softmax_safety: the prediction beside what the naive softmax did.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "dtype", "will_overflow", "count", "has_inf", "has_nan"),
    [
        ([[1.0, 2.0, 3.0, 4.0]], "float32", False, 0, False, False),
        ([[1.0, 100.0, 3.0, 4.0]], "float32", True, 1, True, True),
        ([[1.0, 100.0, 3.0, 4.0]], "float64", False, 0, False, False),
        ([[0.0, 12.0, 0.0]], "float16", True, 1, True, True),
        ([[0.0, 11.0, 0.0]], "float16", False, 0, False, False),
        ([[0.0, 89.0], [0.0, 1.0]], "bfloat16", True, 1, True, True),
        ([[70000.0, 0.0]], "float16", True, 1, True, True),        # rounds to inf in float16
        ([[0.0, 7.0]], "float8_e4m3fn", True, 1, False, True),     # no inf: overflow is NaN
        ([[-20.0, -30.0]], "float16", False, 0, False, True),      # underflow: 0 / 0
        ([[1.0, -np.inf]], "float16", False, 0, False, False),
    ],
)
def test_analyze_softmax_safety_cases(scores, dtype, will_overflow, count, has_inf,  # type: ignore[no-untyped-def]
                                      has_nan) -> None:
    r = fm.analyze_softmax_safety(np.array(scores), dtype)
    assert (r.will_overflow, r.overflow_count, r.has_inf, r.has_nan) == (
        will_overflow, count, has_inf, has_nan)
    assert r.total == np.size(scores)
    assert r.max_safe_input == float(fm.overflow_threshold(dtype))


def test_analyze_softmax_safety_report_fields() -> None:
    scores = np.array([[1.0, -2.5], [3.25, 0.0]])
    r = fm.analyze_softmax_safety(scores, "bf16")
    assert r == fm.SafetyReport(dtype="bfloat16", max_safe_input=88.5, scores_min=-2.5,
                                scores_max=3.25, will_overflow=False, overflow_count=0,
                                total=4, has_inf=False, has_nan=False)
    assert [f.name for f in dataclasses.fields(r)] == [
        "dtype", "max_safe_input", "scores_min", "scores_max", "will_overflow",
        "overflow_count", "total", "has_inf", "has_nan"]
    assert all(type(v) in (str, float, int, bool) for v in dataclasses.astuple(r))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.total = 5  # type: ignore[misc]


def test_analyze_reports_scores_as_the_dtype_holds_them() -> None:
    # 11.09 rounds up to 11.09375 in float16, past the threshold 11.0859375.
    r = fm.analyze_softmax_safety(np.array([11.09]), "float16")
    assert r.scores_max == 11.09375 and r.will_overflow and r.has_nan


def test_analyze_empty_and_zero_d_scores() -> None:
    r = fm.analyze_softmax_safety(np.zeros((0, 4)), "float16")
    assert (r.total, r.will_overflow, r.has_nan) == (0, False, False)
    assert math.isnan(r.scores_max)
    r = fm.analyze_softmax_safety(np.float64(20.0), "float16")
    assert (r.total, r.will_overflow, r.has_nan) == (1, True, True)


def test_prediction_matches_what_happens_on_attention_scores() -> None:
    # Seed 004's stress test: unscaled Q K^T overflows float16; scaling by 1/sqrt(d) does not.
    rng = np.random.default_rng(42)
    for seq_len, d in [(32, 32), (128, 64), (256, 128)]:
        q, k = rng.normal(size=(seq_len, d)), rng.normal(size=(seq_len, d))
        scores = q @ k.T
        for s, dtype in [(scores, "float16"), (scores / math.sqrt(d), "float16"),
                         (scores, "float32"), (scores, "bfloat16")]:
            r = fm.analyze_softmax_safety(s, dtype)
            assert r.will_overflow == r.has_inf == (r.overflow_count > 0)
            assert r.has_nan == r.will_overflow  # no row here underflows entirely
        assert fm.analyze_softmax_safety(scores, "float16").will_overflow
        assert not fm.analyze_softmax_safety(scores / math.sqrt(d), "float16").will_overflow


def test_regression_nan_score_does_not_hide_the_overflow() -> None:
    report = fm.analyze_softmax_safety([[np.nan, 100.0]], "float32")
    assert report.will_overflow and report.overflow_count == 1
    assert report.scores_max == 100.0 and report.has_inf and report.has_nan


def test_regression_score_beyond_a_float8_fn_range_is_predicted() -> None:
    """float8_e4m3fn has no inf: 1000 rounds to NaN, and its exp overflows all the same."""
    report = fm.analyze_softmax_safety([[1.0, 1000.0]], "float8_e4m3fn")
    assert report.will_overflow and report.overflow_count == 1 and report.has_nan
    assert report.scores_max == 1.0
