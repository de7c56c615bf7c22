"""The O(Sq * Sk) attention oracle: materialises the scores, in float64 or in the input dtype.

Everything else in flashmath is tested against :func:`attention_reference` (forward) and
:func:`attention_reference_backward` (gradients). Both write the textbook formulas down
with the whole (B, H, Sq, Sk) score and probability matrices in memory, so keep them to
small shapes. The score of query i and key j of head h is

    s = softcap(scale * q_i . k_j) + bias[b, h, i, j]      softcap(x) = c * tanh(x / c)

then ``score_mod`` (if given; :mod:`flashmath.attention.mods`) modifies s, then the masks
of :mod:`flashmath.attention.masks` and ``mask_mod`` remove pairs (probability exactly 0),
P = softmax(s) over the keys, out = P @ V, lse = log(sum_j exp(s_ij)).

Two modes:

``upcast=True`` (the oracle)
    Every operation in float64; returns float64 (out, lse and gradients), whatever the
    input dtype, so callers compare against full precision.
``upcast=False`` (the naive same-dtype baseline of the accuracy rule)
    Every operation's result is rounded to the input dtype, one operation at a time:
    matmuls (accumulated in float32, as GPU kernels and np.matmul on float16 do), the
    scale, softcap, bias, the shift by the row max, exp, the row sum and the division.
    Returns the input dtype; lse is float32 (float64 for float64 input). For float32
    input this is plain float32 arithmetic.

Edge cases (docs/conventions.md): a row with nothing to attend to (causal/window/lengths/mask/
bias = -inf) gives out 0 and lse -inf, and its gradients are 0; keys no query sees get
dk = dv = 0; +inf or NaN in a row's scores makes that row NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from flashmath.attention.mods import apply_score_mod, score_mod_grad
from flashmath.attention.options import (
    AttentionOptions,
    Causal,
    Window,
    check_backward_inputs,
    resolve,
)
from flashmath.dtypes import accumulate_dtype
from flashmath.rounding import cast
from flashmath.softmax.rule import row_shift

__all__ = ["attention_reference", "attention_reference_backward"]


def attention_reference(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: Causal = False,
    window: Window = None,
    mask: Any = None,
    bias: Any = None,
    kv_lengths: Any = None,
    q_lengths: Any = None,
    softcap: float | None = None,
    scale: float | None = None,
    alibi_slopes: Any = None,
    sinks: Any = None,
    score_mod: Any = None,
    mask_mod: Any = None,
    block_mask: Any = None,
    upcast: bool = True,
    return_lse: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attention by the textbook formula, materialising the (B, H, Sq, Sk) scores.

    Parameters
    ----------
    q : (B, H, Sq, D); k : (B, H_kv, Sk, D); v : (B, H_kv, Sk, Dv)
        One float dtype; H % H_kv == 0 and query head h reads key/value head h // (H // H_kv).
    causal : False, True (bottom-right aligned: query i sees key j iff j <= i + Sk - Sq) or
        "top_left" (j <= i, torch SDPA). With lengths, the diagonal follows the valid
        lengths: offset kv_lengths[b] - q_lengths[b].
    window : (left, right), None unbounded: query i sees keys from left before to right
        after its diagonal (the causal diagonal, bottom-right unless causal="top_left").
    mask : bool, broadcastable to (B, H, Sq, Sk); True = may attend.
    bias : float, broadcastable to (B, H, Sq, Sk); added to the scores after the softcap.
    kv_lengths, q_lengths : (B,) ints; keys j >= kv_lengths[b] are masked, queries
        i >= q_lengths[b] are padding (output 0, lse -inf).
    softcap : c > 0: scores scale * q . k become c * tanh(scale * q . k / c).
    scale : the factor on q . k; default 1 / sqrt(D).
    alibi_slopes : (H,) or (B, H) reals (flash-attention's): pair (i, j) of head h gets
        ``-slope * |j - i - diag|``, diag the mask's diagonal (Sk - Sq, or kv_len - q_len,
        bottom-right; 0 for causal="top_left"), added with the bias after the softcap.
    sinks : (H,) attention-sink logits (gpt-oss): each row's softmax denominator gains
        ``exp(sinks[h])``, a key with no value. lse includes it, so a row with nothing else
        to attend to gives out 0 and lse = sinks[h]; -inf means no sink.
    score_mod : ``score_mod(score, b, h, q_idx, kv_idx) -> score`` (FlexAttention's), applied
        after the softcap, bias and ALiBi, before the masks; called once per (b, h) with
        q_idx (Sq, 1), kv_idx (1, Sk) int64 positions (see :mod:`flashmath.attention.mods`).
    mask_mod : ``mask_mod(b, h, q_idx, kv_idx) -> bool``, True = may attend; ANDed with
        causal, window, lengths and mask. Called once per (b, h) like score_mod.
    block_mask : a BlockMask from ``create_block_mask`` for (B|1, H|1, Sq, Sk): its mask_mod
        is applied (the same pairs; the oracle ignores the tile classification).
    upcast : True: compute and return float64 (the oracle). False: round every
        operation to the input dtype (the naive same-dtype baseline).
    return_lse : also return the natural-log log-sum-exp of each row's scores, (B, H, Sq).

    Returns
    -------
    out : (B, H, Sq, Dv), float64 if upcast else the input dtype; and lse when asked
        (float64 if upcast or for float64 input, else float32).

    Examples
    --------
    >>> import numpy as np, flashmath as fm
    >>> q = k = v = np.eye(2).reshape(1, 1, 2, 2)
    >>> fm.attention_reference(q, k, v, causal=True)[0, 0]
    array([[1.        , 0.        ],
           [0.33023845, 0.66976155]])
    """
    q, k, v, opts = resolve(
        q, k, v, causal=causal, window=window, mask=mask, bias=bias, kv_lengths=kv_lengths,
        q_lengths=q_lengths, softcap=softcap, scale=scale, alibi_slopes=alibi_slopes,
        sinks=sinks, score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask,
    )
    ar = _Arith(opts, upcast)
    with np.errstate(all="ignore"):  # NaN/inf give NaN rows, empty rows log(0), by contract
        fwd = _forward(ar, q, k, v, opts)
    out = ar.result(fwd.out)
    if not return_lse:
        return out
    return out, fwd.lse.astype(np.float64 if upcast else opts.lse_dtype)


def attention_reference_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: Causal = False,
    window: Window = None,
    mask: Any = None,
    bias: Any = None,
    kv_lengths: Any = None,
    q_lengths: Any = None,
    softcap: float | None = None,
    scale: float | None = None,
    alibi_slopes: Any = None,
    sinks: Any = None,
    score_mod: Any = None,
    mask_mod: Any = None,
    block_mask: Any = None,
    dlse: Any = None,
    upcast: bool = True,
) -> tuple[np.ndarray, ...]:
    """Gradients (dq, dk, dv) of sum(dout * attention(q, k, v)), with P materialised.

    The explicit formula: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)),
    through a score_mod dS *= d score_mod / d s (its ``dscore``, else a complex step: see
    :func:`flashmath.attention.mods.score_mod_grad`), through the softcap dS *= 1 - tanh^2,
    then dQ = scale dS K and dK = scale dS^T Q.
    dk and dv have H_kv heads: the query heads sharing a key/value head are summed.
    ``dlse`` (B, H, Sq), optional: the cotangent of the returned lse, so that the gradients
    are those of sum(dout * out) + sum(dlse * lse) (d lse / d s = P: dS gains P * dlse).
    The bias and ALiBi are constants (no gradient). With ``sinks``, a fourth result is the
    sinks' gradient dsinks (H,) = -sum over batch and rows of p_sink * rowsum(dO * O),
    with p_sink = exp(sink - lse). Options as :func:`attention_reference`; dout is
    (B, H, Sq, Dv). Returns float64 if upcast, else the input dtype with every operation
    rounded to it (the same-dtype gradient baseline; dsinks float32, float64 for float64).
    """
    q, k, v, opts = resolve(
        q, k, v, causal=causal, window=window, mask=mask, bias=bias, kv_lengths=kv_lengths,
        q_lengths=q_lengths, softcap=softcap, scale=scale, alibi_slopes=alibi_slopes,
        sinks=sinks, score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask,
    )
    if dlse is None:
        (dout,) = check_backward_inputs(opts, dout=dout)
    else:
        dout, dlse = check_backward_inputs(opts, dout=dout, dlse=dlse)
    ar = _Arith(opts, upcast)
    with np.errstate(all="ignore"):
        grads = _backward(ar, ar.input(dout), q, k, v, opts,
                          None if dlse is None else np.asarray(dlse, ar.compute))
    dq, dk, dv = (ar.result(g) for g in grads[:3])
    if opts.sinks is None:
        return dq, dk, dv
    return dq, dk, dv, grads[3].astype(np.float64 if upcast else opts.lse_dtype)


def _backward(ar: _Arith, do: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
              opts: AttentionOptions, dlse: np.ndarray | None) -> tuple[np.ndarray, ...]:
    fwd = _forward(ar, q, k, v, opts, grad=True)
    r, mm = ar.round, ar.matmul
    p = fwd.p  # (B, H, Sq, Sk)
    dv = _group_sum(mm(p.swapaxes(-1, -2), do), opts)  # (B, H_kv, Sk, Dv)
    dp = mm(do, fwd.v.swapaxes(-1, -2))  # (B, H, Sq, Sk)
    delta = r(np.sum(r(do * fwd.out), axis=-1, keepdims=True))  # (B, H, Sq, 1)
    if dlse is not None:  # d lse / d s_ij = p_ij: the lse cotangent joins dP - delta
        delta = np.where(np.isfinite(fwd.lse[..., None]), r(delta - dlse[..., None]), 0)
    ds = r(p * r(dp - delta))
    if fwd.dmod is not None:  # chain through the score_mod (0 where p = 0, even if dmod is not)
        ds = np.where(p == 0, 0, r(ds * fwd.dmod))
    if fwd.tanh is not None:
        ds = r(ds * r(1 - r(fwd.tanh * fwd.tanh)))
    dq = r(mm(ds, fwd.k) * opts.scale)  # (B, H, Sq, D)
    dk = r(_group_sum(mm(ds.swapaxes(-1, -2), fwd.q), opts) * opts.scale)
    if opts.sinks is None:
        return dq, dk, r(dv)
    p_sink = np.exp(opts.sinks[:, None] - fwd.lse)  # (B, H, Sq); 0 for padding rows
    p_sink = np.where(np.isfinite(fwd.lse), p_sink, 0)
    dsinks = -np.sum(p_sink * delta[..., 0], axis=(0, 2))  # delta already holds -dlse
    return dq, dk, r(dv), dsinks


class _Arith:
    """The arithmetic of one reference call: the compute dtype, rounding and matmul.

    Arrays live in ``compute`` (float64 when upcasting or for float64 input, else float32);
    ``round`` rounds an operation's result to the input dtype (identity when upcasting or
    when the input dtype is the compute dtype).
    """

    def __init__(self, opts: AttentionOptions, upcast: bool) -> None:
        self.upcast = upcast
        self.dtype = opts.dtype
        self.compute = np.dtype(np.float64) if upcast else accumulate_dtype(opts.dtype)
        narrow = not upcast and self.dtype != self.compute
        # (rounding.cast: NumPy's bits, without its slow path for float16 subnormals,
        # which small probabilities and their products are)
        self.round: Callable[[np.ndarray], np.ndarray] = (
            (lambda x: cast(cast(np.asarray(x), self.dtype), self.compute))
            if narrow else (lambda x: x)
        )

    def input(self, x: np.ndarray) -> np.ndarray:
        return self.round(np.asarray(x, self.compute))

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.round(np.matmul(a, b))

    def result(self, x: np.ndarray) -> np.ndarray:
        return x if self.upcast else cast(x, self.dtype)


class _Forward:
    """What the forward leaves for the backward (all (B, H, ...), compute dtype)."""

    def __init__(self, **arrays: Any) -> None:
        self.q: np.ndarray = arrays["q"]
        self.k: np.ndarray = arrays["k"]  # repeated to H heads
        self.v: np.ndarray = arrays["v"]  # repeated to H heads
        self.tanh: np.ndarray | None = arrays["tanh"]  # tanh(scale q.k / c) under softcap
        self.dmod: np.ndarray | None = arrays["dmod"]  # d score_mod / d s, or None
        self.p: np.ndarray = arrays["p"]  # (B, H, Sq, Sk) probabilities, 0 where masked
        self.out: np.ndarray = arrays["out"]
        self.lse: np.ndarray = arrays["lse"]


def _forward(ar: _Arith, q: np.ndarray, k: np.ndarray, v: np.ndarray,
             opts: AttentionOptions, grad: bool = False) -> _Forward:
    r, mm = ar.round, ar.matmul
    q, k, v = ar.input(q), ar.input(k), ar.input(v)
    k, v = np.repeat(k, opts.group, axis=1), np.repeat(v, opts.group, axis=1)  # GQA -> H heads
    # Padding (keys beyond kv_lengths, queries beyond q_lengths) is never read, as in the
    # tiled kernels: a cache left uninitialised (NaN) there must not make 0 * NaN rows.
    (q,) = _zero_padding(q, valid=opts.spec.q_valid)
    k, v = _zero_padding(k, v, valid=opts.spec.k_valid)
    s = r(mm(q, k.swapaxes(-1, -2)) * opts.scale)  # (B, H, Sq, Sk)
    tanh = None
    if opts.softcap is not None:
        tanh = r(np.tanh(r(s / opts.softcap)))
        s = r(opts.softcap * tanh)
    if opts.has_bias:
        s = r(s + ar.input(opts.dense_bias()))
    s, dmod = _score_mod(ar, s, opts, grad)
    ok = opts.spec.dense()  # (B, H|1, Sq, Sk)
    if opts.mods is not None and opts.mods.mask_mod is not None:
        ok = ok & opts.mods.dense_mask(opts.batch, opts.heads, opts.sq, opts.sk)
    s = np.where(ok, s, -np.inf)  # masked pairs: probability exactly 0
    m = np.max(s, axis=-1, initial=-np.inf)  # (B, H, Sq)
    sink = None
    if opts.sinks is not None:  # a key with logit sinks[h] and no value, valid rows only
        sink = np.where(np.arange(opts.sq) < opts.spec.q_valid[:, None, None],
                        ar.input(opts.sinks)[:, None], -np.inf)  # (B, H, Sq)
        m = np.maximum(m, sink)
    e = np.where(ok, r(np.exp(r(s - row_shift(m)[..., None]))), 0)
    l = r(np.sum(e, axis=-1))
    if sink is not None:
        l = r(l + r(np.exp(r(sink - row_shift(m)))))
    p = r(e / np.where(l == 0, 1, l)[..., None])
    out = mm(p, v)  # (B, H, Sq, Dv)
    lse = m + np.log(l)  # l == 0 (nothing to attend to) only when m = -inf: lse = -inf
    return _Forward(q=q, k=k, v=v, tanh=tanh, dmod=dmod, p=p, out=out, lse=lse)


def _score_mod(ar: _Arith, s: np.ndarray, opts: AttentionOptions,
               grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The score_mod applied per (b, h) to the (B, H, Sq, Sk) scores, and (if ``grad``) its
    derivative at the pre-mod scores (else None). Computed in the compute dtype and
    rounded to the input dtype once, as one operation."""
    mod = None if opts.mods is None else opts.mods.score_mod
    if mod is None:
        return s, None
    s = np.array(np.broadcast_to(s, (opts.batch, opts.heads, opts.sq, opts.sk)))
    dmod = np.empty_like(s) if grad else None
    for b in range(opts.batch):
        for h in range(opts.heads):
            if dmod is not None:
                dmod[b, h] = score_mod_grad(mod, s[b, h], b, h, 0, 0)
            apply_score_mod(mod, s[b, h], b, h, 0, 0)
    return ar.round(s), None if dmod is None else ar.round(dmod)


def _zero_padding(*xs: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, ...]:
    """xs (B, H, S, .) with rows s >= valid[b] set to 0 (the arrays themselves if none is)."""
    padded = np.arange(xs[0].shape[2]) >= valid[:, None]  # (B, S)
    if not padded.any():
        return xs
    return tuple(np.where(padded[:, None, :, None], np.zeros((), x.dtype), x) for x in xs)


def _group_sum(x: np.ndarray, opts: AttentionOptions) -> np.ndarray:
    """(B, H, ...) -> (B, H_kv, ...): sum the query heads that share a key/value head."""
    return x.reshape(opts.batch, opts.kv_heads, opts.group, *x.shape[2:]).sum(axis=2)
