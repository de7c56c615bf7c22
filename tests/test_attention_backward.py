"""flash_attention_backward: dq, dk, dv against the float64 oracle's explicit gradients."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

import flashmath as fm
from flashmath.attention import tiled
from tests.attention_cases import (
    OPTIONS,
    assert_close,
    check_against_reference,
    options,
    problems,
    qkv,
)

SHAPES = [  # (B, H, H_kv, Sq, Sk, D, Dv)
    (2, 2, 2, 12, 12, 6, 6),  # square
    (1, 4, 2, 7, 19, 5, 3),  # Sq < Sk, GQA, Dv != D
    (1, 3, 1, 17, 6, 4, 5),  # Sq > Sk, MQA
    (2, 2, 1, 1, 13, 3, 3),  # one query
    (1, 2, 2, 9, 1, 3, 2),  # one key
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize(("bq", "bk"), [(None, None), (4, 3)])
def test_gradients_match_reference(shape, name, bq, bk):
    b, h, h_kv, sq, sk, d, dv = shape
    rng = np.random.default_rng([sq, sk, d, len(name), 1])
    q, k, v = qkv(rng, b, h, sq, sk, d, h_kv=h_kv, dv=dv)
    check_against_reference(q, k, v, block_q=bq, block_k=bk, rng=rng,
                            **options(name, rng, b, h, sq, sk))


@given(problems(max_len=20, max_block=10))
def test_gradients_hypothesis(problem):
    check_against_reference(**problem)


@pytest.mark.parametrize("case", [
    {"q_lengths": np.array([3, 0]), "kv_lengths": np.array([5, 2])},
    {"causal": True},  # Sq > Sk: the first rows see nothing
    {"causal": "top_left", "window": (1, 0)},  # the last keys are seen by no query
    {"mask": np.zeros((1, 1, 9, 6), bool)},  # nothing at all
])
def test_masked_rows_and_unseen_keys_get_zero_gradients(case):
    rng = np.random.default_rng(9)
    q, k, v = qkv(rng, 2, 2, 9, 6, 4)
    if case.get("causal") == "top_left":
        q = q[:, :, :4]  # 4 queries: keys 4 and 5 are seen by none
    out, lse = fm.flash_attention(q, k, v, block_q=2, block_k=4, return_lse=True, **case)
    dout = rng.standard_normal(out.shape)
    dq, dk, dv = fm.flash_attention_backward(dout, q, k, v, out, lse, block_q=2, block_k=4,
                                             **case)
    want = fm.attention_reference_backward(dout, q, k, v, **case)
    for got, ref in zip((dq, dk, dv), want, strict=True):
        assert np.isfinite(got).all()
        assert_close(got, ref, rel=1e-12)
    empty_rows = np.isneginf(lse)
    assert empty_rows.any() or case.get("causal") == "top_left"
    assert (dq[empty_rows] == 0).all()
    ones = np.ones_like(out)  # dv = P^T 1: zero exactly for the keys no query sees
    p_cols = np.abs(fm.attention_reference_backward(ones, q, k, v, **case)[2])
    unseen = (p_cols == 0).all(axis=-1)
    assert unseen.any() or case.get("causal") is True  # there, every key is seen
    assert (dk[unseen] == 0).all() and (dv[unseen] == 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, "bfloat16"])
def test_gradients_come_back_in_the_input_dtype(dtype):
    from flashmath.dtypes import as_dtype

    dt = as_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    rng = np.random.default_rng(10)
    q, k, v = qkv(rng, 1, 2, 16, 12, 8, h_kv=1, dtype=dt)
    out, lse = fm.flash_attention(q, k, v, causal=True, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(dt)
    grads = fm.flash_attention_backward(dout, q, k, v, out, lse, causal=True)
    want = fm.attention_reference_backward(dout, q, k, v, causal=True)
    for g, w in zip(grads, want, strict=True):
        assert g.dtype == dt
        assert_close(g, w, rel=1e-5 if dt == np.float32 else 2e-2)


def test_float8_backward_is_rejected():
    from flashmath.dtypes import DTYPES

    q = np.zeros((1, 1, 2, 2), DTYPES["float8_e4m3fn"])
    out, lse = fm.flash_attention(q, q, q, return_lse=True)
    with pytest.raises(TypeError, match="float8"):
        fm.flash_attention_backward(out, q, q, q, out, lse)


@pytest.mark.parametrize("causal", [True, "top_left"])
def test_shards_with_offsets_rebuild_the_whole(causal):
    """Ring attention's decomposition: forward per (query shard, key shard) merged by lse,
    then backward per pair with the merged out and lse; summed, both equal the whole."""
    rng = np.random.default_rng(11)
    b, h, sq, sk, d = 2, 2, 14, 18, 4
    q, k, v = qkv(rng, b, h, sq, sk, d, h_kv=1)
    opts = {"causal": causal, "window": (7, None), "kv_lengths": np.array([18, 11])}
    out, lse = fm.flash_attention(q, k, v, return_lse=True, **opts)
    dout = rng.standard_normal(out.shape)
    dq, dk, dv = fm.flash_attention_backward(dout, q, k, v, out, lse, **opts)
    q_cuts, k_cuts = [(0, 5), (5, 14)], [(0, 6), (6, 12), (12, 18)]
    shard = {"q_total": sq, "k_total": sk, **opts}
    got_dq, got_dk, got_dv = np.zeros_like(dq), np.zeros_like(dk), np.zeros_like(dv)
    for q0, q1 in q_cuts:
        parts = [
            tiled.tiled_forward(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], q_offset=q0,
                           k_offset=k0, block_q=3, block_k=4, **shard)
            for k0, k1 in k_cuts
        ]
        m = np.max([p[1] for p in parts], axis=0)
        safe = np.where(np.isneginf(m), 0, m)
        w = [np.exp(p[1] - safe) for p in parts]
        merged = sum(wi[..., None] * p[0] for wi, p in zip(w, parts, strict=True)) / np.where(
            sum(w) == 0, 1, sum(w))[..., None]
        with np.errstate(divide="ignore"):
            merged_lse = safe + np.log(sum(w))
        assert_close(merged, out[:, :, q0:q1], rel=1e-13)
        assert_close(merged_lse, lse[:, :, q0:q1], rel=1e-13)
        for k0, k1 in k_cuts:
            g = tiled.tiled_backward(dout[:, :, q0:q1], q[:, :, q0:q1], k[:, :, k0:k1],
                                v[:, :, k0:k1], out[:, :, q0:q1], lse[:, :, q0:q1],
                                q_offset=q0, k_offset=k0, block_q=3, block_k=4, **shard)
            got_dq[:, :, q0:q1] += g[0]
            got_dk[:, :, k0:k1] += g[1]
            got_dv[:, :, k0:k1] += g[2]
    for got, want in ((got_dq, dq), (got_dk, dk), (got_dv, dv)):
        assert_close(got, want, rel=1e-12)


# --- The given out and lse (issue 17: they used to be ignored without a word) ---

_WRONG = {
    "lse + 1": lambda out, lse: (out, lse + 1),
    "all-NaN lse": lambda out, lse: (out, np.full_like(lse, np.nan)),
    "2 * out": lambda out, lse: (2 * out, lse),
    "all-NaN out": lambda out, lse: (np.full_like(out, np.nan), lse),
    "lse of another causal mode": None,  # filled in the test
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, "bfloat16"])
@pytest.mark.parametrize("wrong", [w for w in _WRONG if _WRONG[w] is not None])
def test_wrong_out_or_lse_is_an_error_naming_it(dtype, wrong):
    from flashmath.dtypes import as_dtype

    dt = as_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    rng = np.random.default_rng(17)
    q, k, v = qkv(rng, 1, 2, 40, 50, 8, h_kv=1, dtype=dt)
    out, lse = fm.flash_attention(q, k, v, causal=True, return_lse=True, block_k=16)
    dout = rng.standard_normal(out.shape).astype(dt)
    bad_out, bad_lse = _WRONG[wrong](out, lse)
    name = "lse" if "lse" in wrong else "out"
    with pytest.raises(ValueError, match=rf"^{name}: "):
        fm.flash_attention_backward(dout, q, k, v, bad_out, bad_lse, causal=True, block_k=16)


def test_out_and_lse_of_other_options_or_shapes_are_errors():
    rng = np.random.default_rng(18)
    q, k, v = qkv(rng, 1, 2, 24, 24, 8, dtype=np.float32)
    out, lse = fm.flash_attention(q, k, v, return_lse=True)  # not causal
    dout = rng.standard_normal(out.shape).astype(np.float32)
    with pytest.raises(ValueError, match=r"^(out|lse): "):
        fm.flash_attention_backward(dout, q, k, v, out, lse, causal=True)
    with pytest.raises(ValueError, match=r"^lse: expected shape \(1, 2, 24\)"):
        fm.flash_attention_backward(dout, q, k, v, out, lse[..., :-1])
    with pytest.raises(ValueError, match=r"^out: expected shape \(1, 2, 24, 8\)"):
        fm.flash_attention_backward(dout, q, k, v, out[:, :1], lse)


def test_given_out_and_lse_that_are_right_give_the_same_gradients_as_recomputed():
    """The backward builds p and delta from its own recomputation; the forward's out and
    lse pass the check (with other tile sizes too), and NaN rows of NaN input are allowed."""
    rng = np.random.default_rng(19)
    q, k, v = qkv(rng, 2, 2, 30, 45, 8, dtype=np.float32)
    q[0, 1, 3, 0] = np.nan  # that row's out and lse are NaN: not an error
    out, lse = fm.flash_attention(q, k, v, causal=True, return_lse=True, block_q=7, block_k=9)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    g1 = fm.flash_attention_backward(dout, q, k, v, out, lse, causal=True)
    g2 = fm.flash_attention_backward(dout, q, k, v, out, lse, causal=True, block_q=5,
                                     block_k=11)
    want = fm.attention_reference_backward(dout, q, k, v, causal=True)
    for a, b, w in zip(g1, g2, want, strict=True):  # slice (0, 1) holds the NaN row
        for x in (a, b):
            assert_close(x[1], w[1], rel=1e-5)
            assert_close(x[0, 0], w[0, 0], rel=1e-5)
    assert np.isnan(out[0, 1, 3]).all() and np.isfinite(out[1]).all()
