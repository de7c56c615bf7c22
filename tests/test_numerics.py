"""Specification of flashmath.softmax.stable: softmax, log_softmax, logsumexp, cross_entropy.

Every point of the contract in issue 2 / DESIGN.md has a test here; accuracy is
checked against the 50-digit oracle in tests/mp_oracle.py, with exactly the
bounds the docstrings state.
"""

from __future__ import annotations

import math

import ml_dtypes
import mpmath
import numpy as np
import pytest
import scipy.special as sp
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import flashmath as fm
from flashmath.dtypes import DTYPES, FLOAT8_DTYPES, finfo
from flashmath.softmax import mp_oracle as oracle

EPS = float(np.finfo(np.float64).eps)
SUB = 5e-324  # float64's smallest subnormal
INF, NAN = np.inf, np.nan

# Seed 001's battery, verbatim: (name, logits).
BATTERY = [
    ("small magnitudes", [0.1, 0.2, 0.3, 0.4, 0.5]),
    ("mixed magnitudes", [-3.0, 0.0, 1.0, 2.0, 5.0]),
    ("large positive", [1.0, 92.0, 3.0, 0.0, 2.0]),
    ("large negative", [-100.0, -200.0, -300.0, -400.0, -500.0]),
    ("all identical", [5.0, 5.0, 5.0, 5.0, 5.0]),
    ("masked entry", [1.0, -INF, 3.0, 0.0, 2.0]),
    ("single element", [42.0]),
    ("verb vocabulary", [0.0] * 600),
]
BATTERY_IDS = [name for name, _ in BATTERY]
# scipy is only compared on the cases where the naive formula is fine (seed 001, Block F).
NON_ADVERSARIAL = ["small magnitudes", "mixed magnitudes", "all identical", "single element",
                   "verb vocabulary"]


def battery(name: str) -> np.ndarray:
    return np.array(dict(BATTERY)[name], dtype=np.float64)


# --------------------------------------------------------------------------------------
# The documented float64 bounds (module docstring of flashmath.softmax.stable).
# --------------------------------------------------------------------------------------


def spread(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """E = sum_j p*_j |x_j - max x| per row (keepdims): the conditioning term of the bounds."""
    p = oracle.softmax(x, axis)
    m = np.max(x, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        terms = np.where(p > 0, p * np.abs(x - m), 0.0)
    return np.sum(terms, axis=axis, keepdims=True)


def assert_within(got: np.ndarray, want: np.ndarray, bound: np.ndarray) -> None:
    """Same NaN pattern; entries within ``bound`` (elementwise) of the exact ``want``, or
    equal to it rounded into ``got``'s dtype (which covers infinities, and results past
    the dtype's range such as a float32 log-probability below -3.4e38)."""
    got, want = np.asarray(got), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    g64 = got.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        ok = (got == want.astype(got.dtype)) | np.isnan(want)
        ok |= np.abs(g64 - want) <= np.broadcast_to(bound, want.shape)
    bad = ~ok
    assert not bad.any(), f"got {g64[bad][:4]}, exact {want[bad][:4]}, bounds {bound}"


def _eps_sub(dt: np.dtype) -> tuple[float, float]:  # type: ignore[type-arg]
    info = finfo(dt)
    return float(info.eps), float(info.smallest_subnormal)


# The bounds below are the ones flashmath.softmax.stable documents for float64 and float32 (the
# dtypes computed in their own precision): eps and the subnormal floor are the dtype's.


def check_softmax(x: np.ndarray) -> None:
    eps, sub = _eps_sub(x.dtype)
    x64 = x.astype(np.float64)
    want = oracle.softmax(x64)
    with np.errstate(invalid="ignore", over="ignore"):
        gap = np.abs(x64 - np.max(x64, axis=-1, keepdims=True))
        rel = eps * (gap + spread(x64) + math.log2(x.shape[-1]) + 2)
        bound = np.where(want > 0, rel * want, 0.0) + 2 * sub
    assert_within(fm.softmax(x), want, bound)


def check_log_softmax(x: np.ndarray) -> None:
    eps, sub = _eps_sub(x.dtype)
    x64 = x.astype(np.float64)
    want = oracle.log_softmax(x64)
    bound = eps * (2 * np.abs(want) + spread(x64)) + (x.shape[-1] + 1) * sub
    assert_within(fm.log_softmax(x), want, bound)


def check_logsumexp(x: np.ndarray) -> None:
    eps, sub = _eps_sub(x.dtype)
    x64 = x.astype(np.float64)
    want = oracle.logsumexp(x64)
    n = x.shape[-1]
    bound = eps * (np.abs(want) + spread(x64)[..., 0] + math.log2(n) + 2) + (n + 1) * sub
    assert_within(fm.logsumexp(x), want, bound)


def check_cross_entropy(x: np.ndarray, y: np.ndarray, smoothing: float = 0.0) -> None:
    eps, sub = _eps_sub(x.dtype)
    x64 = x.astype(np.float64)
    want = oracle.cross_entropy(x64, y, reduction="none", label_smoothing=smoothing)
    got = fm.cross_entropy(x, y, reduction="none", label_smoothing=smoothing)
    n = x.shape[-1]
    scale = 2 + (math.log2(n) if smoothing else 0)
    bound = eps * (scale * np.abs(want) + spread(x64)[..., 0]) + (n + 1) * sub
    assert_within(got, want, bound)


# --------------------------------------------------------------------------------------
# Seed 001's battery, float64: the oracle within 1e-14 relative, and scipy within 1e-15.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BATTERY_IDS)
def test_battery_float64_within_1e14_of_oracle(name: str) -> None:
    x = battery(name)
    np.testing.assert_allclose(fm.softmax(x), oracle.softmax(x), rtol=1e-14, atol=0)
    np.testing.assert_allclose(fm.log_softmax(x), oracle.log_softmax(x), rtol=1e-14, atol=0)
    np.testing.assert_allclose(fm.logsumexp(x), oracle.logsumexp(x), rtol=1e-14, atol=0)
    check_softmax(x)
    check_log_softmax(x)
    check_logsumexp(x)


@pytest.mark.parametrize("name", BATTERY_IDS)
def test_battery_stable_never_nan_and_sums_to_one(name: str) -> None:
    p = fm.softmax(battery(name))
    assert not np.isnan(p).any()
    assert abs(p.sum() - 1) <= 4 * EPS


@pytest.mark.parametrize(
    ("name", "loss"),
    [
        ("small magnitudes", 1.7194163314769022),    # log(sum e^x) - 0.2
        ("mixed magnitudes", 5.072484477820163),     # 5 + log1p(e^-2 + e^-3 + ...) - 0
        ("large positive", 3.459099604632546e-39),   # y is the argmax: log1p(sum e^(x - 92))
        ("large negative", 100.0),                   # -100 + 3.7e-44 + 200, rounded
        ("all identical", 1.6094379124341003),       # log 5
        ("masked entry", INF),                       # the true class is masked: p(y) = 0
        ("verb vocabulary", 6.396929655216146),      # log 600
    ],
)
def test_battery_cross_entropy_y1(name: str, loss: float) -> None:
    x = battery(name)
    want = oracle.cross_entropy(x, 1)
    assert want == pytest.approx(loss, rel=1e-15, abs=0) or want == loss
    got = fm.cross_entropy(x, 1)
    assert got == pytest.approx(want, rel=1e-14, abs=0) or got == want


def test_battery_cross_entropy_y1_single_element_is_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"labels: values \[1\] are out of range \[0, 1\)"):
        fm.cross_entropy(battery("single element"), 1)


@pytest.mark.parametrize("name", NON_ADVERSARIAL)
def test_battery_agrees_with_scipy_1e15(name: str) -> None:
    x = battery(name)
    np.testing.assert_allclose(fm.softmax(x), sp.softmax(x), rtol=1e-15, atol=0)
    np.testing.assert_allclose(fm.log_softmax(x), sp.log_softmax(x), rtol=1e-15, atol=0)
    np.testing.assert_allclose(fm.logsumexp(x), sp.logsumexp(x), rtol=1e-15, atol=0)


def test_random_rows_agree_with_scipy_1e15() -> None:
    x = np.random.default_rng(42).normal(size=(64, 37)) * 3
    np.testing.assert_allclose(fm.softmax(x), sp.softmax(x, axis=-1), rtol=1e-15, atol=0)
    np.testing.assert_allclose(fm.logsumexp(x), sp.logsumexp(x, axis=-1), rtol=1e-15, atol=0)
    # scipy's log_softmax is x - max - log(s): the absolute error of log(s ~ 1.1) is an ulp
    # of 1, up to ~1e-15 relative to a log-probability near -0.1. flashmath's log1p form
    # is relatively accurate there; where the two differ by more than 1e-15 relative,
    # flashmath is the one nearer the oracle.
    ours, theirs = fm.log_softmax(x), sp.log_softmax(x, axis=-1)
    np.testing.assert_allclose(ours, theirs, rtol=1e-15, atol=1e-15)
    apart = np.abs(ours - theirs) > 1e-15 * np.abs(theirs)
    exact = oracle.log_softmax(x)
    assert (np.abs(ours - exact)[apart] < np.abs(theirs - exact)[apart]).all()


# --------------------------------------------------------------------------------------
# Closed forms (scipy's regression style).
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "want"),
    [
        ([1000.0, 1000.0], 1000.0 + math.log(2.0)),
        ([0.0, 0.0], math.log(2.0)),
        ([-1000.0, -1000.0], -1000.0 + math.log(2.0)),
        ([0.0] * 600, math.log(600.0)),
        ([42.0], 42.0),
        ([1.0, -INF], 1.0),
        ([-INF, -INF], -INF),
        ([], -INF),
        ([-1e300, 1e300], 1e300),
        ([0.0, -50.0], 1.9287498479639178e-22),  # log1p(e^-50): 0 in the textbook formula
        (list(range(10)), 9.4586297444267107),   # scipy's docstring
    ],
)
def test_logsumexp_closed_forms(x: list[float], want: float) -> None:
    assert fm.logsumexp(np.array(x, dtype=np.float64)) == want


def test_logsumexp_1000_1000_is_exactly_1000_plus_log2() -> None:
    assert fm.logsumexp([1000.0, 1000.0]) == np.float64(1000.0) + np.log(2.0)


@pytest.mark.parametrize(
    ("x", "want"),
    [
        ([1000.0, 1.0], [0.0, -999.0]),
        ([5.0] * 5, [-math.log(5.0)] * 5),
        ([0.0, -50.0], [-1.9287498479639178e-22, -50.0]),
        ([1.0, -INF, 1.0], [-math.log(2.0), -INF, -math.log(2.0)]),
        ([-INF, -INF], [-INF, -INF]),
    ],
)
def test_log_softmax_closed_forms(x: list[float], want: list[float]) -> None:
    np.testing.assert_array_equal(fm.log_softmax(np.array(x)), np.array(want))


@pytest.mark.parametrize(
    ("x", "want"),
    [
        ([5.0] * 5, [0.2] * 5),
        ([0.0] * 600, [1 / 600] * 600),
        ([42.0], [1.0]),
        ([1.0, -INF, 1.0], [0.5, 0.0, 0.5]),
        ([0.0, -800.0], [1.0, 0.0]),
        ([-INF, -INF], [0.0, 0.0]),
    ],
)
def test_softmax_closed_forms(x: list[float], want: list[float]) -> None:
    np.testing.assert_array_equal(fm.softmax(np.array(x)), np.array(want))


def test_logsumexp_weights_closed_forms_from_scipy_docstring() -> None:
    a = np.arange(10.0)
    assert fm.logsumexp(a, b=np.arange(10, 0, -1)) == pytest.approx(9.9170178533034665, rel=EPS)
    lse, sign = fm.logsumexp([1.0, 2.0], b=[1.0, -1.0], return_sign=True)
    assert (lse, sign) == (pytest.approx(1.5413248546129181, rel=EPS), -1.0)
    masked = np.array([math.log(2), 2.0, math.log(3)])
    assert fm.logsumexp(masked, b=[1, 0, 1]) == pytest.approx(math.log(5), rel=EPS)


# --------------------------------------------------------------------------------------
# Special values: -inf, where, dead rows, +inf/NaN rows, empty axes.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "softmax", "log_softmax", "logsumexp", "ce_y0"),
    [
        ([0.0, -INF], [1.0, 0.0], [0.0, -INF], 0.0, 0.0),
        ([-INF, 0.0], [0.0, 1.0], [-INF, 0.0], 0.0, INF),         # label's logit is -inf
        ([-INF, -INF], [0.0, 0.0], [-INF, -INF], -INF, INF),      # nothing left
        ([INF, 0.0], [NAN, NAN], [NAN, NAN], NAN, NAN),           # +inf: the row is NaN
        ([INF, INF], [NAN, NAN], [NAN, NAN], NAN, NAN),
        ([NAN, 0.0], [NAN, NAN], [NAN, NAN], NAN, NAN),
        ([NAN, -INF], [NAN, NAN], [NAN, NAN], NAN, NAN),
        ([INF, -INF], [NAN, NAN], [NAN, NAN], NAN, NAN),
    ],
)
def test_special_values(x, softmax, log_softmax, logsumexp, ce_y0) -> None:  # type: ignore[no-untyped-def]
    row = np.array(x)
    np.testing.assert_array_equal(fm.softmax(row), softmax)
    np.testing.assert_array_equal(fm.log_softmax(row), log_softmax)
    np.testing.assert_array_equal(fm.logsumexp(row), logsumexp)
    np.testing.assert_array_equal(fm.cross_entropy(row, 0), ce_y0)
    np.testing.assert_array_equal(oracle.softmax(row), softmax)  # the oracle agrees
    np.testing.assert_array_equal(oracle.logsumexp(row), logsumexp)


def test_inf_or_nan_row_leaves_other_rows_untouched() -> None:
    x = np.array([[1.0, 2.0, 3.0], [1.0, INF, 3.0], [NAN, 2.0, 3.0], [-INF, -INF, -INF]])
    clean = x[:1]
    for fn in (fm.softmax, fm.log_softmax):
        out = fn(x)
        np.testing.assert_array_equal(out[0], fn(clean)[0])
        assert np.isnan(out[1:3]).all()
    lse = fm.logsumexp(x)
    np.testing.assert_array_equal(lse, [fm.logsumexp(clean)[0], NAN, NAN, -INF])
    ce = fm.cross_entropy(x, np.array([0, 0, 1, 2]), reduction="none")
    np.testing.assert_array_equal(np.isnan(ce), [False, True, True, False])
    assert ce[3] == INF
    np.testing.assert_array_equal(fm.softmax(x)[3], 0.0)


def test_inf_in_another_column_does_not_leak_across_rows_for_axis0() -> None:
    x = np.array([[1.0, INF], [2.0, 0.0]])
    out = fm.softmax(x, axis=0)
    np.testing.assert_array_equal(out[:, 0], fm.softmax(np.array([1.0, 2.0])))
    assert np.isnan(out[:, 1]).all()


def test_where_false_is_exactly_zero_and_ignores_nan_and_inf_underneath() -> None:
    x = np.array([[1.0, NAN, 3.0, INF], [2.0, 2.0, 2.0, 2.0]])
    keep = np.array([True, False, True, False])
    p = fm.softmax(x, where=keep)
    np.testing.assert_array_equal(p[:, [1, 3]], 0.0)
    np.testing.assert_array_equal(p[0], fm.softmax(np.array([1.0, -INF, 3.0, -INF])))
    np.testing.assert_array_equal(p[1], [0.5, 0.0, 0.5, 0.0])
    np.testing.assert_array_equal(fm.log_softmax(x, where=keep)[:, 1], -INF)
    assert fm.logsumexp(x, where=keep)[1] == 2.0 + math.log(2.0)
    np.testing.assert_array_equal(
        fm.logsumexp(x, where=keep), oracle.logsumexp(x, where=keep)
    )


def test_where_equals_minus_inf_masking_and_oracle() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 9)) * 5
    keep = rng.random((6, 9)) < 0.6
    masked = np.where(keep, x, -INF)
    np.testing.assert_array_equal(fm.softmax(x, where=keep), fm.softmax(masked))
    np.testing.assert_array_equal(fm.log_softmax(x, where=keep), fm.log_softmax(masked))
    np.testing.assert_array_equal(fm.logsumexp(x, where=keep), fm.logsumexp(masked))
    np.testing.assert_allclose(fm.softmax(x, where=keep), oracle.softmax(x, where=keep),
                               rtol=1e-14, atol=0)


def test_where_fully_false_row_is_a_dead_row() -> None:
    x = np.ones((2, 3))
    keep = np.array([[True, True, False], [False, False, False]])
    np.testing.assert_array_equal(fm.softmax(x, where=keep)[1], 0.0)
    np.testing.assert_array_equal(fm.log_softmax(x, where=keep)[1], -INF)
    assert fm.logsumexp(x, where=keep)[1] == -INF


def test_where_broadcasts() -> None:
    x = np.zeros((3, 4))
    p = fm.softmax(x, where=np.array([True, True, False, False]))
    np.testing.assert_array_equal(p, np.tile([0.5, 0.5, 0.0, 0.0], (3, 1)))


@pytest.mark.parametrize(
    ("empty", "want"),
    [("zeros", [0.0, 0.0, 0.0, 0.0]), ("uniform", [0.25] * 4), ("nan", [NAN] * 4)],
)
def test_empty_option_for_dead_rows(empty: str, want: list[float]) -> None:
    x = np.array([[-INF] * 4, [0.0, 0.0, -INF, -INF]])
    p = fm.softmax(x, empty=empty)  # type: ignore[arg-type]
    np.testing.assert_array_equal(p[0], want)
    np.testing.assert_array_equal(p[1], [0.5, 0.5, 0.0, 0.0])  # live rows unaffected


def test_empty_uniform_with_where_and_tuple_axis() -> None:
    x = np.zeros((2, 2, 3))
    keep = np.zeros((2, 2, 3), dtype=bool)
    keep[0, 0, 0] = True
    p = fm.softmax(x, axis=(1, 2), where=keep, empty="uniform")
    np.testing.assert_array_equal(p[1], np.full((2, 3), 1 / 6))
    assert p[0, 0, 0] == 1.0 and p[0].sum() == 1.0


def test_empty_option_invalid() -> None:
    with pytest.raises(ValueError, match=r"empty: expected one of .*'zeros'.*got 'ones'"):
        fm.softmax([1.0], empty="ones")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("shape", "axis", "lse_shape"),
    [
        ((0,), -1, ()),
        ((3, 0), -1, (3,)),
        ((0, 3), 0, (3,)),
        ((2, 0, 4), (1, 2), (2,)),
    ],
)
def test_zero_length_axis(shape, axis, lse_shape) -> None:  # type: ignore[no-untyped-def]
    x = np.zeros(shape)
    lse = fm.logsumexp(x, axis=axis)
    assert np.shape(lse) == lse_shape
    np.testing.assert_array_equal(lse, -INF)
    for empty in ("zeros", "uniform", "nan"):
        assert fm.softmax(x, axis=axis, empty=empty).shape == shape
    assert fm.log_softmax(x, axis=axis).shape == shape
    assert fm.logsumexp(x, axis=axis, keepdims=True).shape == tuple(
        1 if i in np.atleast_1d(np.array(axis) % len(shape)) else n for i, n in enumerate(shape)
    )


def test_zero_length_class_axis_cross_entropy() -> None:
    x = np.zeros((0, 5))
    assert fm.cross_entropy(x, np.zeros(0, dtype=int), reduction="sum") == 0.0
    assert np.isnan(fm.cross_entropy(x, np.zeros(0, dtype=int)))  # mean of nothing
    with pytest.raises(ValueError, match="out of range"):
        fm.cross_entropy(np.zeros((2, 0)), np.array([0, 0]))
    all_ignored = fm.cross_entropy(np.zeros((2, 0)), np.array([-1, -1]), ignore_index=-1,
                                   reduction="none")
    np.testing.assert_array_equal(all_ignored, [0.0, 0.0])


# --------------------------------------------------------------------------------------
# Shapes and axes: 0-d, 1-d, 2-d, N-d, tuples, negative axes, non-contiguous inputs.
# --------------------------------------------------------------------------------------


def test_zero_d_input_is_one_row_of_one() -> None:
    assert fm.softmax(3.0) == 1.0 and np.ndim(fm.softmax(3.0)) == 0
    assert fm.log_softmax(3.0) == 0.0
    assert fm.logsumexp(3.0) == 3.0
    assert np.shape(fm.logsumexp(np.float64(3.0), keepdims=True)) == ()
    assert fm.softmax(-INF) == 0.0 and np.isnan(fm.softmax(INF))
    assert fm.logsumexp(-INF) == -INF
    assert fm.cross_entropy(3.0, 0) == 0.0
    for axis in (0, -1, (0,), None):
        assert fm.logsumexp(2.0, axis=axis) == 2.0
    assert fm.logsumexp(2.0, b=3.0) == pytest.approx(2.0 + math.log(3.0), rel=EPS)
    assert isinstance(fm.logsumexp(np.ones(3)), np.float64)  # 0-d results are scalars


@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((7,), -1),
        ((7,), 0),
        ((4, 7), -1),
        ((4, 7), 1),
        ((4, 7), 0),
        ((4, 7), -2),
        ((4, 7), (0, 1)),
        ((4, 7), (-1, 0)),
        ((4, 7), None),
        ((2, 3, 4, 5), -1),
        ((2, 3, 4, 5), 1),
        ((2, 3, 4, 5), (1, 3)),
        ((2, 3, 4, 5), (0, 2, 3)),
        ((2, 3, 4, 5), [3, -3]),
        ((2, 3, 4, 5), ()),
    ],
)
def test_axes_match_the_oracle(shape, axis) -> None:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(len(shape)).normal(size=shape) * 4
    ax = tuple(axis) if isinstance(axis, list) else axis
    np.testing.assert_allclose(fm.softmax(x, axis), oracle.softmax(x, ax), rtol=1e-14, atol=0)
    np.testing.assert_allclose(fm.log_softmax(x, axis), oracle.log_softmax(x, ax),
                               rtol=1e-14, atol=0)
    for keepdims in (False, True):
        got = fm.logsumexp(x, axis, keepdims=keepdims)
        want = oracle.logsumexp(x, ax, keepdims=keepdims)
        assert np.shape(got) == np.shape(want) == np.shape(np.sum(x, axis=ax, keepdims=keepdims))
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[:, ::2],
        lambda a: a.T,
        lambda a: a[::-1, ::-3],
        lambda a: np.broadcast_to(a[:1], a.shape),
        lambda a: np.asfortranarray(a),
        lambda a: a.astype(np.float32)[1:, 1:],
    ],
)
def test_non_contiguous_inputs_give_the_contiguous_result_and_are_not_modified(view) -> None:  # type: ignore[no-untyped-def]
    base = np.random.default_rng(3).normal(size=(6, 10)) * 5
    x = view(base)
    before = x.copy()
    dense = np.ascontiguousarray(x)
    # NumPy may sum a strided row in another order: equal up to that rounding.
    tol = 4 * float(finfo(x.dtype).eps)
    for fn in (fm.softmax, fm.log_softmax, fm.logsumexp):
        np.testing.assert_allclose(fn(x), fn(dense), rtol=tol, atol=0)
        np.testing.assert_allclose(fn(x, axis=0), fn(dense, axis=0), rtol=tol, atol=0)
    y = np.zeros(x.shape[0], dtype=int)
    np.testing.assert_allclose(fm.cross_entropy(x, y, reduction="none"),
                               fm.cross_entropy(dense, y, reduction="none"), rtol=tol)
    np.testing.assert_array_equal(x, before)


def test_torch_tensors_are_read_not_written() -> None:
    torch = pytest.importorskip("torch")
    t = torch.tensor([[1.0, 2.0, -3.0]], dtype=torch.float64)
    before = t.clone()
    np.testing.assert_array_equal(fm.softmax(t), fm.softmax(before.numpy()))
    fm.log_softmax(t)
    fm.logsumexp(t)
    fm.cross_entropy(t, np.array([0]))
    assert torch.equal(t, before)


def test_inputs_are_never_written_to() -> None:
    for dtype in (np.float64, np.float32, np.float16):
        x = np.array([[1.0, -INF, 3.0], [0.0, 0.0, 0.0]], dtype=dtype)
        before = x.copy()
        x.setflags(write=False)
        fm.softmax(x)
        fm.log_softmax(x)
        fm.logsumexp(x, b=np.ones(3))
        fm.cross_entropy(x, np.array([0, 1]), label_smoothing=0.1)
        np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize(
    ("axis", "error", "message"),
    [
        (2, np.exceptions.AxisError, r"axis: 2 is out of bounds for an array of dimension 2"),
        (-3, np.exceptions.AxisError, r"axis: -3 is out of bounds"),
        ((0, 5), np.exceptions.AxisError, r"axis: \(0, 5\) is out of bounds"),
        ((0, -2), ValueError, r"axis: \(0, -2\) repeats an axis"),
        (1.0, TypeError, r"axis: expected an int or a tuple of ints, got 1.0"),
        (True, TypeError, r"axis: expected an int or a tuple of ints, got True"),
        ("1", TypeError, r"axis: expected an int"),
    ],
)
def test_bad_axes(axis, error, message) -> None:  # type: ignore[no-untyped-def]
    x = np.zeros((2, 3))
    for fn in (fm.softmax, fm.log_softmax, fm.logsumexp):
        with pytest.raises(error, match=message):
            fn(x, axis)


def test_cross_entropy_axis_must_be_one_int() -> None:
    with pytest.raises(TypeError, match=r"axis: cross_entropy takes one int class axis"):
        fm.cross_entropy(np.zeros((2, 3)), np.zeros(2, int), axis=(0, 1))  # type: ignore[arg-type]
    with pytest.raises(np.exceptions.AxisError, match="axis: 2 is out of bounds"):
        fm.cross_entropy(np.zeros((2, 3)), np.zeros(2, int), axis=2)


# --------------------------------------------------------------------------------------
# Dtypes.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DTYPES))
def test_every_dtype_returns_its_own_dtype(name: str) -> None:
    dt = DTYPES[name]
    x = np.array([[0.5, 1.0, 2.0], [1.0, 1.0, 1.0]]).astype(dt)
    for out in (fm.softmax(x), fm.log_softmax(x), fm.logsumexp(x),
                fm.cross_entropy(x, np.array([0, 1]), reduction="none"),
                fm.cross_entropy(x, np.array([0, 1]))):
        assert np.asarray(out).dtype == dt


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint8, np.uint64, np.bool_])
def test_integer_and_bool_promote_to_float64(dtype) -> None:  # type: ignore[no-untyped-def]
    x = np.array([[1, 0, 1], [0, 0, 1]], dtype=dtype)
    as_float = x.astype(np.float64)
    np.testing.assert_array_equal(fm.softmax(x), fm.softmax(as_float))
    assert fm.softmax(x).dtype == np.float64
    assert fm.logsumexp(x).dtype == np.float64
    assert fm.log_softmax(x).dtype == np.float64
    assert np.asarray(fm.cross_entropy(x, np.array([0, 1]))).dtype == np.float64
    assert fm.softmax([1, 2, 3]).dtype == np.float64  # Python ints too


@pytest.mark.parametrize(
    ("x", "dtype"),
    [
        (np.array([1 + 2j, 3j]), "complex128"),
        (np.array([1.0, 2.0], dtype=np.complex64), "complex64"),
        (np.array([1.0, 2.0], dtype=object), "object"),
        (np.array(["a", "b"]), "<U1"),
        (np.array([b"a"]), "|S1"),
        (np.array(["2024-01-01"], dtype="datetime64[D]"), "datetime64"),
    ],
)
def test_unsupported_dtypes_are_type_errors_naming_the_dtype(x, dtype) -> None:  # type: ignore[no-untyped-def]
    for fn in (fm.softmax, fm.log_softmax, fm.logsumexp):
        with pytest.raises(TypeError, match=rf"x: dtype {dtype}"):
            fn(x)
    with pytest.raises(TypeError, match=rf"logits: dtype {dtype}"):
        fm.cross_entropy(x, 0 if x.ndim == 0 else np.zeros((), int))


def test_accum_dtype_forces_narrow_arithmetic() -> None:
    x = np.zeros(70_000, dtype=np.float32)  # the sum of exp is 70000 > float16's max 65504
    assert fm.logsumexp(x) == np.float32(math.log(70_000))
    assert fm.logsumexp(x, accum_dtype="float16") == INF
    assert fm.logsumexp(x, accum_dtype=np.float64).dtype == np.float32  # result: input dtype
    # float16 arithmetic on float64 input: every step rounds to float16, the result is float64.
    y = np.array([0.1, 0.2, 0.3])
    got = fm.softmax(y, accum_dtype="float16")
    assert got.dtype == np.float64
    h = y.astype(np.float16)
    e = np.exp(h - h.max())
    np.testing.assert_array_equal(got, (e / e.sum()).astype(np.float64))
    assert not np.array_equal(got, fm.softmax(y))
    # bfloat16 sums stall at 256 when adding ones: 4096 equal scores in bfloat16 arithmetic.
    ones = np.full(4096, 1.0, dtype=np.float16)
    assert fm.softmax(ones, accum_dtype="bfloat16")[0] == np.float16(1 / 256)
    assert fm.softmax(ones)[0] == np.float16(1 / 4096)


@pytest.mark.parametrize(
    ("accum", "error", "message"),
    [
        ("float8_e4m3fn", ValueError, r"accum_dtype: float8_e4m3fn has no -inf"),
        ("float8_e8m0fnu", ValueError, r"accum_dtype: float8_e8m0fnu has no -inf"),
        ("int32", TypeError, r"accum_dtype: unknown dtype 'int32'"),
        (np.complex128, TypeError, r"accum_dtype: dtype complex128 is not supported"),
    ],
)
def test_bad_accum_dtype(accum, error, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=message):
        fm.softmax(np.ones(3), accum_dtype=accum)


# --------------------------------------------------------------------------------------
# Accuracy below float64 (module docstring's table): float32 is computed in float32 and
# meets the float64 bounds with float32's eps; float16, bfloat16 and float8 are computed
# in float32 and rounded once, so they land within one ulp of the exact value.
# --------------------------------------------------------------------------------------


def low_precision_inputs(dt: np.dtype) -> list[np.ndarray]:  # type: ignore[type-arg]
    """The seed battery and random rows of several scales, rounded into ``dt``."""
    rng = np.random.default_rng(7)
    big = min(float(finfo(dt).max), 1e4)
    rows = [battery(name) for name in BATTERY_IDS]
    rows += [rng.normal(size=(3, 40)) * s for s in (0.1, 1.0, 4.0, 30.0)]
    rows += [rng.uniform(-big, big, size=(3, 40))]
    return [np.asarray(r, np.float64).astype(dt) for r in rows]


def test_float32_meets_the_float64_bounds_with_its_own_eps() -> None:
    for x in low_precision_inputs(np.dtype(np.float32)):
        check_softmax(x)
        check_log_softmax(x)
        check_logsumexp(x)
        if x.shape[-1] > 1:
            y = np.ones(x.shape[:-1], dtype=int)
            check_cross_entropy(x, y)
            check_cross_entropy(x, y, 0.1)


def one_ulp(want: np.ndarray, dt: np.dtype) -> np.ndarray:  # type: ignore[type-arg]
    eps, sub = _eps_sub(dt)
    return eps * np.abs(want) + sub


def ce_rows(x: np.ndarray) -> np.ndarray:
    return np.asarray(fm.cross_entropy(x, np.ones(x.shape[:-1], int), reduction="none"))


def ce_rows_exact(x: np.ndarray) -> np.ndarray:
    return np.asarray(oracle.cross_entropy(x, np.ones(x.shape[:-1], int), reduction="none"))


@pytest.mark.parametrize(
    ("name", "fn", "exact", "bound"),
    [
        ("float16", fm.softmax, oracle.softmax, "ulp"),
        ("float16", fm.log_softmax, oracle.log_softmax, "ulp"),
        ("float16", fm.logsumexp, oracle.logsumexp, "ulp of max(1, |r|)"),
        ("float16", ce_rows, ce_rows_exact, "ulp"),
        ("bfloat16", fm.softmax, oracle.softmax, "ulp"),
        ("bfloat16", fm.log_softmax, oracle.log_softmax, "ulp"),
        ("bfloat16", fm.logsumexp, oracle.logsumexp, "ulp of max(1, |r|)"),
        ("bfloat16", ce_rows, ce_rows_exact, "ulp"),
    ],
)
def test_half_precision_within_one_ulp(name, fn, exact, bound) -> None:  # type: ignore[no-untyped-def]
    dt = DTYPES[name]
    eps, _ = _eps_sub(dt)
    for x in low_precision_inputs(dt):
        if fn is ce_rows and x.shape[-1] < 2:
            continue
        want = exact(x.astype(np.float64))
        limit = one_ulp(want, dt) if bound == "ulp" else eps * np.maximum(1, np.abs(want))
        got = fn(x)
        assert np.asarray(got).dtype == dt
        assert_within(got, want, limit)


@pytest.mark.parametrize("name", [n for n in FLOAT8_DTYPES if n in
                                  ("float8_e3m4", "float8_e4m3", "float8_e4m3fn",
                                   "float8_e4m3fnuz", "float8_e4m3b11fnuz", "float8_e5m2",
                                   "float8_e5m2fnuz")])
def test_float8_softmax_and_logsumexp_within_one_ulp(name: str) -> None:
    dt = DTYPES[name]
    x = np.array([[-2.0, -1.0, 0.0, 0.5, 1.0, 2.0], [1.0, 1.0, -4.0, 0.25, 2.0, -0.5]]).astype(dt)
    want = oracle.softmax(x.astype(np.float64))
    got = fm.softmax(x)
    assert got.dtype == dt
    assert (np.abs(got.astype(np.float64) - want) <= one_ulp(want, dt)).all()
    lse = oracle.logsumexp(x.astype(np.float64))
    got_lse = fm.logsumexp(x).astype(np.float64)
    assert (np.abs(got_lse - lse) <= float(finfo(dt).eps) * np.maximum(1, np.abs(lse))).all()


def test_float8_e8m0fnu_holds_only_positive_powers_of_two() -> None:
    dt = DTYPES["float8_e8m0fnu"]
    x = np.array([1.0, 2.0, 4.0]).astype(dt)
    lse = fm.logsumexp(x)  # log(e + e^2 + e^4) = 4.2395 rounds to a power of two
    assert lse.dtype == dt and float(lse) == 4.0
    assert np.isnan(fm.log_softmax(x).astype(np.float64)).all()  # negatives: not representable


def test_bfloat16_battery_never_nan_where_naive_is() -> None:
    x = battery("large positive").astype(ml_dtypes.bfloat16)
    assert np.isnan(fm.naive.softmax(x).astype(np.float32)).any()
    assert not np.isnan(fm.softmax(x).astype(np.float32)).any()


# --------------------------------------------------------------------------------------
# Property tests, float64, magnitudes up to 1e300, against the oracle's bounds.
# --------------------------------------------------------------------------------------

finite = st.floats(min_value=-1e300, max_value=1e300, allow_nan=False, allow_infinity=False)
moderate = st.floats(min_value=-800, max_value=800, allow_nan=False, allow_infinity=False)
rows = st.one_of(
    hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=12),
               elements=finite),
    hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=12),
               elements=moderate),
)


@given(rows)
def test_hypothesis_softmax_bound(x: np.ndarray) -> None:
    check_softmax(x)


@given(rows)
def test_hypothesis_log_softmax_bound(x: np.ndarray) -> None:
    check_log_softmax(x)


@given(rows)
def test_hypothesis_logsumexp_bound(x: np.ndarray) -> None:
    check_logsumexp(x)


@given(rows, st.data(), st.sampled_from([0.0, 0.1, 1.0]))
def test_hypothesis_cross_entropy_bound(x: np.ndarray, data: st.DataObject, s: float) -> None:
    y = data.draw(hnp.arrays(np.int64, x.shape[:-1], elements=st.integers(0, x.shape[-1] - 1)))
    check_cross_entropy(x, y, s)


@given(hnp.arrays(np.float64, st.integers(1, 10),
                  elements=st.integers(-2**40, 2**40).map(float)),
       st.integers(-2**40, 2**40).map(float))
def test_hypothesis_exact_shift_invariance(x: np.ndarray, c: float) -> None:
    # x + c is exact here (integers below 2**53), so so is every x_i - max: bitwise equal.
    np.testing.assert_array_equal(fm.softmax(x + c), fm.softmax(x))
    np.testing.assert_array_equal(fm.log_softmax(x + c), fm.log_softmax(x))


@given(hnp.arrays(np.float64, st.integers(1, 10), elements=moderate),
       st.floats(min_value=-1e6, max_value=1e6))
def test_hypothesis_shift_invariance_to_rounding(x: np.ndarray, c: float) -> None:
    # x + c rounds each entry by at most eps/2 |x_i + c|: softmax moves by that much.
    shifted = x + c
    rtol = 2 * EPS * np.max(np.abs(shifted)) + EPS * (x.size + 4)
    p, q = fm.softmax(shifted), fm.softmax(x)
    assert (np.abs(p - q) <= rtol * q * (1 + np.abs(x - x.max())) + 4 * SUB).all()


# --------------------------------------------------------------------------------------
# logsumexp weights (b) and sign: scipy's semantics.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]),
        ([1.0, 2.0], [1.0, -1.0]),
        ([1.0, 2.0], [-1.0, 1.0]),
        ([2.0, 2.0], [1.0, -1.0]),           # exact cancellation: -inf, sign 0
        ([0.0, -50.0], [1.0, -1.0]),
        ([1000.0, 999.0], [0.5, 3.0]),
        ([1.0, INF, NAN], [1.0, 0.0, 0.0]),  # zero weights remove inf and NaN
        ([[1.0, 2.0], [3.0, 4.0]], [2.0, -1.0]),  # b broadcasts
        ([-INF, -INF], [1.0, 1.0]),
    ],
)
def test_logsumexp_weights_match_scipy_and_oracle(a, b) -> None:  # type: ignore[no-untyped-def]
    a, b = np.array(a), np.array(b)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        want_lse, want_sign = sp.logsumexp(a, axis=-1, b=b, return_sign=True)
    got_lse, got_sign = fm.logsumexp(a, b=b, return_sign=True)
    ex_lse, ex_sign = oracle.logsumexp(a, b=b, return_sign=True)
    np.testing.assert_array_equal(got_sign, want_sign)
    np.testing.assert_array_equal(got_sign, ex_sign)
    np.testing.assert_allclose(got_lse, ex_lse, rtol=4 * EPS, atol=0)
    np.testing.assert_allclose(got_lse, want_lse, rtol=1e-14, atol=0)
    no_sign = fm.logsumexp(a, b=b)
    np.testing.assert_array_equal(np.isnan(no_sign), np.asarray(got_sign) < 0)


def test_logsumexp_b_broadcasts_both_ways_like_scipy() -> None:
    a = np.array([1.0, 2.0, 3.0])
    b = np.array([[1.0], [2.0]])
    got = fm.logsumexp(a, b=b)
    np.testing.assert_allclose(got, sp.logsumexp(a, axis=-1, b=b), rtol=1e-15)
    assert got.shape == (2,)


# --------------------------------------------------------------------------------------
# cross_entropy: torch's semantics.
# --------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_ce(x: np.ndarray, y: np.ndarray, axis: int = 1, **kw: object) -> np.ndarray:
    out = F.cross_entropy(torch.from_numpy(np.moveaxis(x, axis, 1).copy()),
                          torch.from_numpy(y), **kw)
    return out.numpy()


@pytest.mark.parametrize(
    ("reduction", "ignore_index", "smoothing"),
    [
        ("mean", None, 0.0),
        ("sum", None, 0.0),
        ("none", None, 0.0),
        ("mean", 2, 0.0),
        ("sum", 2, 0.0),
        ("none", 2, 0.0),
        ("mean", None, 0.1),
        ("sum", None, 0.25),
        ("none", None, 0.9),
        ("mean", 2, 0.1),
        ("none", 0, 0.3),
        ("mean", -100, 1.0),
    ],
)
def test_cross_entropy_matches_torch(reduction: str, ignore_index: int | None,
                                     smoothing: float) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(16, 7)) * 3
    y = rng.integers(0, 7, size=16)
    y[:3] = 2
    kw = {} if ignore_index is None else {"ignore_index": ignore_index}
    want = torch_ce(x, y, reduction=reduction, label_smoothing=smoothing, **kw)
    got = fm.cross_entropy(x, y, reduction=reduction, label_smoothing=smoothing,  # type: ignore[arg-type]
                           ignore_index=ignore_index)
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15)
    exact = oracle.cross_entropy(x, y, reduction=reduction, label_smoothing=smoothing,
                                 ignore_index=ignore_index)
    np.testing.assert_allclose(got, exact, rtol=1e-14, atol=0)


def test_cross_entropy_nd_class_axis_matches_torch() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 5, 4, 2)) * 4  # (N, C, d1, d2): torch's layout, class axis 1
    y = rng.integers(0, 5, size=(3, 4, 2))
    for reduction in ("mean", "sum", "none"):
        np.testing.assert_allclose(fm.cross_entropy(x, y, axis=1, reduction=reduction),  # type: ignore[arg-type]
                                   torch_ce(x, y, reduction=reduction), rtol=1e-14)
    moved = np.moveaxis(x, 1, -1)  # the same data with the class axis last
    np.testing.assert_allclose(fm.cross_entropy(moved, y, reduction="none"),
                               fm.cross_entropy(x, y, axis=1, reduction="none"), rtol=1e-15)


def test_log_softmax_matches_torch() -> None:
    x = np.random.default_rng(8).normal(size=(4, 6, 9)) * 10
    for axis in (0, 1, 2, -1):
        want = F.log_softmax(torch.from_numpy(x), dim=axis).numpy()
        np.testing.assert_allclose(fm.log_softmax(x, axis), want, rtol=1e-14, atol=1e-15)


def test_cross_entropy_all_ignored_mean_is_nan_like_torch() -> None:
    x = np.zeros((3, 4))
    y = np.full(3, -100)
    want = torch_ce(x, y)
    assert np.isnan(want)
    assert np.isnan(fm.cross_entropy(x, y, ignore_index=-100))
    assert fm.cross_entropy(x, y, ignore_index=-100, reduction="sum") == 0.0
    np.testing.assert_array_equal(
        fm.cross_entropy(x, y, ignore_index=-100, reduction="none"), [0.0, 0.0, 0.0]
    )


def test_cross_entropy_ignored_rows_contribute_nothing_even_if_nan() -> None:
    x = np.array([[1.0, 2.0], [NAN, INF], [0.0, 0.0]])
    y = np.array([1, -1, 0])
    got = fm.cross_entropy(x, y, ignore_index=-1)
    want = (fm.cross_entropy(x[0], 1) + math.log(2)) / 2
    assert got == pytest.approx(want, rel=EPS)


def test_cross_entropy_is_logsumexp_minus_the_label_logit() -> None:
    x = np.array([[2.0, -1.0, 0.5], [100.0, 100.5, -3.0]])
    y = np.array([2, 0])
    literal = fm.logsumexp(x) - x[np.arange(2), y]  # cancels: ~1e-14 off at 100.97 - 100
    got = fm.cross_entropy(x, y, reduction="none")
    np.testing.assert_allclose(got, literal, rtol=1e-14)
    np.testing.assert_allclose(got, oracle.cross_entropy(x, y, reduction="none"), rtol=2 * EPS)


def test_cross_entropy_label_smoothing_definition() -> None:
    x = np.array([[2.0, -1.0, 0.5]])
    s = 0.2
    logp = oracle.log_softmax(x)[0]
    want = -((1 - s) * logp[1] + s * logp.mean())
    assert fm.cross_entropy(x, np.array([1]), label_smoothing=s) == pytest.approx(want, rel=1e-15)
    # A masked class with smoothing > 0 costs +inf, as in torch.
    masked = np.array([[2.0, -INF, 0.5]])
    assert fm.cross_entropy(masked, np.array([0]), label_smoothing=0.1) == INF
    assert torch_ce(masked, np.array([0]), label_smoothing=0.1) == INF


@pytest.mark.parametrize(
    ("labels", "error", "message"),
    [
        (np.array([0, 3]), ValueError, r"labels: values \[3\] are out of range \[0, 3\) for "
                                       r"logits axis 1 of size 3"),
        (np.array([-1, 0]), ValueError, r"labels: values \[-1\] are out of range"),
        (np.array([5, 7]), ValueError, r"labels: values \[5, 7\]"),
        (np.array([0, 1, 2]), ValueError, r"labels: shape \(3,\) does not match logits' shape "
                                          r"\(2, 3\) without axis 1, which is \(2,\)"),
        (np.array([[0, 1]]), ValueError, r"labels: shape \(1, 2\)"),
        (np.array([0.0, 1.0]), TypeError, r"labels: expected an integer array .* float64"),
        (np.array([True, False]), TypeError, r"labels: .* got dtype bool"),
    ],
)
def test_cross_entropy_bad_labels(labels, error, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=message):
        fm.cross_entropy(np.zeros((2, 3)), labels)


def test_cross_entropy_out_of_range_label_names_ignore_index() -> None:
    with pytest.raises(ValueError, match=r"values \[9\] .* and are not ignore_index=-100"):
        fm.cross_entropy(np.zeros((2, 3)), np.array([9, -100]), ignore_index=-100)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reduction": "avg"}, r"reduction: expected one of \('mean', 'sum', 'none'\), got 'avg'"),
        ({"label_smoothing": 1.5}, r"label_smoothing: expected a value in \[0, 1\], got 1.5"),
        ({"label_smoothing": -0.1}, r"label_smoothing: .* got -0.1"),
    ],
)
def test_cross_entropy_bad_options(kwargs, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        fm.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), **kwargs)


# --------------------------------------------------------------------------------------
# Argument shapes: where and b.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"where": np.ones(4, bool)}, ValueError,
         r"where: shape \(4,\) does not broadcast to x's shape \(2, 3\)"),
        ({"where": np.ones((3, 3), bool)}, ValueError, r"where: shape \(3, 3\)"),
        ({"where": np.ones(3)}, TypeError, r"where: expected a boolean array, got dtype float64"),
    ],
)
def test_bad_where(kwargs, error, message) -> None:  # type: ignore[no-untyped-def]
    for fn in (fm.softmax, fm.log_softmax, fm.logsumexp):
        with pytest.raises(error, match=message):
            fn(np.zeros((2, 3)), **kwargs)


def test_bad_b() -> None:
    with pytest.raises(ValueError, match=r"b: shape \(4,\) does not broadcast with x's shape "
                                         r"\(2, 3\)"):
        fm.logsumexp(np.zeros((2, 3)), b=np.ones(4))
    with pytest.raises(TypeError, match=r"b: dtype complex128"):
        fm.logsumexp(np.zeros(3), b=np.ones(3, complex))


def test_logsumexp_return_sign_without_weights() -> None:
    lse, sign = fm.logsumexp(np.array([[-INF, -INF], [0.0, 0.0], [INF, 0.0]]), return_sign=True)
    np.testing.assert_array_equal(lse, [-INF, math.log(2), NAN])
    np.testing.assert_array_equal(sign, [0.0, 1.0, NAN])


def test_logsumexp_where_and_b_together() -> None:
    x = np.array([1.0, 2.0, 3.0, NAN])
    keep = np.array([True, True, False, False])
    b = np.array([2.0, -1.0, 5.0, 1.0])
    lse, sign = fm.logsumexp(x, where=keep, b=b, return_sign=True)  # 2e - e^2 < 0
    assert sign == -1.0
    assert lse == pytest.approx(math.log(math.e**2 - 2 * math.e), rel=4 * EPS)


# --------------------------------------------------------------------------------------
# The oracle itself (tests/mp_oracle.py): regressions named after the bugs they caught.
# --------------------------------------------------------------------------------------


def test_oracle_keeps_a_dominant_entrys_tiny_log_probability() -> None:
    # At 50 digits 1 + 1e-304 is 1: the oracle once returned log_softmax = 0 here, and
    # -3.72007794e-44 (cancelled digits) for x - (m + log(1 + 3.7e-44)) below.
    x = np.array([0.1, 0.1 - 700.6])
    with mpmath.workdps(400):
        want = float(-mpmath.log1p(mpmath.exp(mpmath.mpf(float(x[1])) - mpmath.mpf(0.1))))
    assert oracle.log_softmax(x)[0] == want != 0.0
    y = np.array([-100.0, -200.0])
    assert oracle.log_softmax(y)[0] == -math.exp(-100.0)


@pytest.mark.parametrize(
    ("x", "want"),
    [
        ([0.0, -50.0], math.log1p(math.exp(-50.0))),
        ([1000.0, 1000.0], 1000.0 + math.log(2.0)),
        ([-INF, -INF], -INF),
        ([1.0, INF], NAN),
    ],
)
def test_oracle_logsumexp_closed_forms(x: list[float], want: float) -> None:
    np.testing.assert_array_equal(oracle.logsumexp(np.array(x)), want)


class _ArrayLike:
    """An array-like whose __array__ hands out its stored array (no copy)."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        return self.a


@pytest.mark.parametrize("fn", [fm.softmax, fm.log_softmax, fm.logsumexp])
def test_regression_array_like_input_is_not_overwritten(fn) -> None:
    wrapped = _ArrayLike(np.array([1.0, 2.0, 3.0]))
    fn(wrapped)
    np.testing.assert_array_equal(wrapped.a, [1.0, 2.0, 3.0])


def test_regression_cross_entropy_array_like_logits_not_overwritten() -> None:
    wrapped = _ArrayLike(np.array([[1.0, 2.0, 3.0]]))
    fm.cross_entropy(wrapped, np.array([0]))
    np.testing.assert_array_equal(wrapped.a, [[1.0, 2.0, 3.0]])


# --------------------------------------------------------------------------------------
# The fast path (issue 16): rows along the trailing axes of a C-contiguous array are
# computed in blocks of rows, on both cores when large. Whatever the blocks and the
# threads, every row gives the bits the general path gives (a Fortran-ordered copy or
# an all-True ``where`` takes the general path), and the narrow dtypes are today's
# float32 results rounded once by NumPy's cast.
# --------------------------------------------------------------------------------------

FAST_DTYPES = ["float64", "float32", "float16", "bfloat16", "float8_e4m3fn"]


def fast_inputs(dt: np.dtype, shape: tuple[int, ...] = (37, 301)) -> np.ndarray:  # type: ignore[type-arg]
    rng = np.random.default_rng(16)
    x = (rng.standard_normal(shape) * rng.choice([0.1, 3.0, 30.0], (*shape[:-1], 1)))
    x = x.astype(dt)
    flat = x.reshape(-1, shape[-1])
    n = shape[-1]
    flat[3, ::5] = -np.inf  # masked entries
    flat[4] = -np.inf  # a dead row
    flat[5, 7 % n] = np.nan  # a NaN row
    if np.isinf(np.array(np.inf).astype(dt)):
        flat[6, 1 % n] = np.inf  # a +inf row
    flat[7, :] = 0.0  # a row at its max everywhere, with signed zeros
    flat[7, ::2] = -0.0
    flat[8, :] = -np.inf  # one survivor: -0.0
    flat[8, n // 2] = -0.0
    with np.errstate(invalid="ignore"):
        neg_nan = np.float64(0.0) * np.float64(-np.inf)  # the CPU's default NaN: negative
        payload = np.array([0x7FFC000000000000], np.uint64).view(np.float64)[0]
        flat[9, 2 % n] = neg_nan  # NaNs of two kinds in one row
        flat[9, 5 % n] = np.nan
        flat[10, 0] = payload  # a NaN with a payload
        flat[11, 3 % n] = neg_nan  # a NaN beside +inf
        if np.isinf(np.array(np.inf).astype(dt)):
            flat[11, 1 % n] = np.inf
    return x


def same_bits(a: object, b: object) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def all_calls(x: np.ndarray, general: bool = False) -> list[object]:
    """Every fast-path call on x; with ``general`` the same calls forced onto the general
    path without changing the memory layout of the rows (an all-True ``where``; for
    cross_entropy a row-contiguous but not C-contiguous view)."""
    kw: dict[str, object] = {"where": np.ones(x.shape, bool)} if general else {}
    logits = x
    if general:
        logits = np.zeros((*x.shape[:-1], x.shape[-1] + 3), x.dtype)[..., : x.shape[-1]]
        logits[...] = x
    labels = np.random.default_rng(1).integers(0, x.shape[-1], x.shape[:-1])
    return [
        fm.softmax(x, **kw), fm.softmax(x, empty="uniform", **kw),  # type: ignore[arg-type]
        fm.softmax(x, empty="nan", **kw), fm.log_softmax(x, **kw),  # type: ignore[arg-type]
        fm.logsumexp(x, **kw), *fm.logsumexp(x, return_sign=True, **kw),  # type: ignore[arg-type]
        fm.logsumexp(x, keepdims=True, **kw),  # type: ignore[arg-type]
        fm.cross_entropy(logits, labels, reduction="none"),
        fm.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none"),
        fm.cross_entropy(logits[7:], labels[7:]),  # rows without NaN: a finite mean
    ]


@pytest.mark.parametrize("name", FAST_DTYPES)
@pytest.mark.parametrize("block_bytes, parallel_min", [(1 << 21, 1 << 18), (4, 1), (5000, 1)])
@pytest.mark.parametrize("shape", [(37, 301), (40, 1), (40, 2), (300, 7), (40, 9), (300, 12),
                                   (300, 16), (200, 24), (100, 25)])
def test_fast_path_is_bit_identical_to_the_general_path(
    monkeypatch: pytest.MonkeyPatch, name: str, block_bytes: int, parallel_min: int,
    shape: tuple[int, int],
) -> None:
    """Long rows and short ones (at most blocks.SHORT entries: reduced column by column)."""
    from flashmath.softmax import blocks

    x = fast_inputs(DTYPES[name], shape)
    general = all_calls(x, general=True)
    monkeypatch.setattr(blocks, "BLOCK_BYTES", block_bytes)  # one row per block, or a few
    monkeypatch.setattr(blocks, "PARALLEL_MIN", parallel_min)  # and threads even when small
    for i, (fast, slow) in enumerate(zip(all_calls(x), general, strict=True)):
        assert same_bits(fast, slow), (name, i)


@pytest.mark.parametrize("accum", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("n", [3, 8, 12, 24])
def test_short_rows_with_any_accum_dtype_match_the_general_path(accum: str, n: int) -> None:
    """The column-wise sums are NumPy's only in float32/float64 (NumPy sums float16 in
    float32, ml_dtypes sums bfloat16 in order): other accumulate dtypes keep the rows'."""
    x = fast_inputs(np.dtype(np.float32), (400, n))
    ones = np.ones(x.shape, bool)
    for fn in (fm.softmax, fm.log_softmax, fm.logsumexp):
        assert same_bits(fn(x, accum_dtype=accum), fn(x, accum_dtype=accum, where=ones)), fn


@given(st.integers(1, 300), st.integers(1, 5), st.sampled_from(["float32", "float64"]),
       st.integers(0, 2**32 - 1))
def test_pairwise_sum0_is_numpys_row_sum_bit_for_bit(n: int, r: int, name: str,
                                                     seed: int) -> None:
    from flashmath.softmax.maths import pairwise_sum0

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, r)) * 10.0 ** rng.integers(-8, 8, (n, r))
    a[rng.random((n, r)) < 0.05] = -0.0
    a = a.astype(DTYPES[name])
    want = np.sum(np.ascontiguousarray(a.T), axis=1, keepdims=True).T
    assert same_bits(pairwise_sum0(a), want)
    zeros = np.full((n, r), -0.0, DTYPES[name])
    assert same_bits(pairwise_sum0(zeros), np.sum(zeros.T, axis=1, keepdims=True).T)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_narrow_results_are_float32_results_rounded_once_by_numpy(name: str) -> None:
    dt = DTYPES[name]
    x = fast_inputs(dt, (256, 3000))  # a long row: the float16 results are mostly subnormal
    a = x.astype(np.float32)
    with np.errstate(all="ignore"):
        m = np.max(a, axis=-1, keepdims=True)
        shift = np.where(np.isneginf(m), np.float32(0), m)
        e = np.exp(a - shift)
        p = e / np.maximum(np.sum(e, axis=-1, keepdims=True), 1)
        want = p.astype(dt)
    assert same_bits(fm.softmax(x), want)
    if name == "float16":
        assert np.count_nonzero(np.abs(want.astype(np.float32)) < 2.0**-14) > want.size // 2


def test_fast_path_over_several_trailing_axes_and_3d() -> None:
    x = fast_inputs(np.dtype(np.float32), (6, 7, 50))
    ones = np.ones(x.shape, bool)  # an all-True where: the general path, same layout
    for axis in [-1, (1, 2), (2, 1), None]:
        want = fm.softmax(x, axis=axis, where=ones)
        want_lse = fm.logsumexp(x, axis=axis, where=ones)
        assert same_bits(fm.softmax(x, axis=axis), want), axis
        assert same_bits(fm.logsumexp(x, axis=axis), want_lse), axis


def _peak_extra(fn: object, out_bytes: int) -> int:
    import tracemalloc

    fn()  # type: ignore[operator]  # warm (the shared thread pool, lazy imports)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1] - out_bytes
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", ["float64", "float32", "float16", "bfloat16"])
def test_peak_memory_is_the_output_plus_a_few_blocks(name: str) -> None:
    """float32/float64: nothing beyond the output but a few cache-sized blocks (a copy of
    the input would be 64 or 128 MiB); float16/bfloat16: at most one float32 copy of the
    input (in fact the same few blocks)."""
    from flashmath.softmax.blocks import BLOCK_BYTES

    dt = DTYPES[name]
    x = np.random.default_rng(0).standard_normal((4096, 4096)).astype(dt)
    y = np.random.default_rng(1).integers(0, 4096, 4096)
    blocks = 6 * BLOCK_BYTES  # a few temporaries per block, one block per core (measured 4.6)
    limit = blocks if dt.itemsize >= 4 else x.size * 4
    out = x.nbytes
    assert _peak_extra(lambda: fm.softmax(x), out) <= limit
    assert _peak_extra(lambda: fm.log_softmax(x), out) <= limit
    assert _peak_extra(lambda: fm.logsumexp(x), 4096 * 8) <= limit
    assert _peak_extra(lambda: fm.cross_entropy(x, y), 4096 * 8) <= limit
    assert blocks < x.size * 4 / 4  # the bound is far below a float32 copy


# --- Messages (issue 17) ---


@pytest.mark.parametrize(
    "fn",
    [fm.softmax, fm.log_softmax, fm.logsumexp, fm.naive.softmax, fm.naive.logsumexp,
     lambda x: fm.cross_entropy(x, 0), lambda x: fm.naive.cross_entropy(x, 0)],
)
def test_regression_ragged_list_names_the_argument(fn) -> None:  # type: ignore[no-untyped-def]
    name = "logits" if "cross_entropy" in getattr(fn, "__code__", fn.__code__).co_names else "x"
    with pytest.raises(ValueError, match=rf"^{name}: not a rectangular array of numbers"):
        fn([[1.0, 2.0], [3.0]])


@pytest.mark.parametrize(
    "logits, labels, message",
    [
        (np.zeros(3), 5, r"labels: values \[5\] are out of range \[0, 3\)"),
        (np.zeros((2, 3)), [0, -1], r"labels: values \[-1\] are out of range \[0, 3\)"),
        (np.zeros((2, 3)), [0, 1, 2], r"labels: shape \(3,\) does not match"),
    ],
)
def test_regression_naive_cross_entropy_checks_labels_like_the_stable_one(
    logits: np.ndarray, labels: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        fm.naive.cross_entropy(logits, labels)
    with pytest.raises(ValueError, match=message):
        fm.cross_entropy(logits, labels)
    with pytest.raises(TypeError, match="labels: expected an integer array"):
        fm.naive.cross_entropy(logits, np.zeros(logits.shape[:-1]))


def test_naive_cross_entropy_valid_labels_unchanged() -> None:
    x = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    want = -np.log(np.exp(x[[0, 1], [2, 0]]) / np.exp(x).sum(-1))
    np.testing.assert_allclose(fm.naive.cross_entropy(x, [2, 0], reduction="none"), want,
                               rtol=1e-15)
    assert float(fm.naive.cross_entropy(np.float64(3.0), 0)) == 0.0  # 0-d: one class


@pytest.mark.parametrize(
    "batch_shape, d, message",
    [((), 2.5, r"d: a size must be an int, got 2.5"),
     ((2, 3.0), 4, r"batch_shape: a size must be an int, got 3.0"),
     (2.5, 4, r"batch_shape: expected an int or a tuple of ints, got 2.5"),
     ((2,), True, r"d: a size must be an int, got True")],
)
def test_regression_softmax_state_empty_sizes_must_be_ints(batch_shape, d, message) -> None:  # type: ignore[no-untyped-def]
    from flashmath.softmax.online import SoftmaxState

    with pytest.raises(TypeError, match=message):
        SoftmaxState.empty(batch_shape, d)
    assert SoftmaxState.empty((2, np.int64(3)), np.int32(4)).o.shape == (2, 3, 4)
