"""Packed variable-length attention (flash_attn_varlen_func's layout) against the padded
API with lengths on the same data, and against the float64 oracle per sequence."""

import numpy as np
import pytest

import flashmath as fm

LENGTHS = [(3, 5), (0, 4), (7, 7), (1, 1), (5, 0), (12, 9)]  # (Lq, Lk) per sequence


def _packed(lengths, h=4, hkv=2, d=8, dv=6, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    tq, tk = sum(a for a, _ in lengths), sum(b for _, b in lengths)
    q = rng.standard_normal((tq, h, d)).astype(dtype)
    k = rng.standard_normal((tk, hkv, d)).astype(dtype)
    v = rng.standard_normal((tk, hkv, dv)).astype(dtype)
    cu_q = np.concatenate([[0], np.cumsum([a for a, _ in lengths])]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum([b for _, b in lengths])]).astype(np.int32)
    return q, k, v, cu_q, cu_k


def _padded(x, cu, length):
    """(total, H, D) packed -> (B, H, length, D) zero-padded."""
    b = len(cu) - 1
    out = np.zeros((b, x.shape[1], length, x.shape[2]), x.dtype)
    for i in range(b):
        out[i, :, : cu[i + 1] - cu[i]] = x[cu[i]:cu[i + 1]].transpose(1, 0, 2)
    return out


def _unpad(x, cu):
    return np.concatenate([x[i, :, : cu[i + 1] - cu[i]].transpose(1, 0, 2)
                           for i in range(len(cu) - 1)])


@pytest.mark.parametrize("opts", [{}, {"causal": True}, {"causal": "top_left"},
                                  {"window": (2, 1)}, {"softcap": 5.0, "scale": 0.3}])
def test_equals_the_padded_api_with_lengths(opts):
    q, k, v, cu_q, cu_k = _packed(LENGTHS)
    out, lse = fm.flash_attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **opts)
    lq, lk = np.diff(cu_q), np.diff(cu_k)
    pq, pk, pv = _padded(q, cu_q, lq.max()), _padded(k, cu_k, lk.max()), _padded(v, cu_k, lk.max())
    ref, ref_lse = fm.flash_attention(pq, pk, pv, q_lengths=lq, kv_lengths=lk,
                                      return_lse=True, **opts)
    np.testing.assert_allclose(out, _unpad(ref, cu_q), rtol=0, atol=1e-14)
    np.testing.assert_allclose(lse, _unpad(ref_lse[..., None], cu_q)[..., 0].T, atol=1e-13)
    oracle = fm.attention_reference(pq, pk, pv, q_lengths=lq, kv_lengths=lk, **opts)
    np.testing.assert_allclose(out, _unpad(oracle, cu_q), rtol=0, atol=1e-14)


def test_bit_for_bit_with_the_padded_api_when_the_tiles_coincide():
    lengths = [(16, 16), (16, 16), (16, 16)]
    q, k, v, cu_q, cu_k = _packed(lengths, dtype=np.float32)
    out = fm.flash_attention_varlen(q, k, v, cu_q, cu_k, causal=True, block_q=8, block_k=8)
    ref = fm.flash_attention(_padded(q, cu_q, 16), _padded(k, cu_k, 16), _padded(v, cu_k, 16),
                             causal=True, block_q=8, block_k=8)
    np.testing.assert_array_equal(out, _unpad(ref, cu_q))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_backward_equals_the_padded_backward(dtype):
    q, k, v, cu_q, cu_k = _packed(LENGTHS, dtype=dtype)
    dout = np.random.default_rng(1).standard_normal((q.shape[0], q.shape[1], 6)).astype(dtype)
    out, lse = fm.flash_attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    dq, dk, dv = fm.flash_attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k,
                                                    causal=True)
    lq, lk = np.diff(cu_q), np.diff(cu_k)
    pq, pk, pv = _padded(q, cu_q, lq.max()), _padded(k, cu_k, lk.max()), _padded(v, cu_k, lk.max())
    pdo = _padded(dout, cu_q, lq.max())
    ref = fm.attention_reference_backward(pdo, pq, pk, pv, q_lengths=lq, kv_lengths=lk,
                                          causal=True)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    for got, want, cu in ((dq, ref[0], cu_q), (dk, ref[1], cu_k), (dv, ref[2], cu_k)):
        np.testing.assert_allclose(got, _unpad(want, cu), rtol=0, atol=tol)


def test_a_sequence_without_keys_gives_zeros_and_lse_minus_inf():
    q, k, v, cu_q, cu_k = _packed([(3, 0), (2, 2)])
    out, lse = fm.flash_attention_varlen(q, k, v, cu_q, cu_k, return_lse=True)
    assert (out[:3] == 0).all() and np.isneginf(lse[:, :3]).all()
    assert np.isfinite(lse[:, 3:]).all()


def test_no_sequences():
    q, k, v, cu_q, cu_k = _packed([])
    out, lse = fm.flash_attention_varlen(q, k, v, cu_q, cu_k, return_lse=True)
    assert out.shape == (0, 4, 6) and lse.shape == (4, 0)


@pytest.mark.parametrize(("cu_q", "cu_k", "kwargs", "message"), [
    ([1, 3, 7], [0, 3, 7], {}, "cu_seqlens_q: must start at 0"),
    ([0, 4, 3, 7], [0, 3, 4, 7], {}, "cu_seqlens_q: must not decrease"),
    ([0, 3, 6], [0, 3, 7], {}, "cu_seqlens_q: ends at 6 but the packed tensor has 7"),
    ([0, 3, 7], [0, 7], {}, "cu_seqlens_q has 2 sequences, cu_seqlens_k 1"),
    ([0.0, 3.0, 7.0], [0, 3, 7], {}, "cu_seqlens_q: expected integers"),
    ([0, 3, 7], [0, 3, 7], {"max_seqlen_q": 3}, "max_seqlen for cu_seqlens_q is 3"),
    ([[0, 3, 7]], [0, 3, 7], {}, "cu_seqlens_q: expected a 1-D array"),
])
def test_bad_cu_seqlens_are_refused_by_name(cu_q, cu_k, kwargs, message):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((7, 2, 4)) for _ in range(3))
    with pytest.raises((ValueError, TypeError), match=message):
        fm.flash_attention_varlen(q, k, v, np.array(cu_q), np.array(cu_k), **kwargs)


def test_padded_layout_is_refused_with_the_expected_one_named():
    q = np.zeros((1, 2, 7, 4))
    with pytest.raises(ValueError, match=r"q: expected a 3-D packed array \(total_q, H, D\)"):
        fm.flash_attention_varlen(q, q, q, np.array([0, 7]), np.array([0, 7]))
