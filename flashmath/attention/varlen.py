"""Packed variable-length attention: flash-attention's ``flash_attn_varlen_func`` layout.

A batch of sequences of different lengths is packed along one token axis with no padding:

    q: (total_q, H, D)     k: (total_k, H_kv, D)     v: (total_k, H_kv, Dv)
    cu_seqlens_q: (B + 1,) int32, 0 = cu[0] <= cu[1] <= ... <= cu[B] = total_q
    sequence b holds q rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] (likewise keys)

Note the axis order: tokens first, then heads (flash-attention's), where the padded API
(:func:`flashmath.flash_attention`) takes (B, H, S, D). Each sequence attends only to its
own keys; ``causal=True`` is bottom-right aligned per sequence (query i of a sequence with
Lq queries and Lk keys sees key j iff j <= i + Lk - Lq), as flash-attention >= 2.1 does.
lse comes back as (H, total_q), flash-attention's ``softmax_lse`` layout for varlen.

Each sequence runs the tiled kernel on views of the packed arrays (no padded copy is ever
made), so results equal the padded API with ``q_lengths``/``kv_lengths`` on the same data
(bit for bit where the tiles coincide). A sequence with no keys gives zeros and lse -inf.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flashmath.attention.tiled import tiled_backward, tiled_forward
from flashmath.dtypes import as_float_array

__all__ = ["check_cu_seqlens", "flash_attention_varlen", "flash_attention_varlen_backward"]


def check_cu_seqlens(cu: Any, name: str, total: int, max_seqlen: Any = None) -> np.ndarray:
    """Validate cumulative sequence lengths: a 1-D integer array starting at 0, never
    decreasing, ending at ``total`` (the packed length); ``max_seqlen``, if given, at least
    the longest sequence. Returns int64 offsets. Errors name ``name``."""
    arr = np.asarray(cu)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integers (int32 prefix sums), got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.size < 1:
        raise ValueError(f"{name}: expected a 1-D array of B + 1 offsets, got shape {arr.shape}")
    arr = arr.astype(np.int64)
    if arr[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {arr[0]}")
    if np.any(np.diff(arr) < 0):
        raise ValueError(f"{name}: must not decrease, got {arr.tolist()}")
    if arr[-1] != total:
        raise ValueError(f"{name}: ends at {arr[-1]} but the packed tensor has {total} tokens")
    if max_seqlen is not None:
        longest = int(np.diff(arr).max(initial=0))
        if isinstance(max_seqlen, (bool, np.bool_)) or not isinstance(max_seqlen, int | np.integer):
            raise TypeError(f"max_seqlen for {name}: expected an int, got {max_seqlen!r}")
        if max_seqlen < longest:
            raise ValueError(f"max_seqlen for {name} is {max_seqlen}, but a sequence has "
                             f"{longest} tokens")
    return arr


def _packed(x: Any, name: str, legend: str) -> np.ndarray:
    arr = as_float_array(x, name=name)
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected a 3-D packed array {legend}, got shape {arr.shape}")
    return arr


def _sequences(q: np.ndarray, k: np.ndarray, cu_q: Any, cu_k: Any, max_q: Any, max_k: Any
               ) -> list[tuple[int, int, int, int]]:
    cq = check_cu_seqlens(cu_q, "cu_seqlens_q", q.shape[0], max_q)
    ck = check_cu_seqlens(cu_k, "cu_seqlens_k", k.shape[0], max_k)
    if cq.size != ck.size:
        raise ValueError(f"cu_seqlens_q has {cq.size - 1} sequences, cu_seqlens_k "
                         f"{ck.size - 1}: they must describe the same batch")
    return [(int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b + 1]))
            for b in range(cq.size - 1)]


def _heads_first(x: np.ndarray) -> np.ndarray:
    """(L, H, D) packed rows of one sequence as a (1, H, L, D) view."""
    return x.transpose(1, 0, 2)[None]


def flash_attention_varlen(
    q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, *,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
    causal: Any = False, window: Any = None, softcap: float | None = None,
    scale: float | None = None, block_q: int | None = None, block_k: int | None = None,
    accum_dtype: Any = None, return_lse: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Exact tiled attention over packed sequences of different lengths.

    Parameters
    ----------
    q : (total_q, H, D); k : (total_k, H_kv, D); v : (total_k, H_kv, Dv)
        One float dtype; H % H_kv == 0 (GQA/MQA).
    cu_seqlens_q, cu_seqlens_k : (B + 1,) integer prefix sums of the sequence lengths.
    max_seqlen_q, max_seqlen_k : optional; checked to be at least the longest sequence.
    causal, window, softcap, scale, block_q, block_k, accum_dtype
        As :func:`flashmath.flash_attention`, applied to each sequence on its own
        (causal bottom-right per sequence). Boolean masks and biases are not taken here:
        use the padded API for them.
    return_lse : also return lse (H, total_q), float32 (float64 for float64 input).

    Returns
    -------
    out : (total_q, H, Dv) in the input dtype (rows with nothing to attend to are 0), and
    with return_lse the lse (-inf for those rows).

    Raises
    ------
    ValueError, TypeError : naming the argument (shapes, cu_seqlens that do not start at
    0, decrease or miss the packed length, a max_seqlen below the longest sequence).

    Examples
    --------
    >>> import numpy as np, flashmath as fm
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((7, 2, 8)) for _ in range(3))
    >>> cu = np.array([0, 3, 7], np.int32)                       # lengths 3 and 4
    >>> out = fm.flash_attention_varlen(q, k, v, cu, cu, causal=True)
    >>> ref = fm.attention_reference(q[None, 3:].transpose(0, 2, 1, 3),
    ...                              k[None, 3:].transpose(0, 2, 1, 3),
    ...                              v[None, 3:].transpose(0, 2, 1, 3), causal=True)
    >>> bool(np.allclose(out[3:], ref[0].transpose(1, 0, 2)))
    True
    """
    q = _packed(q, "q", "(total_q, H, D)")
    k = _packed(k, "k", "(total_k, H_kv, D)")
    v = _packed(v, "v", "(total_k, H_kv, Dv)")
    seqs = _sequences(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    opts = dict(causal=causal, window=window, softcap=softcap, scale=scale,
                block_q=block_q, block_k=block_k, accum_dtype=accum_dtype)
    out: np.ndarray | None = None
    lse: np.ndarray | None = None
    for q0, q1, k0, k1 in seqs:
        o, l = tiled_forward(_heads_first(q[q0:q1]), _heads_first(k[k0:k1]),
                             _heads_first(v[k0:k1]), **opts)
        if out is None or lse is None:
            out = np.zeros((q.shape[0], q.shape[1], v.shape[2]), o.dtype)
            lse = np.full((q.shape[1], q.shape[0]), -np.inf, l.dtype)
        out[q0:q1] = o[0].transpose(1, 0, 2)
        lse[:, q0:q1] = l[0]
    if out is None or lse is None:  # B = 0: validate the shapes through an empty call
        o, l = tiled_forward(_heads_first(q), _heads_first(k), _heads_first(v), **opts)
        out, lse = o[0].transpose(1, 0, 2), l[0]
    return (out, lse) if return_lse else out


def flash_attention_varlen_backward(
    dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, cu_seqlens_q: Any,
    cu_seqlens_k: Any, *, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
    causal: Any = False, window: Any = None, softcap: float | None = None,
    scale: float | None = None, block_q: int | None = None, block_k: int | None = None,
    accum_dtype: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients (dq, dk, dv) of sum(dout * out) for :func:`flash_attention_varlen`.

    dout, out: (total_q, H, Dv); lse: (H, total_q), the forward's (``return_lse=True``);
    options must be the forward's. Returns dq (total_q, H, D), dk (total_k, H_kv, D),
    dv (total_k, H_kv, Dv) in the input dtype; keys no query sees get exactly 0.
    """
    q = _packed(q, "q", "(total_q, H, D)")
    k = _packed(k, "k", "(total_k, H_kv, D)")
    v = _packed(v, "v", "(total_k, H_kv, Dv)")
    dout = _packed(dout, "dout", "(total_q, H, Dv)")
    out = _packed(out, "out", "(total_q, H, Dv)")
    lse = as_float_array(lse, name="lse")
    if lse.shape != (q.shape[1], q.shape[0]):
        raise ValueError(f"lse: expected shape (H, total_q) = {(q.shape[1], q.shape[0])}, "
                         f"got {lse.shape}")
    seqs = _sequences(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    opts = dict(causal=causal, window=window, softcap=softcap, scale=scale,
                block_q=block_q, block_k=block_k, accum_dtype=accum_dtype)
    dq = np.zeros(q.shape, q.dtype)
    dk = np.zeros(k.shape, k.dtype)
    dv = np.zeros(v.shape, v.dtype)
    for q0, q1, k0, k1 in seqs:
        g = tiled_backward(_heads_first(dout[q0:q1]), _heads_first(q[q0:q1]),
                           _heads_first(k[k0:k1]), _heads_first(v[k0:k1]),
                           _heads_first(out[q0:q1]), lse[None, :, q0:q1], **opts)
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = (x[0].transpose(1, 0, 2) for x in g)
    return dq, dk, dv
