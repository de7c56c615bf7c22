"""Where ``exp`` overflows and underflows in each dtype, and whether a naive softmax survives.

Seed 004 finds "exp overflows at x ~ 11 in float16, ~ 88 in float32" by
bisecting a float in [0, 1000]. Here the thresholds are exact: a bisection over
the dtype's own representable values (their bit patterns, which are ordered
like the values for each sign), with ``exp`` evaluated in that dtype, as
``np.exp`` on an array of it. The closed forms ``log(finfo.max)`` and
``log(smallest subnormal)`` are what the thresholds are checked against; they
differ from them by rounding only:

- ``exp(x)`` is finite while it rounds to at most ``max``, i.e. while the exact
  ``exp(x) < max + ulp(max)/2``. So the overflow threshold is the largest dtype
  value at or below ``log(max + ulp(max)/2)`` (which is ``log(max)`` plus about
  ``2**-p``, p the significand bits): the dtype value next to ``log(max)``, on
  either side of it (float8_e3m4: 2.75 > log(15.5) = 2.7408).
- ``exp(x)`` is positive while it rounds to at least the smallest subnormal
  ``s``, i.e. while the exact ``exp(x) > s/2`` (``s/2`` itself rounds to even,
  0). So the underflow threshold is the most negative dtype value above
  ``log(s/2) = log(s) - 0.693``: float64 -745.13 beside log(s) = -744.44; where
  the dtype's values are coarse it can land above ``log(s)`` (float8_e5m2: -10,
  the next value down being -12).

``np.exp`` in float16/bfloat16/float8 computes in float32 and rounds once
more to the dtype; the tests check both relations above against 50-digit
values of ``log(max + ulp/2)`` and ``log(s/2)``, and the bisection against an
enumeration of every value of the 8- and 16-bit dtypes.

Table (found, and the closed form beside it)::

    dtype               overflow            log(max)    underflow            log(min subnormal)
    float64             709.782712893384    709.7827    -745.1332191019411   -744.4401
    float32             88.72283            88.7228     -103.97208           -103.2789
    float16             11.086              11.0899     -17.33               -16.6355
    bfloat16            88.5                88.7189     -92.5                -92.1886
    float8_e3m4         2.75                2.7408      -4.75                -4.1589
    float8_e4m3         5.5                 5.4806      -6.5                 -6.2383
    float8_e4m3b11fnuz  3.25                3.4012      -9                   -9.0109
    float8_e4m3fn       6                   6.1048      -6.5                 -6.2383
    float8_e4m3fnuz     5.5                 5.4806      -7.5                 -6.9315
    float8_e5m2         10                  10.9568     -10                  -11.0904
    float8_e5m2fnuz     10                  10.9568     -12                  -11.7835
    float8_e8m0fnu      64                  88.0297     5.87747e-39 (*)      -88.0297

(*) float8_e8m0fnu holds only positive powers of two (2**-127 .. 2**127) and
no zero, no negatives: every value it holds has ``exp(x) >= 1``, so its
underflow threshold is its smallest value, and ``exp`` of anything it holds
never underflows. The float8 types without infinities ("fn", "fnuz", "fnu")
overflow to NaN rather than inf; "finite" is what is tested either way.

Examples
--------
>>> import numpy as np
>>> import flashmath as fm
>>> float(fm.overflow_threshold("float16"))
11.0859375
>>> with np.errstate(over="ignore"):
...     float(np.exp(np.float16(11.0859375))), float(np.exp(np.float16(11.09375)))
(65248.0, inf)
>>> report = fm.analyze_softmax_safety(np.array([[1.0, 12.0, 3.0]]), "float16")
>>> report.will_overflow, report.has_nan          # predicted, and what naive softmax did
(True, True)
>>> fm.softmax(np.array([1.0, 12.0, 3.0], dtype=np.float16))   # the stable one is fine
array([1.669e-05, 1.000e+00, 1.234e-04], dtype=float16)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt

from flashmath.dtypes import as_dtype, as_float_array, dtype_name, finfo
from flashmath.softmax.naive import exp_and_softmax

__all__ = [
    "SafetyReport",
    "analyze_softmax_safety",
    "overflow_closed_form",
    "overflow_threshold",
    "underflow_closed_form",
    "underflow_threshold",
]

DTypeArg = npt.DTypeLike | str


@dataclass(frozen=True)
class SafetyReport:
    """Predicted and actual behaviour of the naive softmax of ``scores`` in one dtype.

    Attributes
    ----------
    dtype : str
        The dtype's name ("float16", "bfloat16", "float8_e4m3fn", ...).
    max_safe_input : float
        :func:`overflow_threshold` of the dtype: ``exp`` of anything above overflows.
    scores_min, scores_max : float
        Extremes of the scores *as the dtype holds them* (rounded into it, which
        is what the naive softmax sees), NaN entries left out; NaN when no score is
        left.
    will_overflow : bool
        The prediction: ``overflow_count > 0``.
    overflow_count : int
        How many scores exceed ``max_safe_input`` as the dtype holds them, counting
        scores above it that the dtype cannot hold at all (a float8 type without inf
        rounds them to NaN).
    total : int
        How many scores there are.
    has_inf : bool
        Whether ``exp(scores)`` held inf in the dtype (the overflow itself;
        the float8 types without inf overflow to NaN instead).
    has_nan : bool
        Whether :func:`flashmath.naive.softmax` (rows along the last axis)
        returned any NaN in the dtype: what actually happened.
    """

    dtype: str
    max_safe_input: float
    scores_min: float
    scores_max: float
    will_overflow: bool
    overflow_count: int
    total: int
    has_inf: bool
    has_nan: bool


def overflow_threshold(dtype: DTypeArg) -> Any:
    """The largest value ``x`` of ``dtype`` whose ``exp(x)``, computed in ``dtype``, is finite.

    Found by bisection over the dtype's non-negative values (ordered by their
    bit patterns) with ``np.exp`` in the dtype; cached. Accepts a dtype or a
    name ("float16", "bf16", "float8_e4m3fn", ...). Returns a scalar of ``dtype``.
    Compare :func:`overflow_closed_form` (``log(finfo.max)``): the threshold is
    the dtype value at or just below ``log(max + ulp(max)/2)``.
    """
    return _thresholds(dtype_name(as_dtype(dtype)))[0]


def underflow_threshold(dtype: DTypeArg) -> Any:
    """The smallest (most negative) value ``x`` of ``dtype`` whose ``exp(x) > 0`` in ``dtype``.

    Found by bisection over the dtype's non-positive values with ``np.exp`` in
    the dtype; cached. Close to ``log(smallest_subnormal / 2)``, about 0.69 below
    :func:`underflow_closed_form`, because ``exp(x)`` rounds up to the smallest
    subnormal from anything above half of it. For float8_e8m0fnu, which holds no
    negative values, it is the dtype's smallest value (module docstring).
    """
    return _thresholds(dtype_name(as_dtype(dtype)))[1]


def overflow_closed_form(dtype: DTypeArg) -> float:
    """``log(finfo(dtype).max)`` as a Python float: the textbook overflow point."""
    return math.log(float(finfo(as_dtype(dtype)).max))


def underflow_closed_form(dtype: DTypeArg) -> float:
    """``log(finfo(dtype).smallest_subnormal)`` as a Python float: the textbook underflow point."""
    return math.log(float(finfo(as_dtype(dtype)).smallest_subnormal))


def analyze_softmax_safety(scores: npt.ArrayLike, dtype: DTypeArg = "float32") -> SafetyReport:
    """Predict whether the naive softmax of ``scores`` overflows in ``dtype``, and run it.

    Parameters
    ----------
    scores : array_like, any shape
        Scores (e.g. ``Q @ K.T``), any supported dtype; rounded into ``dtype``.
        Rows are along the last axis.
    dtype : dtype or name, default "float32"

    Returns
    -------
    SafetyReport
        The prediction (``will_overflow``: some score above ``overflow_threshold``)
        beside what :func:`flashmath.naive.softmax` did in that dtype
        (``has_inf`` in its ``exp``, ``has_nan`` in its output).
    """
    dt = as_dtype(dtype)
    given = as_float_array(scores, name="scores")
    with np.errstate(over="ignore", invalid="ignore"):  # past the dtype's range: inf or NaN
        x = given.astype(dt, copy=False)
    threshold = overflow_threshold(dt)
    e, p = exp_and_softmax(x, -1) if x.ndim else exp_and_softmax(x.reshape(1), -1)
    # Above the threshold as the dtype holds it; a score the dtype cannot hold at all (a
    # float8 "fn" type turns it into NaN) counts too when it was above the threshold.
    over = (x > threshold) | (np.isnan(x) & (given > threshold))
    finite_or_inf = x[~np.isnan(x)]
    return SafetyReport(
        dtype=dtype_name(dt),
        max_safe_input=float(threshold),
        scores_min=float(finite_or_inf.min()) if finite_or_inf.size else math.nan,
        scores_max=float(finite_or_inf.max()) if finite_or_inf.size else math.nan,
        will_overflow=bool(over.any()),
        overflow_count=int(np.count_nonzero(over)),
        total=int(x.size),
        has_inf=bool(np.isinf(e).any()),
        has_nan=bool(np.isnan(p).any()),
    )


# --------------------------------------------------------------------------------------
# Bisection over representable values.
# --------------------------------------------------------------------------------------


@cache
def _thresholds(name: str) -> tuple[Any, Any]:
    dt = as_dtype(name)
    top = _bits(np.array(finfo(dt).max, dtype=dt))  # the largest finite value's pattern
    value = _values_of(dt)

    def exp_is(x: np.ndarray, test: Any) -> bool:
        with np.errstate(all="ignore"):
            return bool(test(np.exp(x)))

    def finite(bits: int) -> bool:
        return exp_is(value(bits), lambda e: np.isfinite(e))

    # exp(+0 or the smallest value) = 1 is finite, exp(max) is not: bisect between them.
    over = value(_bisect(finite, 0, top))
    if float(finfo(dt).min) > 0:  # float8_e8m0fnu: no zero, no negatives; exp(x) >= 1 everywhere
        return over[()], value(0)[()]

    def positive(bits: int) -> bool:
        x = np.negative(value(bits))
        return exp_is(x, lambda e: np.isfinite(e) & (e > 0))

    under = np.negative(value(_bisect(positive, 0, top)))  # exp(-0) = 1 > 0, exp(-max) = 0
    return over[()], under[()]


def _bisect(ok: Any, lo: int, hi: int) -> int:
    """The largest pattern in [lo, hi) with ``ok``, given ``ok(lo)`` and not ``ok(hi)``,
    ``ok`` monotone over the patterns (exp is monotone and so is the value of a pattern)."""
    assert ok(lo) and not ok(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _bits(x: np.ndarray) -> int:
    return int(x.view(_UINT[x.dtype.itemsize]))


def _values_of(dt: np.dtype[Any]) -> Any:
    uint = _UINT[dt.itemsize]
    return lambda bits: np.array(bits, dtype=uint).view(dt)


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
