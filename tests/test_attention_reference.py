"""The oracle itself: closed forms, an independent per-row loop, finite differences, upcast."""

from __future__ import annotations

import numpy as np
import pytest

import flashmath as fm
from flashmath.attention.masks import alibi_bias
from flashmath.dtypes import DTYPES
from tests.attention_cases import OPTIONS, assert_close, options, qkv


def rowwise(q, k, v, *, scale=None, softcap=None, bias=None, allowed=None):
    """Attention one query row at a time in float64, written independently of the oracle."""
    b_, h_, sq, d = q.shape
    group = h_ // k.shape[1]
    scale = 1 / np.sqrt(d) if scale is None else scale
    out = np.zeros((b_, h_, sq, v.shape[-1]))
    lse = np.full((b_, h_, sq), -np.inf)
    for b, h, i in np.ndindex(b_, h_, sq):
        s = scale * (k[b, h // group] @ q[b, h, i])
        if softcap is not None:
            s = softcap * np.tanh(s / softcap)
        if bias is not None:
            s = s + np.broadcast_to(bias, (b_, h_, sq, k.shape[2]))[b, h, i]
        if allowed is not None:
            s = np.where(np.broadcast_to(allowed, (b_, h_, sq, k.shape[2]))[b, h, i], s, -np.inf)
        if np.isneginf(s).all():
            continue
        m = s.max()
        p = np.exp(s - m)
        out[b, h, i] = p @ v[b, h // group] / p.sum()
        lse[b, h, i] = m + np.log(p.sum())
    return out, lse


@pytest.mark.parametrize("name", ["plain", "bias", "alibi", "softcap", "scale", "mask_per_head",
                                  "softcap_bias_causal"])
def test_matches_an_independent_row_loop(name):
    rng = np.random.default_rng(0)
    q, k, v = qkv(rng, 2, 4, 5, 7, 3, h_kv=2, dv=2)
    opts = options(name, rng, 2, 4, 5, 7)
    allowed = None
    if opts.get("causal"):
        allowed = np.tri(5, 7, k=2, dtype=bool)  # bottom-right: j <= i + (7 - 5)
    if "mask" in opts:
        allowed = opts["mask"]
    want = rowwise(q, k, v, scale=opts.get("scale"), softcap=opts.get("softcap"),
                   bias=opts.get("bias"), allowed=allowed)
    out, lse = fm.attention_reference(q, k, v, return_lse=True, **opts)
    assert_close(out, want[0], rel=1e-14)
    assert_close(lse, want[1], rel=1e-14)


def test_closed_forms():
    rng = np.random.default_rng(1)
    _, k, v = qkv(rng, 1, 1, 4, 6, 3)
    q = np.zeros((1, 1, 4, 3))
    # Zero queries: uniform weights over the visible keys, lse = log(count).
    out, lse = fm.attention_reference(q, k, v, causal="top_left", return_lse=True)
    for i in range(4):
        np.testing.assert_allclose(out[0, 0, i], v[0, 0, : i + 1].mean(axis=0), rtol=1e-14)
        np.testing.assert_allclose(lse[0, 0, i], np.log(i + 1), rtol=1e-15)
    # One visible key: out = v of that key.
    out = fm.attention_reference(q, k, v, window=(0, 0), causal=True)
    np.testing.assert_array_equal(out[0, 0], v[0, 0, 2:6])
    # A huge softcap is no softcap; bias equal on a row changes nothing but lse.
    q, k, v = qkv(rng, 1, 2, 3, 5, 4)
    assert_close(fm.attention_reference(q, k, v, softcap=1e9), fm.attention_reference(q, k, v),
                 rel=1e-14)
    o1, l1 = fm.attention_reference(q, k, v, return_lse=True)
    o2, l2 = fm.attention_reference(q, k, v, bias=np.full((3, 1), 2.5), return_lse=True)
    assert_close(o2, o1, rel=1e-14)
    assert_close(l2, l1 + 2.5, rel=1e-14)


def test_gqa_is_repeated_heads():
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, 2, 6, 5, 4, 3, h_kv=2)
    kr, vr = np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1)
    assert_close(fm.attention_reference(q, k, v, causal=True),
                 fm.attention_reference(q, kr, vr, causal=True), rel=0)
    dout = rng.standard_normal(q.shape)
    dq, dk, dv = fm.attention_reference_backward(dout, q, k, v, causal=True)
    dqr, dkr, dvr = fm.attention_reference_backward(dout, q, kr, vr, causal=True)
    assert_close(dq, dqr, rel=1e-15)
    assert_close(dk, dkr.reshape(2, 2, 3, 4, 3).sum(axis=2), rel=1e-14)
    assert_close(dv, dvr.reshape(2, 2, 3, 4, 3).sum(axis=2), rel=1e-14)


def test_lengths_align_the_diagonal_to_the_valid_part():
    """With lengths, batch entry b behaves like an unpadded problem of its valid lengths."""
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 2, 1, 6, 8, 3)
    q_len, kv_len = np.array([4, 6]), np.array([7, 3])
    for causal in (True, "top_left"):
        out = fm.attention_reference(q, k, v, causal=causal, window=(2, None),
                                     q_lengths=q_len, kv_lengths=kv_len)
        for b in range(2):
            keys = slice(0, kv_len[b])
            want = fm.attention_reference(q[b:b + 1, :, : q_len[b]], k[b:b + 1, :, keys],
                                          v[b:b + 1, :, keys], causal=causal, window=(2, None))
            assert_close(out[b:b + 1, :, : q_len[b]], want, rel=0)
            assert (out[b, :, q_len[b]:] == 0).all()


@pytest.mark.parametrize("name", ["plain", "softcap_bias_causal", "everything", "mask_per_head"])
def test_gradients_by_finite_differences(name):
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, 1, 2, 4, 5, 3, h_kv=1, dv=2)
    opts = options(name, rng, 1, 2, 4, 5)
    dout = rng.standard_normal((1, 2, 4, 2))
    grads = fm.attention_reference_backward(dout, q, k, v, **opts)
    eps = 1e-6
    for x, g in zip((q, k, v), grads, strict=True):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            saved = x[idx]
            x[idx] = saved + eps
            up = np.sum(dout * fm.attention_reference(q, k, v, **opts))
            x[idx] = saved - eps
            down = np.sum(dout * fm.attention_reference(q, k, v, **opts))
            x[idx] = saved
            num[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(g, num, atol=1e-8)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16", "float8_e4m3fn"])
def test_upcast_returns_float64_and_same_dtype_returns_the_input_dtype(dtype):
    dt = DTYPES[dtype]
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, 1, 2, 6, 7, 4, dtype=dt)
    out, lse = fm.attention_reference(q, k, v, causal=True, return_lse=True)
    assert out.dtype == lse.dtype == np.float64
    naive, naive_lse = fm.attention_reference(q, k, v, causal=True, upcast=False, return_lse=True)
    assert naive.dtype == dt
    assert naive_lse.dtype == (np.float64 if dtype == "float64" else np.float32)
    eps = float(np.finfo(np.float32).eps) if dtype == "float32" else None
    if dtype == "float64":
        assert_close(naive, out, rel=1e-15)
    elif eps is not None:
        assert_close(naive, out, rel=50 * eps)
    if dtype != "float8_e4m3fn":
        grads = fm.attention_reference_backward(np.ones_like(out), q, k, v, upcast=False)
        assert all(g.dtype == dt for g in grads)
        assert all(g.dtype == np.float64 for g in fm.attention_reference_backward(
            np.ones_like(out), q, k, v))


def test_same_dtype_rounds_every_step():
    """float16 naive is worse than float16 inputs computed in float64 rounded once."""
    rng = np.random.default_rng(6)
    q, k, v = qkv(rng, 1, 1, 64, 256, 32, dtype=np.float16)
    exact = fm.attention_reference(q, k, v)
    naive = fm.attention_reference(q, k, v, upcast=False)
    once = exact.astype(np.float16)
    assert np.abs(naive - exact).max() > 2 * np.abs(once - exact).max()


def test_everything_option_set_is_covered():
    """Every option of the API appears in at least one named option set of the tables."""
    rng = np.random.default_rng(7)
    keys = set()
    for name in OPTIONS:
        keys |= set(options(name, rng, 1, 2, 3, 4))
    assert keys == {"causal", "window", "mask", "bias", "kv_lengths", "q_lengths", "softcap",
                    "scale"}
    assert alibi_bias(2, 3, 4).shape == (1, 2, 3, 4)


def test_regression_nan_in_padding_values_stays_out():
    """Keys beyond kv_lengths are never read: a NaN left in a cache's padding must not give
    0 * NaN rows, in the oracle as in the tiled kernel and in split-KV decoding."""
    from flashmath.attention.reference import attention_reference_backward

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, n, 4)) for n in (2, 4, 4))
    v[0, 0, 3] = k[0, 0, 3] = np.nan
    ref = fm.attention_reference(q, k, v, kv_lengths=[3])
    clean = fm.attention_reference(q, k[:, :, :3], v[:, :, :3])
    np.testing.assert_array_equal(ref, clean)
    np.testing.assert_allclose(fm.flash_attention(q, k, v, kv_lengths=[3]), clean, rtol=1e-13)
    np.testing.assert_allclose(fm.flash_decode(q, k, v, cache_lengths=[3]), clean, rtol=1e-13)
    grads = attention_reference_backward(np.ones((1, 1, 2, 4)), q, k, v, kv_lengths=[3])
    assert all(np.isfinite(g[:, :, :3]).all() for g in grads)


def test_regression_boolean_bias_is_refused():
    q, k, v = qkv(np.random.default_rng(0), 1, 1, 3, 4, 4)
    with pytest.raises(TypeError, match="bias: got a boolean array"):
        fm.attention_reference(q, k, v, bias=np.ones((3, 4), bool))
    with pytest.raises(TypeError, match="bias: got a boolean array"):
        fm.flash_attention(q, k, v, bias=np.ones((3, 4), bool))
