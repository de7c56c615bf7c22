"""flashmath.attention.fp8: the Hadamard transform against an explicit matrix, scaled
quantization against its rounding bound, the simulated FP8 kernel against the float64 oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flashmath as fm
from flashmath.attention import fp8
from flashmath.dtypes import DTYPES

E4M3 = DTYPES["float8_e4m3fn"]


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64])
def test_hadamard_matrix_is_sylvester(n: int) -> None:
    h = fp8.hadamard_matrix(n)
    assert h.shape == (n, n) and set(np.unique(h)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))
    if n >= 2:  # Sylvester's recursion, written out independently of the builder
        half = fp8.hadamard_matrix(n // 2)
        np.testing.assert_array_equal(h, np.kron(np.array([[1, 1], [1, -1]]), half))


@settings(max_examples=40, deadline=None)
@given(log_n=st.integers(0, 7), rows=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_fwht_equals_the_explicit_matrix(log_n: int, rows: int, seed: int) -> None:
    n = 2 ** log_n
    x = np.random.default_rng(seed).standard_normal((rows, n))
    expected = x @ fp8.hadamard_matrix(n) / math.sqrt(n)
    got = fp8.fwht(x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-13 * max(1.0, np.abs(x).max()))
    np.testing.assert_allclose(fp8.fwht(x, normalize=False), x @ fp8.hadamard_matrix(n),
                               rtol=0, atol=1e-12 * max(1.0, np.abs(x).max()) * n)
    np.testing.assert_allclose(fp8.fwht(got), x, atol=1e-13 * n)  # its own inverse


def test_fwht_keeps_dtype_and_input() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    before = x.copy()
    assert fp8.fwht(x).dtype == np.float32
    np.testing.assert_array_equal(x, before)
    assert fp8.fwht(np.arange(4)).dtype == np.float64  # integers promote


@pytest.mark.parametrize("bad", [3, 6, 0])
def test_fwht_and_matrix_refuse_non_powers_of_two(bad: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        fp8.fwht(np.ones((2, bad)))
    with pytest.raises(ValueError, match="power of two"):
        fp8.hadamard_matrix(bad)


@settings(max_examples=30, deadline=None)
@given(log_d=st.integers(0, 7), seed=st.integers(0, 2**16))
def test_random_hadamard_preserves_q_k_products(log_d: int, seed: int) -> None:
    """Orthogonal: Q M (K M)^T == Q K^T, up to float64 rounding (a few ulps of |q||k|)."""
    d = 2 ** log_d
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((5, d)) * 10, rng.standard_normal((7, d))
    s = fp8.random_signs(d, rng)
    got = fp8.random_hadamard(q, s) @ fp8.random_hadamard(k, s).T
    scale = np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(k, axis=1)[None, :]
    assert np.all(np.abs(got - q @ k.T) <= 64 * np.finfo(np.float64).eps * scale * (1 + log_d))
    # the explicit matrix M = diag(s) H / sqrt(d) gives the same transform
    m = np.diag(s) @ fp8.hadamard_matrix(d) / math.sqrt(d)
    np.testing.assert_allclose(fp8.random_hadamard(q, s), q @ m, atol=1e-12 * np.abs(q).max())


def test_random_hadamard_spreads_an_outlier() -> None:
    d = 64
    x = np.zeros(d)
    x[5] = 40.0
    y = fp8.random_hadamard(x, fp8.random_signs(d, np.random.default_rng(1)))
    np.testing.assert_allclose(np.abs(y), 40.0 / math.sqrt(d))  # every feature gets 1/sqrt(d)


def test_random_hadamard_and_signs_validate() -> None:
    with pytest.raises(ValueError, match="signs must have shape"):
        fp8.random_hadamard(np.ones((2, 4)), np.ones(8))
    with pytest.raises(ValueError, match=r"\+1 and -1"):
        fp8.random_hadamard(np.ones((2, 4)), np.array([1.0, 2.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="n must be"):
        fp8.random_signs(0, np.random.default_rng())
    s = fp8.random_signs(1000, np.random.default_rng(0))
    assert set(np.unique(s)) == {-1.0, 1.0}


@pytest.mark.parametrize("block", [None, 1, 4, 5])
def test_quantize_scales_each_block_to_the_dtype_max(block: int | None) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 12, 8)) * rng.uniform(0.01, 100, (2, 3, 12, 1))
    codes, scales = fp8.quantize(x, "float8_e4m3fn", block=block)
    assert codes.dtype == E4M3 and codes.shape == x.shape and scales.shape == (2, 3, 12, 1)
    top = float(fm.dtypes.finfo(E4M3).max)
    c = np.abs(codes.astype(np.float64))
    step = 12 if block is None else block
    for start in range(0, 12, step):
        rows = slice(start, start + step)
        # each block (per batch entry for blocks, the whole array per tensor) reaches the max
        if block is None:
            assert c.max() == top and np.unique(scales).size == 1
        else:
            assert np.all(c[..., rows, :].max(axis=(-2, -1)) == top)
            assert np.all(scales[..., rows, :] == scales[..., start:start + 1, :])
    # rounding bound of e4m3fn: 2^-4 relative (3 mantissa bits), 2^-10 of a scale below normal
    err = np.abs(fp8.dequantize(codes, scales) - x)
    assert np.all(err <= np.abs(x) * 2.0**-4 + scales * 2.0**-10 * 1.0001)


def test_quantize_edge_cases() -> None:
    codes, scales = fp8.quantize(np.zeros((3, 4)), block=2)
    assert np.all(scales == 1.0) and np.all(codes.astype(np.float32) == 0)
    codes, scales = fp8.quantize(np.array([1.0, -2.0]))  # one row
    assert scales.shape == (1,) and fp8.dequantize(codes, scales).tolist() == [1.0, -2.0]
    with pytest.raises(ValueError, match="NaN or inf"):
        fp8.quantize(np.array([[1.0, np.inf]]))
    with pytest.raises(ValueError, match="block must be"):
        fp8.quantize(np.ones((2, 2)), block=0)
    with pytest.raises(TypeError, match="floating"):
        fp8.quantize(np.array(["a"]))
    codes, _ = fp8.quantize(np.ones((2, 2)) * 3, "float16")
    assert codes.dtype == np.float16


def _qkv(seed: int, shape: tuple[int, ...] = (1, 2, 96, 32), outliers: bool = False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(3):
        t = rng.standard_normal(shape)
        if outliers:  # FlashAttention-3's setup: N(0, 1) + N(0, 100) on 0.1% of entries
            t += rng.normal(0, 10, shape) * (rng.random(shape) < 0.001)
        out.append(t)
    return out


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


@pytest.mark.parametrize("order", fp8.KEY_ORDERS)
@pytest.mark.parametrize("p_scale", [1.0, 256.0])
def test_fp8_attention_in_float32_is_attention(order: str, p_scale: float) -> None:
    """With every cast a float32 one the kernel is plain float32 tiled attention."""
    q, k, v = _qkv(0)
    bias = np.random.default_rng(1).standard_normal((96, 96))
    ref = fm.attention_reference(q, k, v, bias=bias)
    got = fp8.fp8_attention(q, k, v, dtype="float32", scaling="none", block_k=40,
                            key_order=order, p_scale=p_scale, bias=bias)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=2e-6)


def test_fp8_attention_error_is_fp8_sized_and_hadamard_helps_outliers() -> None:
    q, k, v = _qkv(2, (1, 2, 256, 64), outliers=True)
    ref = fm.attention_reference(q, k, v)
    s = fp8.random_signs(64, np.random.default_rng(5))
    tensor = _rmse(fp8.fp8_attention(q, k, v, scaling="tensor", block_k=64), ref)
    block_h = _rmse(fp8.fp8_attention(q, k, v, scaling="block", block_k=64, block_q=64,
                                      hadamard_signs=s), ref)
    fp16 = _rmse(fp8.fp8_attention(q, k, v, dtype="float16", scaling="none"), ref)
    assert fp16 < 1e-3 < block_h < tensor < 0.05


def test_fp8_attention_sink_underflow_and_its_fixes() -> None:
    """A sink of strength 6 in the first key tile: forward order with P scale 1 loses the
    other keys' probabilities to underflow; reverse order or P scale 256 keeps them."""
    q, k, v = _qkv(4, (1, 1, 1024, 32))
    bias = np.zeros((1024, 1024))
    bias[:, :4] = 6.0
    ref = fm.attention_reference(q, k, v, bias=bias)

    def err(order: str, ps: float) -> float:
        return _rmse(fp8.fp8_attention(q, k, v, quantize_qkv=False, key_order=order,
                                       p_scale=ps, bias=bias), ref)

    worst = err("forward", 1.0) ** 2  # MSE, as the sink paper measures it
    assert worst > 1.5 * err("reverse", 256.0) ** 2
    assert worst > 1.5 * err("forward", 256.0) ** 2


def test_fp8_attention_fully_masked_row_is_zero() -> None:
    q, k, v = _qkv(6, (1, 1, 4, 8))
    bias = np.zeros((4, 4))
    bias[2] = -np.inf
    out = fp8.fp8_attention(q, k, v, bias=bias, block_k=2)
    assert np.all(out[0, 0, 2] == 0) and np.all(np.isfinite(out))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"scaling": "row"}, "scaling must be"), ({"key_order": "up"}, "key_order must be"),
    ({"block_k": 0}, "block_k must be"), ({"p_scale": 0.0}, "p_scale must be"),
])
def test_fp8_attention_validates(kwargs: dict, match: str) -> None:
    q, k, v = _qkv(7, (1, 1, 4, 8))
    with pytest.raises(ValueError, match=match):
        fp8.fp8_attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match="share D"):
        fp8.fp8_attention(q, k[..., :4], v)
