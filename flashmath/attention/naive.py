"""The textbook attention, computed in the input dtype: kept only to be compared against.

    attention(q, k, v) = softmax(q k^T * scale) v,   softmax(s) = exp(s) / sum exp(s)

No shift, no upcast (the softmax twins are in :mod:`flashmath.softmax.naive`); the
accuracy rule's "naive formula" and the conformance checker's ``naive`` target.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from flashmath.attention.options import resolve

__all__ = ["attention"]


def attention(q: npt.ArrayLike, k: npt.ArrayLike, v: npt.ArrayLike, **options: Any) -> Any:
    """``softmax(s) v`` with ``softmax = exp(s) / sum exp(s)``: the textbook attention.

    ``options`` are :func:`flashmath.attention_reference`'s (causal, window, mask, bias,
    kv_lengths, q_lengths, softcap, scale, alibi_slopes, sinks), resolved by
    :func:`flashmath.attention.options.resolve`; masked pairs come from its one mask
    builder (``spec.dense()``) and contribute exp = 0. Every step runs in the input dtype
    with no max shift: what the accuracy rule's naive formula looks like before anyone
    makes it stable. exp overflows to inf (inf / inf = NaN) once a score passes the dtype's
    overflow threshold, and 0 / 0 = NaN when every score underflows or a row is fully
    masked. The conformance checker's ``naive`` attention target. Returns (B, H, Sq, Dv)
    in the input dtype.
    """
    q, k, v, opts = resolve(q, k, v, **options)
    dt = q.dtype
    k, v = np.repeat(k, opts.group, axis=1), np.repeat(v, opts.group, axis=1)
    with np.errstate(all="ignore"):
        s = (q @ k.swapaxes(-1, -2)) * dt.type(opts.scale)
        if opts.softcap is not None:
            c = dt.type(opts.softcap)
            s = c * np.tanh(s / c)
        if opts.has_bias:
            s = s + np.asarray(opts.dense_bias()).astype(dt)
        e = np.where(opts.spec.dense(), np.exp(s), dt.type(0))
        total = e.sum(axis=-1, keepdims=True)
        if opts.sinks is not None:  # the sink's exp joins the denominator, with no value
            total = total + np.exp(opts.sinks.astype(dt))[:, None, None]
        return ((e / total) @ v).astype(dt)
