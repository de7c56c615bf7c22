"""FP8 attention, simulated on the CPU: scaled quantization, the random Hadamard transform,
and a tiled forward that casts Q, K, V and P the way FlashAttention-3 does.

Three pieces, each usable alone:

- :func:`quantize` / :func:`dequantize`: scale an array into a narrow dtype's range and round
  it there, with one scale for the whole array (``block=None``, "per-tensor") or one per
  ``block`` consecutive rows of the sequence axis (``block=N``, "per-block", FlashAttention-3's
  tiles). Scales are returned per row, so ``codes * scales`` is the dequantized array.
- :func:`hadamard_matrix`, :func:`fwht`, :func:`random_signs`, :func:`random_hadamard`: the
  orthonormal Walsh-Hadamard transform along the last axis (O(n log n)), and its randomized
  form ``x -> H (s * x) / sqrt(n)`` with random signs ``s``. Applied with the same signs to
  Q and K it leaves Q K^T unchanged (up to rounding): it is orthogonal. It spreads one large
  feature over every feature ("incoherent processing"), so that a scale set by an outlier
  wastes less of the dtype's range.
- :func:`fp8_attention`: softmax(Q K^T * scale + bias) V with Q, K, V quantized, the score
  and output products accumulated in float32, the online softmax state in float32, and each
  tile of probabilities P multiplied by ``p_scale`` and cast to the narrow dtype before P V,
  keys visited in ``"forward"`` or ``"reverse"`` tile order.

Layout (..., S, D) (e.g. (B, H, S, D)); all leading dimensions are batch dimensions. Nothing
here runs on an accelerator: it reproduces the rounding of an FP8 kernel, not its speed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flashmath import dtypes

__all__ = [
    "KEY_ORDERS",
    "SCALINGS",
    "dequantize",
    "fp8_attention",
    "fwht",
    "hadamard_matrix",
    "quantize",
    "random_hadamard",
    "random_signs",
    "tile_starts",
]

#: Scale granularities of :func:`fp8_attention`: one scale per array, one per tile, none.
SCALINGS = ("tensor", "block", "none")
#: Orders in which :func:`fp8_attention` visits the key tiles.
KEY_ORDERS = ("forward", "reverse")


def _power_of_two(n: int, name: str) -> None:
    if n < 1 or n & (n - 1):
        raise ValueError(f"{name} must be a power of two >= 1, got {n}")


def hadamard_matrix(n: int) -> np.ndarray:
    """The n x n Sylvester Hadamard matrix (entries +1/-1, float64, ``H @ H.T == n * I``).

    ``n`` must be a power of two >= 1 (ValueError otherwise). Built explicitly, O(n^2): the
    independent check of :func:`fwht`, which never forms it.
    """
    _power_of_two(int(n), "n")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def fwht(x: Any, *, normalize: bool = True) -> np.ndarray:
    """The Walsh-Hadamard transform of ``x`` along its last axis: ``x @ H`` (``H`` of
    :func:`hadamard_matrix`), divided by sqrt(n) when ``normalize`` (then it is orthonormal
    and its own inverse).

    x: array of shape (..., n), n a power of two (ValueError otherwise); integer input is
    computed in float64, floating input in its own dtype (float32 stays float32). O(n log n)
    butterflies; the input is not modified.
    """
    a = np.asarray(x)
    if a.ndim == 0:
        raise ValueError("x must have at least one axis (the one transformed), got a scalar")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    n = a.shape[-1]
    _power_of_two(n, "x.shape[-1]")
    out = np.array(a, copy=True)
    h = 1
    while h < n:
        pairs = out.reshape(*out.shape[:-1], n // (2 * h), 2, h)
        top, bottom = pairs[..., 0, :].copy(), pairs[..., 1, :]
        pairs[..., 0, :] += bottom
        pairs[..., 1, :] = top - bottom
        h *= 2
    if normalize:
        out *= out.dtype.type(1.0 / math.sqrt(n))
    return out


def random_signs(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` independent random signs (+1.0 or -1.0, float64) drawn from ``rng``."""
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return rng.choice(np.array([-1.0, 1.0]), size=int(n))


def random_hadamard(x: Any, signs: Any) -> np.ndarray:
    """The randomized orthonormal Hadamard transform ``fwht(x * signs)`` along the last axis.

    signs: shape (n,), entries +1/-1, the same for every array whose products must be kept
    (transform Q and K with the same signs: ``random_hadamard(q, s) @ random_hadamard(k, s).T``
    equals ``q @ k.T`` up to rounding). Returns x's dtype for floating x, else float64.
    """
    a = np.asarray(x)
    s = np.asarray(signs)
    if s.ndim != 1 or a.ndim == 0 or s.shape[0] != a.shape[-1]:
        raise ValueError(f"signs must have shape ({a.shape[-1] if a.ndim else 'n'},) to match "
                         f"x's last axis, got {s.shape}")
    if not np.all(np.abs(s) == 1):
        raise ValueError("signs must hold only +1 and -1")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    return fwht(a * s.astype(a.dtype))


def _dtype_max(dt: np.dtype[Any]) -> float:
    return float(dtypes.finfo(dt).max)


def quantize(x: Any, dtype: Any = "float8_e4m3fn", *, block: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Scale ``x`` into ``dtype``'s range and round it there: ``(codes, scales)``.

    x: (..., S, D) floating array (a 1-D x is one row). block: None for one scale per
    array (per-tensor); N for one scale per N consecutive rows (axis -2), per batch entry
    (per-block, FlashAttention-3's tiles; the last block may be shorter). Each scale is
    ``amax / dtype_max`` over its block, so the largest |entry| lands on the dtype's largest
    value (1.0 for an all-zero block; NaN/inf in x are a ValueError: no scale fits them).

    Returns codes of shape x.shape in ``dtype`` and scales, float32, of shape (..., S, 1):
    row i's scale, repeated over its block, so ``codes.astype(float32) * scales`` is the
    dequantized array (:func:`dequantize`). ``dtype="float16"`` etc. work too.
    """
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating) and a.dtype not in dtypes.NARROW_DTYPES:
        raise TypeError(f"x must be a floating array, got dtype {a.dtype}")
    a = a.astype(np.float64)
    two_d = a.ndim >= 2
    rows = a if two_d else a[None, :]
    if not np.all(np.isfinite(rows)):
        raise ValueError("x holds NaN or inf: no scale maps it into a finite dtype")
    dt = dtypes.DTYPES[dtype] if isinstance(dtype, str) else np.dtype(dtype)
    top = _dtype_max(dt)
    s = rows.shape[-2]
    if block is None:
        amax = np.full((*rows.shape[:-1], 1), np.max(np.abs(rows), initial=0.0))
    else:
        if int(block) < 1:
            raise ValueError(f"block must be None or an int >= 1, got {block}")
        starts = np.arange(0, s, int(block))
        per_block = np.maximum.reduceat(np.max(np.abs(rows), axis=-1, initial=0.0), starts,
                                        axis=-1) if s else np.zeros((*rows.shape[:-2], 0))
        amax = np.repeat(per_block, np.diff(np.append(starts, s)), axis=-1)[..., None]
    scales = np.where(amax > 0, amax / top, 1.0).astype(np.float32)
    codes = np.clip(rows / scales.astype(np.float64), -top, top).astype(dt)
    if not two_d:
        return codes[0], scales[0]
    return codes, scales


def dequantize(codes: Any, scales: Any) -> np.ndarray:
    """``codes * scales`` in float32: the values :func:`quantize` rounded ``x`` to."""
    return np.asarray(codes).astype(np.float32) * np.asarray(scales, dtype=np.float32)


def tile_starts(n: int, block: int, order: str) -> list[int]:
    """The first key of each ``block``-key tile of ``n`` keys, in the order ``order`` (one
    of KEY_ORDERS) in which :func:`fp8_attention` visits them."""
    starts = list(range(0, n, block))
    return starts[::-1] if order == "reverse" else starts


def fp8_attention(q: Any, k: Any, v: Any, *, dtype: Any = "float8_e4m3fn",
                  scaling: str = "block", block_q: int = 128, block_k: int = 128,
                  hadamard_signs: Any = None, p_scale: float = 1.0,
                  key_order: str = "forward", bias: Any = None, quantize_qkv: bool = True,
                  scale: float | None = None) -> np.ndarray:
    """Attention softmax(q k^T * scale + bias) v computed as an FP8 kernel rounds it.

    q: (..., Sq, D); k: (..., Sk, D); v: (..., Sk, Dv); any floating dtype (read as float64).
    dtype: the narrow dtype of Q, K, V and P (float8_e4m3fn, FlashAttention-3's; float16 for
    the FP16 baseline). scaling: "tensor" (one scale per array), "block" (one per ``block_q``
    rows of q and ``block_k`` rows of k and v) or "none" (cast as they are: only sensible for
    float16/bfloat16). hadamard_signs: None, or (D,) signs for :func:`random_hadamard`,
    applied to q and k before quantizing. quantize_qkv=False keeps q, k, v in float32 and casts
    only P (isolates the P cast). p_scale: P tiles are multiplied by it before the cast and the
    output divided by it after (1 or 256). key_order: "forward" or "reverse" key tiles.
    bias: None or an array broadcasting to (..., Sq, Sk), added to the float32 scores.
    scale: default 1/sqrt(D).

    Arithmetic: S = (Qc @ Kc^T) * sq * sk in float32 (codes multiplied exactly, one rounding
    per product sum); the online softmax state (m, l, O) in float32; l sums the float32 P
    before it is cast. A row whose scores are all -inf (bias) gives zeros. Returns float32 of
    shape (..., Sq, Dv).
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    if key_order not in KEY_ORDERS:
        raise ValueError(f"key_order must be one of {KEY_ORDERS}, got {key_order!r}")
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if int(value) < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value}")
    if not (p_scale > 0 and math.isfinite(p_scale)):
        raise ValueError(f"p_scale must be a finite number > 0, got {p_scale}")
    qa, ka, va = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    if qa.ndim < 2 or ka.ndim != qa.ndim or va.ndim != qa.ndim:
        raise ValueError(f"q, k, v must be (..., S, D) arrays of one rank, got shapes "
                         f"{qa.shape}, {ka.shape}, {va.shape}")
    if qa.shape[-1] != ka.shape[-1] or ka.shape[-2] != va.shape[-2]:
        raise ValueError(f"q and k must share D and k and v share Sk, got shapes "
                         f"{qa.shape}, {ka.shape}, {va.shape}")
    dt = dtypes.DTYPES[dtype] if isinstance(dtype, str) else np.dtype(dtype)
    d = qa.shape[-1]
    sm_scale = np.float32(1.0 / math.sqrt(d) if scale is None else scale)
    if hadamard_signs is not None:
        qa, ka = random_hadamard(qa, hadamard_signs), random_hadamard(ka, hadamard_signs)

    def cast(t: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
        if not quantize_qkv:
            return t.astype(np.float32), np.ones((*t.shape[:-1], 1), np.float32)
        if scaling == "none":
            return t.astype(dt).astype(np.float32), np.ones((*t.shape[:-1], 1), np.float32)
        codes, scales = quantize(t, dt, block=block if scaling == "block" else None)
        return codes.astype(np.float32), scales

    qc, sq = cast(qa, int(block_q))
    kc, sk = cast(ka, int(block_k))
    vc, sv = cast(va, int(block_k))
    sk_t = np.swapaxes(sk, -1, -2)  # (..., 1, Sk)
    b = None if bias is None else np.asarray(bias, dtype=np.float32)
    sq_len, sk_len = qa.shape[-2], ka.shape[-2]
    batch = np.broadcast_shapes(qa.shape[:-2], ka.shape[:-2])
    m = np.full((*batch, sq_len, 1), -np.inf, np.float32)
    l = np.zeros((*batch, sq_len, 1), np.float32)
    o = np.zeros((*batch, sq_len, va.shape[-1]), np.float32)
    ps = np.float32(p_scale)
    for start in tile_starts(sk_len, int(block_k), key_order):
        cols = slice(start, start + int(block_k))
        s = (qc @ np.swapaxes(kc[..., cols, :], -1, -2)) * (sq * sk_t[..., cols]) * sm_scale
        if b is not None:
            s = s + np.broadcast_to(b, (*s.shape[:-1], sk_len))[..., cols]
        m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
        safe = np.where(np.isneginf(m_new), np.float32(0), m_new)
        with np.errstate(invalid="ignore"):
            alpha = np.where(np.isneginf(m), np.float32(0), np.exp(m - safe))
        p = np.exp(s - safe)  # float32, entries in [0, 1]
        l = alpha * l + p.sum(axis=-1, keepdims=True)
        p_cast = (p * ps).astype(dt).astype(np.float32)
        o = alpha * o + (p_cast @ (vc[..., cols, :] * sv[..., cols, :]))
        m = m_new
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(l > 0, o / (l * ps), np.float32(0))
    return out.astype(np.float32)
