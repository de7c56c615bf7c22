"""flashmath.blas.sgemm: c <- alpha a b + beta c through NumPy's own OpenBLAS, and its
np.matmul fallback, against a float64 product."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashmath import blas


def _operand(rng: np.random.Generator, rows: int, cols: int, layout: str) -> np.ndarray:
    """A float32 (rows, cols) operand: C order, a transposed view, or a view of a wider
    buffer (leading dimension > cols)."""
    if layout == "T":
        return rng.standard_normal((cols, rows), dtype=np.float32).T
    if layout == "wide":
        return rng.standard_normal((rows, cols + 3), dtype=np.float32)[:, 1 : cols + 1]
    return rng.standard_normal((rows, cols), dtype=np.float32)


def _bound(a: np.ndarray, b: np.ndarray, alpha: float, beta: float, c0: np.ndarray) -> np.ndarray:
    """A float32 rounding bound for alpha a b + beta c0: (K + 2) eps of the magnitudes."""
    eps = float(np.finfo(np.float32).eps)
    mag = abs(alpha) * (np.abs(a).astype(np.float64) @ np.abs(b)) + abs(beta) * np.abs(c0)
    return (a.shape[1] + 2) * eps * mag + 1e-30


@pytest.fixture(params=["ctypes", "fallback"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "fallback":
        monkeypatch.setattr(blas, "_kernel", lambda: None)
    elif not blas.available():
        pytest.skip("NumPy's BLAS has no cblas_sgemm reachable through ctypes here")
    return str(request.param)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # path: set once
@given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 70),
       la=st.sampled_from(["C", "T", "wide"]), lb=st.sampled_from(["C", "T", "wide"]),
       alpha=st.sampled_from([1.0, 0.125, -1.4426950408889634]),
       beta=st.sampled_from([0.0, 1.0, 0.5]), seed=st.integers(0, 2**16))
def test_sgemm_matches_the_float64_product(path: str, m: int, n: int, k: int, la: str, lb: str,
                                           alpha: float, beta: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = _operand(rng, m, k, la), _operand(rng, k, n, lb)
    buf = rng.standard_normal((m, n + 2), dtype=np.float32)
    c = buf[:, :n]  # a view with leading dimension n + 2
    c0, beyond = c.astype(np.float64), buf[:, n:].copy()
    blas.sgemm(a, b, c, alpha=alpha, beta=beta)
    want = float(np.float32(alpha)) * (a.astype(np.float64) @ b) + beta * c0
    assert np.all(np.abs(c - want) <= _bound(a, b, alpha, beta, c0))
    assert np.array_equal(buf[:, n:], beyond)  # the columns beyond the view untouched


def test_beta_zero_ignores_nan_in_c(path: str) -> None:
    rng = np.random.default_rng(1)
    a, b = _operand(rng, 5, 7, "C"), _operand(rng, 7, 3, "T")
    c = np.full((5, 3), np.nan, np.float32)
    blas.sgemm(a, b, c)
    assert np.isfinite(c).all()
    np.testing.assert_allclose(c, a @ b, rtol=1e-6, atol=1e-6)


def test_columns_outside_the_view_are_untouched(path: str) -> None:
    rng = np.random.default_rng(2)
    a, b = _operand(rng, 4, 6, "C"), _operand(rng, 6, 5, "C")
    buf = np.full((4, 9), 7.0, np.float32)
    blas.sgemm(a, b, buf[:, 2:7], beta=1.0)
    assert (buf[:, :2] == 7).all() and (buf[:, 7:] == 7).all()


def test_other_dtypes_and_empty_shapes_take_the_fallback() -> None:
    a, b = np.ones((3, 4)), np.ones((4, 2))  # float64: np.matmul
    c = np.zeros((3, 2))
    blas.sgemm(a, b, c, alpha=2.0)
    assert (c == 8).all()
    e = np.ones((3, 2), np.float32)
    blas.sgemm(np.ones((3, 0), np.float32), np.ones((0, 2), np.float32), e, beta=1.0)
    assert (e == 1).all()  # K = 0: c <- 0 + beta c


def test_fallback_agrees_with_ctypes(monkeypatch: pytest.MonkeyPatch) -> None:
    if not blas.available():
        pytest.skip("no cblas_sgemm here: only the fallback runs")
    rng = np.random.default_rng(3)
    a, b = _operand(rng, 64, 65, "C"), _operand(rng, 65, 128, "T")
    c1 = rng.standard_normal((64, 128), dtype=np.float32)
    c2 = c1.copy()
    blas.sgemm(a, b, c1, alpha=0.3, beta=1.0)
    monkeypatch.setattr(blas, "_kernel", lambda: None)
    blas.sgemm(a, b, c2, alpha=0.3, beta=1.0)
    np.testing.assert_allclose(c1, c2, rtol=2e-6, atol=2e-5)


def test_mismatched_shapes_name_the_operands() -> None:
    with pytest.raises(ValueError, match=r"sgemm: shapes a \(2, 3\), b \(4, 2\)"):
        blas.sgemm(np.ones((2, 3), np.float32), np.ones((4, 2), np.float32),
                   np.ones((2, 2), np.float32))
