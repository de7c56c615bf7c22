"""Specification of flashmath.naive: the textbook formulas, in the input dtype, failing
exactly where the formula fails (the baseline of the lab and the conformance checker)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import flashmath as fm
from flashmath.dtypes import DTYPES
from flashmath.softmax import mp_oracle as oracle
from tests.test_numerics import BATTERY, battery

INF = np.inf


# Seed 001's battery in each dtype: does the naive softmax return NaN, and why.
@pytest.mark.parametrize(
    ("dtype", "case", "nan"),
    [
        ("float64", "large positive", False),   # exp(92) = 9e39 fits float64
        ("float64", "large negative", False),   # exp(-500) = 7e-218 fits too
        ("float32", "large positive", True),    # exp(92) > 3.4e38: inf / inf
        ("float32", "large negative", False),   # exp(-100) = 3.7e-44, a float32 subnormal
        ("float32", "single element", False),   # exp(42) = 1.7e18
        ("float16", "large positive", True),    # exp(92) > 65504
        ("float16", "large negative", True),    # every exp(x) underflows: 0 / 0
        ("float16", "single element", True),    # exp(42) > 65504: inf / inf
        ("float16", "verb vocabulary", False),  # 600 ones sum to 600
        ("bfloat16", "large positive", True),   # exp(92) > 3.39e38
        ("bfloat16", "large negative", True),   # exp(-100) < 9.2e-41, bfloat16's smallest
        ("bfloat16", "single element", False),
        ("bfloat16", "masked entry", False),    # exp(-inf) = 0 is exact in every dtype
    ],
)
def test_naive_softmax_nan_where_the_formula_breaks(dtype: str, case: str, nan: bool) -> None:
    x = battery(case).astype(DTYPES[dtype])
    p = fm.naive.softmax(x)
    assert p.dtype == DTYPES[dtype]
    assert bool(np.isnan(p.astype(np.float64)).any()) is nan
    assert not np.isnan(fm.softmax(x).astype(np.float64)).any()  # the stable one never is


def test_naive_bfloat16_sum_stalls_at_256() -> None:
    # 600 ones added in bfloat16 stop growing at 256 (256 + 1 rounds to 256):
    # every probability is 1/256 and the "distribution" sums to 600/256.
    p = fm.naive.softmax(battery("verb vocabulary").astype(DTYPES["bfloat16"]))
    assert float(p[0]) == 1 / 256
    assert float(np.sum(p.astype(np.float64))) == 600 / 256
    assert float(fm.softmax(battery("verb vocabulary").astype(DTYPES["bfloat16"]))[0]) == \
        pytest.approx(1 / 600, rel=2**-8)


@pytest.mark.parametrize("name", list(DTYPES))
def test_naive_computes_in_and_returns_the_input_dtype(name: str) -> None:
    dt = DTYPES[name]
    x = np.array([[0.5, 1.0, 2.0], [1.0, 1.0, 1.0]]).astype(dt)
    for out in (fm.naive.softmax(x), fm.naive.log_softmax(x), fm.naive.logsumexp(x),
                fm.naive.cross_entropy(x, np.array([0, 1]), reduction="none"),
                fm.naive.cross_entropy(x, np.array([0, 1]))):
        assert np.asarray(out).dtype == dt


@pytest.mark.parametrize("name", ["float64", "float32", "float16", "bfloat16"])
def test_naive_is_literally_the_textbook_formula(name: str) -> None:
    x = (np.random.default_rng(2).normal(size=(4, 9)) * 3).astype(DTYPES[name])
    e = np.exp(x)
    p = e / np.sum(e, axis=-1, keepdims=True)
    np.testing.assert_array_equal(fm.naive.softmax(x), p)
    np.testing.assert_array_equal(fm.naive.log_softmax(x), np.log(p))
    np.testing.assert_array_equal(fm.naive.logsumexp(x), np.log(np.sum(e, axis=-1)))
    y = np.array([0, 3, 8, 1])
    np.testing.assert_array_equal(fm.naive.cross_entropy(x, y, reduction="none"),
                                  -np.log(p[np.arange(4), y]))


@pytest.mark.parametrize(
    ("x", "softmax", "logsumexp"),
    [
        ([1.0, 1000.0], [0.0, np.nan], INF),          # exp(1000) = inf: inf / inf
        ([-1000.0, -1000.0], [np.nan, np.nan], -INF),  # 0 / 0, log(0)
        ([0.0, -INF], [1.0, 0.0], 0.0),
        ([-INF, -INF], [np.nan, np.nan], -INF),
        ([np.nan, 0.0], [np.nan, np.nan], np.nan),
    ],
)
def test_naive_float64_special_values(x, softmax, logsumexp) -> None:  # type: ignore[no-untyped-def]
    np.testing.assert_array_equal(fm.naive.softmax(np.array(x)), softmax)
    np.testing.assert_array_equal(fm.naive.logsumexp(np.array(x)), logsumexp)


@pytest.mark.parametrize("name", [n for n, _ in BATTERY])
def test_naive_float64_agrees_with_the_oracle_where_it_is_valid(name: str) -> None:
    x = battery(name)
    np.testing.assert_allclose(fm.naive.softmax(x), oracle.softmax(x), rtol=1e-14, atol=0)
    np.testing.assert_allclose(fm.naive.logsumexp(x), oracle.logsumexp(x), rtol=1e-14)


def test_naive_log_softmax_underflows_to_minus_inf_where_stable_does_not() -> None:
    x = np.array([0.0, -800.0])
    assert fm.naive.log_softmax(x)[1] == -INF
    assert fm.log_softmax(x)[1] == -800.0


@pytest.mark.parametrize(
    ("reduction", "want"),
    [("none", [math.log(2), math.log(2)]), ("sum", 2 * math.log(2)), ("mean", math.log(2))],
)
def test_naive_cross_entropy_reductions(reduction: str, want: object) -> None:
    x = np.zeros((2, 2))
    got = fm.naive.cross_entropy(x, np.array([0, 1]), reduction=reduction)
    np.testing.assert_allclose(got, want, rtol=1e-15)


def test_naive_cross_entropy_shapes_and_axis() -> None:
    x = np.random.default_rng(4).normal(size=(3, 5, 2))
    y = np.array([[0, 4], [1, 1], [2, 3]])
    got = fm.naive.cross_entropy(x, y, axis=1, reduction="none")
    np.testing.assert_allclose(got, fm.cross_entropy(x, y, axis=1, reduction="none"), rtol=1e-14)
    assert fm.naive.cross_entropy(np.array([1.0, 2.0, 3.0]), 1) == pytest.approx(
        fm.cross_entropy(np.array([1.0, 2.0, 3.0]), 1), rel=1e-15)
    assert fm.naive.cross_entropy(5.0, 0) == 0.0  # a 0-d input is one class
    with pytest.raises(ValueError, match="reduction: expected one of"):
        fm.naive.cross_entropy(x, y, axis=1, reduction="avg")


def test_naive_cross_entropy_overflows_where_stable_does_not() -> None:
    x = np.array([1.0, 92.0, 3.0, 0.0, 2.0], dtype=np.float32)
    assert np.isnan(fm.naive.cross_entropy(x, 1))  # -log(inf / inf)
    assert fm.naive.cross_entropy(x, 0) == INF     # -log(1 / inf) = -log(0)
    assert fm.cross_entropy(x, 0) == np.float32(91.0)


def test_naive_axis_and_tuple_axis() -> None:
    x = np.random.default_rng(5).normal(size=(3, 4, 5))
    np.testing.assert_allclose(fm.naive.softmax(x, axis=0), fm.softmax(x, axis=0), rtol=1e-14)
    np.testing.assert_allclose(fm.naive.logsumexp(x, axis=(0, 2)), fm.logsumexp(x, axis=(0, 2)),
                               rtol=1e-14)
    assert fm.naive.logsumexp(x, keepdims=True).shape == (3, 4, 1)
    assert fm.naive.softmax(3.0) == 1.0


def test_naive_promotes_integers_and_rejects_complex() -> None:
    assert fm.naive.softmax(np.array([1, 2])).dtype == np.float64
    with pytest.raises(TypeError, match="x: dtype complex128"):
        fm.naive.softmax(np.array([1j]))


def test_attention_is_the_textbook_formula():
    """naive.attention: the oracle's value where nothing overflows, NaN where exp does."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 5, 4)) for _ in range(3))
    got = fm.naive.attention(q, k, v, causal=True)
    np.testing.assert_allclose(got, fm.attention_reference(q, k, v, causal=True), rtol=1e-12)
    big = np.full((1, 1, 2, 4), 30.0, dtype=np.float32)
    assert np.isnan(fm.naive.attention(big, big, big)).all()
