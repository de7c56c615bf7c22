"""Small example kernels for the conformance tests: correct ones and deliberately broken ones.

Each is what a kernel author might hand to ``flashmath check`` (importable as
``_kernels:NAME`` from the tests folder). NumPy kernels compute in float32 accumulators
(float64 for float64 input) and return the input dtype, like flashmath's own.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flashmath.attention.reference import attention_reference_backward
from flashmath.testing import declare


def _acc(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64 if x.dtype == np.float64 else np.float32)


def _scores(q: np.ndarray, k: np.ndarray, scale: float | None, causal: bool) -> np.ndarray:
    """scale * q k^T in the accumulate dtype, -inf above the bottom-right causal diagonal."""
    sq, sk = q.shape[-2], k.shape[-2]
    s = (_acc(q) @ _acc(k).swapaxes(-1, -2)) * (1 / math.sqrt(q.shape[-1]) if scale is None
                                                else scale)
    if causal:
        visible = np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq)
        s = np.where(visible, s, -np.inf)
    return s


def _stable_softmax(s: np.ndarray) -> np.ndarray:
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isneginf(m), 0, m))
    l = e.sum(axis=-1, keepdims=True)
    return e / np.where(l == 0, 1, l)


# --------------------------------------------------------------------------- attention


def good_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = False,
                   scale: float | None = None) -> np.ndarray:
    """Correct: stable softmax in float32 accumulators, bottom-right causal, zeros for rows
    with nothing to attend to."""
    p = _stable_softmax(_scores(q, k, scale, causal))
    return (p @ _acc(v)).astype(q.dtype)


def _good_backward(dout: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                   **options: Any) -> tuple[np.ndarray, ...]:
    """Gradients from the float64 formula, rounded to the input dtype: correct."""
    grads = attention_reference_backward(dout, q, k, v, upcast=True, **options)
    return tuple(g.astype(q.dtype) for g in grads)


good_attention.backward = _good_backward  # type: ignore[attr-defined]


def no_scale_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Broken: forgets the 1/sqrt(D) scale."""
    return good_attention(q, k, v, scale=1.0)


def no_causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *,
                        causal: bool = False) -> np.ndarray:
    """Broken: takes causal= and ignores it."""
    return good_attention(q, k, v)


def fp16_accumulation_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Broken for long rows in float16: exact scores, but the row sum and P @ V are
    accumulated key by key in the input dtype (np.cumsum rounds after every addition)."""
    s = _scores(q, k, None, False)
    e = np.exp(s - s.max(axis=-1, keepdims=True)).astype(q.dtype)  # (B, H, Sq, Sk)
    l = np.cumsum(e, axis=-1)[..., -1:]  # sequential sum in the input dtype
    pv = np.cumsum(e[..., :, :, None] * v[:, :, None, :, :], axis=-2)[..., -1, :]
    return (pv / l).astype(q.dtype)


def bad_dk_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A correct forward whose backward (below) forgets the scale in dk."""
    return good_attention(q, k, v)


def _bad_dk_backward(dout: np.ndarray, q: np.ndarray, k: np.ndarray,
                     v: np.ndarray) -> tuple[np.ndarray, ...]:
    dq, dk, dv = _good_backward(dout, q, k, v)
    return dq, (dk.astype(np.float64) * math.sqrt(q.shape[-1])).astype(q.dtype), dv


bad_dk_attention.backward = _bad_dk_backward  # type: ignore[attr-defined]


def torch_attention(q: Any, k: Any, v: Any, *, causal: bool = False) -> Any:
    """Correct, in torch (autograd gives the gradients): float32 math for narrow inputs."""
    import torch

    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    sq, sk = q.shape[-2], k.shape[-2]
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        visible = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
        s = s.masked_fill(~visible, float("-inf"))
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)  # nothing to attend to: zeros
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return (p @ v.to(acc)).to(q.dtype)


torch_attention.backend = "torch"  # type: ignore[attr-defined]


def one_arg(x: np.ndarray) -> np.ndarray:
    """Not an attention kernel: takes one argument."""
    return x


# --------------------------------------------------------------------------- softmax


def good_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Correct: the max shift, float32 accumulators, zeros for all -inf rows."""
    a = np.moveaxis(_acc(np.asarray(x)), axis, -1)
    return np.moveaxis(_stable_softmax(a), -1, axis).astype(x.dtype)


def uniform_empty_softmax(x: np.ndarray) -> np.ndarray:
    """Breaks the NaN policy only: a row of -inf gives the uniform distribution."""
    out = good_softmax(x)
    empty = np.all(np.isneginf(x), axis=-1, keepdims=True)
    return np.where(empty, x.dtype.type(1.0 / x.shape[-1]), out).astype(x.dtype)


def sloppy_softmax(x: np.ndarray) -> np.ndarray:
    """Off by 1% everywhere: fails even where the naive baseline overflowed."""
    return (good_softmax(x).astype(np.float64) * 1.01).astype(x.dtype)


# --------------------------------------------------------------------------- declared


bfloat16_only_attention = declare(good_attention, supports={"causal", "scale"},
                                  dtypes={"bfloat16"})
