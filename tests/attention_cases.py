"""Shared inputs, option tables and comparisons for the tests/test_attention_*.py files.

OPTIONS names every attention option alone and in combination; ``options(name, ...)``
builds its keyword arguments for given shapes (bool masks and biases drawn from rng).
``check_against_reference`` runs flash_attention (and its backward) and compares out, lse
and the gradients with the float64 oracle.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

import flashmath as fm
from flashmath.attention.masks import alibi_bias

#: Option sets by name: every option alone, then combinations. Values are builders
#: (rng, B, H, Sq, Sk) -> kwargs.
OPTIONS: dict[str, Any] = {
    "plain": lambda r, b, h, sq, sk: {},
    "causal": lambda r, b, h, sq, sk: {"causal": True},
    "top_left": lambda r, b, h, sq, sk: {"causal": "top_left"},
    "window": lambda r, b, h, sq, sk: {"window": (3, 2)},
    "window_left": lambda r, b, h, sq, sk: {"window": (4, None)},
    "window_right": lambda r, b, h, sq, sk: {"window": (None, 1)},
    "sliding": lambda r, b, h, sq, sk: {"causal": True, "window": (5, 0)},
    "mask": lambda r, b, h, sq, sk: {"mask": r.random((b, 1, sq, sk)) < 0.7},
    "mask_per_head": lambda r, b, h, sq, sk: {"mask": r.random((h, sq, sk)) < 0.5},
    "bias": lambda r, b, h, sq, sk: {"bias": r.standard_normal((b, h, sq, sk))},
    "alibi": lambda r, b, h, sq, sk: {"bias": alibi_bias(h, sq, sk)},
    "softcap": lambda r, b, h, sq, sk: {"softcap": 0.8},
    "scale": lambda r, b, h, sq, sk: {"scale": 0.9},
    "kv_lengths": lambda r, b, h, sq, sk: {"kv_lengths": r.integers(0, sk + 1, b)},
    "q_lengths": lambda r, b, h, sq, sk: {"q_lengths": r.integers(0, sq + 1, b)},
    "lengths_causal": lambda r, b, h, sq, sk: {
        "causal": True, "q_lengths": r.integers(0, sq + 1, b),
        "kv_lengths": r.integers(0, sk + 1, b)},
    "lengths_top_left_window": lambda r, b, h, sq, sk: {
        "causal": "top_left", "window": (2, None), "kv_lengths": r.integers(0, sk + 1, b)},
    "softcap_bias_causal": lambda r, b, h, sq, sk: {
        "causal": True, "softcap": 1.5, "bias": r.standard_normal((1, h, sq, sk))},
    "everything": lambda r, b, h, sq, sk: {
        "causal": True, "window": (6, 0), "q_lengths": r.integers(0, sq + 1, b),
        "kv_lengths": r.integers(0, sk + 1, b), "bias": alibi_bias(h, sq, sk), "softcap": 2.0,
        "mask": r.random((b, 1, sq, sk)) < 0.8, "scale": 0.7},
}


def options(
    name: str, rng: np.random.Generator, b: int, h: int, sq: int, sk: int
) -> dict[str, Any]:
    return dict(OPTIONS[name](rng, b, h, sq, sk))


def qkv(
    rng: np.random.Generator, b: int = 1, h: int = 2, sq: int = 8, sk: int = 8, d: int = 4,
    *, h_kv: int | None = None, dv: int | None = None, dtype: Any = np.float64,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standard-normal q (B, H, Sq, D), k (B, H_kv, Sk, D), v (B, H_kv, Sk, Dv) in dtype."""
    h_kv = h if h_kv is None else h_kv
    dv = d if dv is None else dv
    q = rng.standard_normal((b, h, sq, d))
    k = rng.standard_normal((b, h_kv, sk, d))
    v = rng.standard_normal((b, h_kv, sk, dv))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def assert_close(got: np.ndarray, want: np.ndarray, *, rel: float, what: str = "") -> None:
    """|got - want| <= rel * max(1, max|want|) everywhere; -inf and NaN where want has them."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN pattern")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=f"{what}: -inf")
    fin = np.isfinite(want)
    scale = max(1.0, float(np.max(np.abs(want[fin]), initial=0.0)))
    err = float(np.max(np.abs(got[fin] - want[fin]), initial=0.0))
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:.3g} * {scale:.3g}"


def check_against_reference(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, *, block_q: int | None = None,
    block_k: int | None = None, grads: bool = True, rel: float = 1e-12,
    rng: np.random.Generator | None = None, **opts: Any,
) -> None:
    """flash_attention (out, lse) and, with grads, flash_attention_backward against the
    float64 oracle (float64 input: agreement to ``rel``, ~1e-12 of the output's scale)."""
    out, lse = fm.flash_attention(q, k, v, block_q=block_q, block_k=block_k, return_lse=True,
                                  **opts)
    ref, ref_lse = fm.attention_reference(q, k, v, return_lse=True, **opts)
    assert out.dtype == q.dtype and lse.dtype == ref_lse.dtype == np.float64
    assert_close(out, ref, rel=rel, what="out")
    assert_close(lse, ref_lse, rel=rel, what="lse")
    if not grads:
        return
    rng = np.random.default_rng(0) if rng is None else rng
    dout = rng.standard_normal(out.shape)
    got = fm.flash_attention_backward(dout, q, k, v, out, lse, block_q=block_q,
                                      block_k=block_k, **opts)
    want = fm.attention_reference_backward(dout, q, k, v, **opts)
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert np.isfinite(g).all(), f"{name}: not finite"
        assert_close(g, w, rel=10 * rel, what=name)


@st.composite
def problems(draw: Any, max_len: int = 24, max_block: int = 12) -> dict[str, Any]:
    """A hypothesis-drawn attention problem: q, k, v (float64, GQA groups, Dv != D
    allowed), tile sizes and a combination of one to three named option sets (later
    sets override earlier ones key by key)."""
    b, h_kv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    sq, sk = draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    d, dv = draw(st.integers(1, 9)), draw(st.integers(1, 5))
    names = draw(st.lists(st.sampled_from(sorted(OPTIONS)), min_size=1, max_size=3))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    q, k, v = qkv(rng, b, h_kv * group, sq, sk, d, h_kv=h_kv, dv=dv)
    opts: dict[str, Any] = {}
    for name in names:
        opts |= options(name, rng, b, h_kv * group, sq, sk)
    return {"q": q, "k": k, "v": v, "block_q": draw(st.integers(1, max_block)),
            "block_k": draw(st.integers(1, max_block)), "rng": rng, **opts}
