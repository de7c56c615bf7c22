"""Attention sinks (gpt-oss) and ALiBi slopes (flash-attention's alibi_slopes) in the
oracle: against independent formulas, merge_outputs and finite differences."""

import numpy as np
import pytest

import flashmath as fm
from flashmath.attention.masks import alibi_bias, alibi_slopes


def _qkv(b=2, h=4, hkv=2, sq=5, sk=7, d=3, dv=4, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal((b, h, sq, d)),
            scale * rng.standard_normal((b, hkv, sk, d)), rng.standard_normal((b, hkv, sk, dv)))


def _sink_softmax_attention(q, k, v, sinks):
    """softmax over [scores, sink] with the sink's column dropped, written out directly."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, 1), np.repeat(v, group, 1)
    s = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    col = np.broadcast_to(sinks[None, :, None, None], (*s.shape[:3], 1))
    full = np.concatenate([s, col], axis=-1)
    p = np.exp(full - full.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    lse = np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1)) + full.max(-1)
    return p[..., :-1] @ v, lse


def test_sinks_join_the_denominator_and_carry_no_value():
    q, k, v = _qkv()
    sinks = np.array([0.5, -1.0, 3.0, -np.inf])
    out, lse = fm.attention_reference(q, k, v, sinks=sinks, return_lse=True)
    want, want_lse = _sink_softmax_attention(q, k, v, sinks)
    np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-14)


def test_a_sink_is_a_zero_value_state_merged_by_lse():
    q, k, v = _qkv(seed=1)
    sinks = np.array([1.0, 0.0, -2.0, 4.0])
    plain, plain_lse = fm.attention_reference(q, k, v, return_lse=True)
    zero = np.zeros_like(plain)
    sink_lse = np.broadcast_to(sinks[None, :, None], plain_lse.shape)
    merged, merged_lse = fm.merge_outputs([plain, zero], [plain_lse, sink_lse])
    out, lse = fm.attention_reference(q, k, v, sinks=sinks, return_lse=True)
    np.testing.assert_allclose(out, merged, rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(lse, merged_lse, rtol=1e-15)


def test_a_fully_masked_row_with_a_sink_gives_zeros_and_lse_equal_to_the_sink():
    q, k, v = _qkv(b=1, h=2, hkv=2)
    mask = np.ones((1, 1, 5, 7), bool)
    mask[..., 2, :] = False
    sinks = np.array([0.25, -3.0])
    out, lse = fm.attention_reference(q, k, v, mask=mask, sinks=sinks, return_lse=True)
    assert (out[0, :, 2] == 0).all()
    np.testing.assert_array_equal(lse[0, :, 2], sinks)
    dq, *_, ds = fm.attention_reference_backward(np.ones_like(out), q, k, v, mask=mask,
                                                 sinks=sinks)
    assert (dq[0, :, 2] == 0).all() and np.isfinite(ds).all()


def _fd(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        up = f()
        x[idx] = old - eps
        down = f()
        x[idx] = old
        g[idx] = (up - down) / (2 * eps)
    return g


@pytest.mark.parametrize("opts", [{}, {"causal": True}, {"window": (2, 1), "softcap": 2.0}])
def test_sink_gradients_match_finite_differences(opts):
    q, k, v = _qkv(b=1, h=2, hkv=1, sq=3, sk=4, d=2, dv=2, seed=2)
    sinks = np.array([0.3, -0.7])
    dout = np.random.default_rng(3).standard_normal((1, 2, 3, 2))

    def loss():
        return float(np.sum(dout * fm.attention_reference(q, k, v, sinks=sinks, **opts)))

    dq, dk, dv, ds = fm.attention_reference_backward(dout, q, k, v, sinks=sinks, **opts)
    for got, x in ((dq, q), (dk, k), (dv, v), (ds, sinks)):
        np.testing.assert_allclose(got, _fd(loss, x), rtol=1e-6, atol=1e-8)


def test_without_sinks_the_backward_returns_three_gradients():
    q, k, v = _qkv()
    assert len(fm.attention_reference_backward(np.ones((2, 4, 5, 4)), q, k, v)) == 3


@pytest.mark.parametrize("causal", [False, True])
def test_alibi_slopes_equal_the_alibi_bias(causal):
    q, k, v = _qkv(h=6, hkv=3)
    slopes = alibi_slopes(6)
    got = fm.attention_reference(q, k, v, alibi_slopes=slopes, causal=causal)
    want = fm.attention_reference(q, k, v, bias=alibi_bias(6, 5, 7), causal=causal)
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-16)


def test_per_batch_alibi_slopes_and_lengths_follow_each_rows_diagonal():
    q, k, v = _qkv(b=2, h=2, hkv=2)
    slopes = np.array([[0.5, 0.25], [1.0, 0.125]])
    kv_len, q_len = np.array([7, 4]), np.array([5, 3])
    got = fm.attention_reference(q, k, v, alibi_slopes=slopes, kv_lengths=kv_len,
                                 q_lengths=q_len)
    for b in range(2):
        i, j = np.arange(5)[:, None], np.arange(7)[None, :]
        bias = -slopes[b][:, None, None] * np.abs(j - i - (kv_len[b] - q_len[b]))
        want = fm.attention_reference(q[b:b + 1], k[b:b + 1], v[b:b + 1], bias=bias[None],
                                      kv_lengths=kv_len[b:b + 1], q_lengths=q_len[b:b + 1])
        np.testing.assert_allclose(got[b:b + 1], want, rtol=1e-14, atol=1e-16)


def test_alibi_with_top_left_causal_measures_from_the_top_left_diagonal():
    q, k, v = _qkv(b=1, h=2, hkv=2)
    slopes = np.array([0.5, 0.25])
    got = fm.attention_reference(q, k, v, alibi_slopes=slopes, causal="top_left")
    dist = np.abs(np.arange(7)[None, :] - np.arange(5)[:, None])
    want = fm.attention_reference(q, k, v, bias=-(slopes[:, None, None] * dist)[None],
                                  causal="top_left")
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sinks": np.zeros(3)}, r"sinks: expected one logit per query head, shape \(H,\) = \(4,\)"),
    ({"sinks": np.array([0, np.nan, 0, 0])}, "sinks: must be finite or -inf"),
    ({"sinks": np.array([0, np.inf, 0, 0])}, "sinks: must be finite or -inf"),
    ({"sinks": np.array(["a"] * 4)}, "sinks: expected real numbers"),
    ({"alibi_slopes": np.zeros(3)}, r"alibi_slopes: expected shape \(H,\) = \(4,\) or \(B, H\)"),
    ({"alibi_slopes": np.array([1, np.inf, 1, 1])}, "alibi_slopes: must be finite"),
])
def test_bad_sinks_and_slopes_are_refused_by_name(kwargs, message):
    q, k, v = _qkv()
    with pytest.raises((ValueError, TypeError), match=message):
        fm.attention_reference(q, k, v, **kwargs)


def test_narrow_baseline_with_sinks_stays_close_to_the_oracle():
    q, k, v = _qkv(seed=4)
    sinks = np.array([0.5, 1.0, -1.0, 2.0])
    q16, k16, v16 = (x.astype(np.float16) for x in (q, k, v))
    base = fm.attention_reference(q16, k16, v16, sinks=sinks, upcast=False)
    oracle = fm.attention_reference(q16, k16, v16, sinks=sinks)
    assert base.dtype == np.float16
    assert 0 < np.abs(base - oracle).max() < 4e-3


def test_the_naive_formula_takes_sinks_and_alibi_too():
    q, k, v = _qkv(seed=5)
    opts = {"sinks": np.array([0.5, 1.0, -1.0, 2.0]), "alibi_slopes": alibi_slopes(4)}
    np.testing.assert_allclose(fm.naive.attention(q, k, v, **opts),
                               fm.attention_reference(q, k, v, **opts), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("with_sinks", [False, True])
def test_gradients_flow_through_the_returned_lse(with_sinks):
    """d/dx [sum(dout * out) + sum(dlse * lse)] by finite differences, float64."""
    q, k, v = _qkv(b=1, h=2, hkv=1, sq=3, sk=4, d=2, dv=2, seed=6)
    sinks = np.array([0.2, -0.4]) if with_sinks else None
    rng = np.random.default_rng(7)
    dout, dlse = rng.standard_normal((1, 2, 3, 2)), rng.standard_normal((1, 2, 3))

    def loss():
        out, lse = fm.attention_reference(q, k, v, sinks=sinks, causal=True, return_lse=True)
        return float(np.sum(dout * out) + np.sum(dlse * lse))

    grads = fm.attention_reference_backward(dout, q, k, v, sinks=sinks, causal=True, dlse=dlse)
    xs = (q, k, v) + ((sinks,) if with_sinks else ())
    assert len(grads) == len(xs)
    for got, x in zip(grads, xs, strict=True):
        np.testing.assert_allclose(got, _fd(loss, x), rtol=1e-6, atol=1e-8)


def test_dlse_has_the_shape_of_lse():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"dlse: expected shape \(2, 4, 5\)"):
        fm.attention_reference_backward(np.ones((2, 4, 5, 4)), q, k, v, dlse=np.ones((2, 4)))


# --- the tiled kernel against the oracle: sinks, dlse, ALiBi slopes ---------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("opts", [{}, {"causal": True}, {"window": (2, 1), "softcap": 3.0},
                                  {"kv_lengths": np.array([7, 0]), "causal": True}])
def test_tiled_sinks_dlse_and_alibi_match_the_oracle(dtype, opts):
    q, k, v = (x.astype(dtype) for x in _qkv(seed=8))
    rng = np.random.default_rng(9)
    dout = rng.standard_normal((2, 4, 5, 4)).astype(dtype)
    dlse = rng.standard_normal((2, 4, 5))
    extra = {"sinks": np.array([0.5, -1.0, 2.0, -np.inf]),
             "alibi_slopes": alibi_slopes(4), **opts}
    out, lse = fm.flash_attention(q, k, v, return_lse=True, block_q=2, block_k=3, **extra)
    grads = fm.flash_attention_backward(dout, q, k, v, out, lse, dlse=dlse, block_q=2,
                                        block_k=3, **extra)
    ref_out, ref_lse = fm.attention_reference(q, k, v, return_lse=True, **extra)
    ref = fm.attention_reference_backward(dout, q, k, v, dlse=dlse, **extra)
    base = fm.attention_reference_backward(dout, q, k, v, dlse=dlse, upcast=False, **extra)
    assert len(grads) == 4
    np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=1e-12 if dtype == np.float64
                               else 1e-5)
    if dtype == np.float64:
        np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-13)
        for got, want in zip(grads, ref, strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        return
    eps = float(np.finfo(dtype).eps)
    for got, want, naive in zip(grads, ref, base, strict=True):
        err = np.abs(np.asarray(got, np.float64) - want).max()
        floor = eps * np.abs(want).max()
        assert err <= 3 * max(np.abs(np.asarray(naive, np.float64) - want).max(), floor)


def test_tiled_rows_that_see_nothing_with_and_without_a_sink():
    """Causal with Sq > Sk: the first rows see no key. With a sink they give out 0 and
    lse = sink; a head whose sink is -inf gives lse -inf; never NaN."""
    q, k, v = _qkv(b=1, h=2, hkv=2, sq=9, sk=4, seed=10)
    sinks = np.array([1.5, -np.inf])
    out, lse = fm.flash_attention(q, k, v, causal=True, sinks=sinks, return_lse=True,
                                  block_q=4, block_k=2)
    ref_out, ref_lse = fm.attention_reference(q, k, v, causal=True, sinks=sinks,
                                              return_lse=True)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, ref_out, atol=1e-14)
    np.testing.assert_array_equal(lse[0, :, :5], np.array([[1.5] * 5, [-np.inf] * 5]))
    np.testing.assert_allclose(lse, ref_lse, atol=1e-13)
