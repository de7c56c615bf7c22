"""Exact conversions between float32 and the 16-bit floats, without NumPy's slow paths.

``x.astype(np.float16)`` is correctly rounded (to nearest, ties to even) but NumPy's
cast takes a slow path, about 25x slower, for every element whose float16 result is
subnormal or underflows to zero: it raises the underflow flag element by element. A
softmax over a 32k vocabulary is almost all such elements in float16, so the final
rounding of a float16 softmax cost 40 times the softmax itself. The same cast is also
slow (about 3 ns an element) on ordinary values, and so is float16 -> float32.

The functions here give the same bits as NumPy's casts (the same ml_dtypes ones for
bfloat16), also for -0.0, subnormals, overflow to inf and NaN payloads, in a few
vectorised passes of integer and float32 arithmetic over cache-sized blocks:

- :func:`float32_to_float16`: ``|x|`` is rounded onto the float16 grid in float32
  itself: adding ``c = max(2**(e + 13), 0.5)`` (e the exponent of ``|x|``) leaves
  exactly 10 fraction bits (the subnormal spacing 2**-24 below 2**-14), so float32's own
  round-to-nearest-even does the rounding, and ``(|x| + c) - c`` is the rounded value.
  Scaled by 2**-112, its float32 bits shifted right by 13 are the float16 bits (normal
  and subnormal alike); results >= 65520 become inf, NaN keeps the top 10 payload bits
  (never 0, so it stays NaN), the sign is copied.
- :func:`probabilities_to_float16`: the same rounding for values in [0, 1] or NaN (a
  softmax's probabilities), in place, without the sign, abs and overflow passes (9
  passes, not 14; the float16 softmax measured 0.7x the time it took with the general
  conversion).
- :func:`float16_to_float32`: the sign-extended 16 bits shifted left by 13 are a float32
  2**112 times too small (exactly, subnormals included); inf and NaN get the all-ones
  exponent.
- :func:`bfloat16_to_float32`: the 16 bits shifted left by 16 (exact, NaN payloads
  included).
- :func:`float32_to_bfloat16`: round-to-nearest-even on the integer bits
  (``(u + 0x7fff + odd) >> 16``); NaN becomes the quiet NaN 0x7fc0 with the sign, as
  ml_dtypes gives (without its RuntimeWarning).
- :func:`cast`: ``a.astype(dtype)`` through the float16 functions above where one
  applies; bfloat16 through ml_dtypes' own cast, which measured 2x faster than
  :func:`float32_to_bfloat16` and :func:`bfloat16_to_float32` (same bits, and no
  RuntimeWarning from ml_dtypes 0.5 or 0.6).

Shapes: any; the result has ``x``'s shape (C order). Dtypes: exactly the ones named;
other input raises TypeError naming the argument. May import: nothing of flashmath (a
bottom layer beside dtypes; NumPy and ml_dtypes only).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

__all__ = ["BLOCK", "bfloat16_to_float32", "cast", "float16_to_float32", "float32_to_bfloat16",
           "float32_to_float16", "probabilities_to_float16"]

#: Elements converted per pass: the few temporaries stay in the core's cache.
BLOCK = 1 << 17

_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)
_BF16 = np.dtype(ml_dtypes.bfloat16)  # (dtypes.bfloat16: bottom modules do not import each other)


def float32_to_float16(x: npt.ArrayLike, out: np.ndarray | None = None) -> np.ndarray:
    """float32 -> float16, correctly rounded: the bits of ``x.astype(np.float16)``.

    Parameters
    ----------
    x : array_like of float32, any shape
    out : float16 ndarray of ``x``'s shape, C-contiguous, optional
        Written in place and returned.

    Returns
    -------
    ndarray of float16, ``x``'s shape
        Round to nearest, ties to even; ``|x| >= 65520`` gives +-inf; results below the
        smallest subnormal 2**-24 (half of it included: ties to even) give +-0 with
        ``x``'s sign; NaN gives NaN with the top 10 bits of the payload (0x7c01 if those
        are all 0). No floating-point warnings.
    """
    a = _c_array(x, _F32, "x")
    res = _out(out, a.shape, _F16)
    src, dst = a.reshape(-1).view(np.uint32), res.reshape(-1).view(np.uint16)
    for lo in range(0, src.size, BLOCK):
        _f32_to_f16_block(src[lo : lo + BLOCK], dst[lo : lo + BLOCK])
    return res


def probabilities_to_float16(p: np.ndarray, out: np.ndarray) -> np.ndarray:
    """:func:`float32_to_float16` for values in [0, 1] or NaN (softmax probabilities), in
    9 passes instead of 14: no sign, no overflow to handle. Internal: for flashmath's own
    temporaries.

    p : C-contiguous float32, every value in [+0, 1] or NaN (anything else, -0.0
        included, gives wrong bits); it is the scratch space and is overwritten.
    out : C-contiguous float16 of p's shape: the bits of ``p.astype(np.float16)``.
    """
    res = _out(out, p.shape, _F16)
    if p.dtype != _F32 or not p.flags.c_contiguous:
        raise ValueError(f"p: expected a C-contiguous float32 array, got {p.dtype}"
                         f"{'' if p.flags.c_contiguous else ' (not contiguous)'}")
    src, dst = p.reshape(-1).view(np.uint32), res.reshape(-1).view(np.uint16)
    for lo in range(0, src.size, BLOCK):
        _unit_to_f16_block(src[lo : lo + BLOCK], dst[lo : lo + BLOCK])
    return res


def float16_to_float32(h: npt.ArrayLike, out: np.ndarray | None = None) -> np.ndarray:
    """float16 -> float32, exactly: the bits of ``h.astype(np.float32)``.

    Every float16 is a float32; subnormals become normal float32s, inf stays inf, NaN
    keeps its sign and payload (shifted left by 13). ``out``: as in
    :func:`float32_to_float16` (float32).
    """
    a = _c_array(h, _F16, "h")
    res = _out(out, a.shape, _F32)
    src, dst = a.reshape(-1).view(np.int16), res.reshape(-1)
    for lo in range(0, src.size, BLOCK):
        _f16_to_f32_block(src[lo : lo + BLOCK], dst[lo : lo + BLOCK])
    return res


def bfloat16_to_float32(h: npt.ArrayLike, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 -> float32, exactly: the bits of ``h.astype(np.float32)`` (ml_dtypes), the
    16 bits becoming the float32's top half. ``out``: as in :func:`float32_to_float16`
    (float32)."""
    a = _c_array(h, _BF16, "h")
    res = _out(out, a.shape, _F32)
    src, dst = a.reshape(-1).view(np.uint16), res.reshape(-1).view(np.uint32)
    for lo in range(0, src.size, BLOCK):
        d = dst[lo : lo + BLOCK]
        np.copyto(d, src[lo : lo + BLOCK], casting="unsafe")
        d <<= 16
    return res


def float32_to_bfloat16(x: npt.ArrayLike, out: np.ndarray | None = None) -> np.ndarray:
    """float32 -> bfloat16, correctly rounded: the bits of ``x.astype(ml_dtypes.bfloat16)``.

    Round to nearest, ties to even (bfloat16 has float32's exponent range: overflow to
    inf only above 3.39e38, subnormals as float32's); NaN gives the quiet NaN 0x7fc0 with
    ``x``'s sign. ``out``: as in :func:`float32_to_float16` (bfloat16).
    """
    a = _c_array(x, _F32, "x")
    res = _out(out, a.shape, _BF16)
    src, dst = a.reshape(-1).view(np.uint32), res.reshape(-1).view(np.uint16)
    for lo in range(0, src.size, BLOCK):
        _f32_to_bf16_block(src[lo : lo + BLOCK], dst[lo : lo + BLOCK])
    return res


def cast(a: np.ndarray, dtype: npt.DTypeLike, out: np.ndarray | None = None) -> np.ndarray:
    """``a.astype(dtype, copy=False)``, bit for bit, through the fast exact conversions for
    float32 <-> float16; NumPy's (or ml_dtypes') cast otherwise. (float32 <-> bfloat16 takes
    ml_dtypes' own cast: 0.5 and 0.09 ns an element here, against 1.0 and 0.19 for
    :func:`float32_to_bfloat16` and :func:`bfloat16_to_float32`, the same bits.)

    With ``out`` (C-contiguous, ``a``'s shape, ``dtype``) the result is written there.
    """
    dt = np.dtype(dtype)
    a = np.asarray(a)
    fast = {(_F32, _F16): float32_to_float16, (_F16, _F32): float16_to_float32,
            }.get((a.dtype, dt))
    if fast is not None:
        return fast(a, out)
    with np.errstate(invalid="ignore"):  # (ml_dtypes: NaN to bfloat16 is not an error)
        if out is None:
            return a.astype(dt, copy=False)
        np.copyto(_out(out, a.shape, dt), a, casting="unsafe")
    return out


# --- The block kernels (1-D, at most BLOCK elements) ---


def _f32_to_f16_block(u: np.ndarray, h: np.ndarray) -> None:
    """float32 bits u (uint32) -> float16 bits h (uint16), see the module docstring."""
    mag = np.bitwise_and(u, 0x7FFFFFFF)  # |x| as bits
    has_nan = np.max(mag, initial=0) > 0x7F800000
    c = np.bitwise_and(mag, 0x7F800000)  # 2**e
    c += 13 << 23  # 2**(e + 13) (can wrap for huge e: clipped next)
    np.clip(c, 0x3F000000, 0x4E000000, out=c)  # [0.5, 2**29]: 0.5 aligns the subnormals
    r = mag.view(np.float32)
    cf = c.view(np.float32)
    with np.errstate(invalid="ignore"):  # signalling NaNs; they are rebuilt below
        r += cf  # rounds |x| to the float16 grid (float32's own ties-to-even)
        r -= cf  # exact: the rounded |x|
        r *= np.float32(2.0**-112)  # float16 value v -> float32 bits (bits of v) << 13
        np.minimum(r, np.float32(2.0**-96), out=r)  # 2**-96 <-> 0x7c00: overflow and inf
    mag >>= 13  # the float16 bits of |x|
    sign = np.right_shift(u, 16)
    sign &= 0x8000
    mag |= sign
    np.copyto(h, mag, casting="unsafe")  # the low 16 bits
    if has_nan:  # NaN: keep the payload's top 10 bits, never 0 (that would be inf)
        nan = np.isnan(u.view(np.float32))
        h[nan] = _f16_nan(u[nan])


def _unit_to_f16_block(u: np.ndarray, h: np.ndarray) -> None:
    """float32 bits u (uint32, values in [0, 1] or NaN, overwritten) -> float16 bits h:
    :func:`_f32_to_f16_block`'s rounding without its abs, sign and overflow passes."""
    nan = None
    if np.max(u, initial=0) > 0x7F800000:  # NaN of either sign: keep its bits
        nan = np.isnan(u.view(np.float32))
        nan_bits = u[nan]
    c = np.bitwise_and(u, 0x7F800000)  # 2**e
    c += 13 << 23  # 2**(e + 13), at most 2**13 for values <= 1
    np.maximum(c, 0x3F000000, out=c)  # >= 0.5: aligns the subnormals
    r, cf = u.view(np.float32), c.view(np.float32)
    with np.errstate(invalid="ignore"):  # the NaN entries, rebuilt below
        r += cf  # rounds onto the float16 grid (float32's own ties-to-even)
        r -= cf
        r *= np.float32(2.0**-112)
    u >>= 13
    np.copyto(h, u, casting="unsafe")
    if nan is not None:
        h[nan] = _f16_nan(nan_bits)


def _f16_nan(u: np.ndarray) -> np.ndarray:
    """float16 bits of the float32 NaNs with bits u: the sign, the payload's top 10 bits,
    never 0 (that would be inf), as NumPy's cast gives."""
    payload = np.maximum(np.right_shift(u, 13) & 0x3FF, 1)
    return (np.right_shift(u, 16) & 0x8000 | 0x7C00 | payload).astype(np.uint16)


def _f16_to_f32_block(h: np.ndarray, f: np.ndarray) -> None:
    """float16 bits h (int16) -> float32 values f, see the module docstring."""
    s = f.view(np.int32)
    np.copyto(s, h, casting="unsafe")  # sign-extends: bits 15..31 hold the sign
    s <<= 13
    s &= -0x70000001  # 0x8fffffff: clear bits 28..30, keep the sign on bit 31
    f *= np.float32(2.0**112)
    if np.max(np.bitwise_and(h, 0x7FFF), initial=0) >= 0x7C00:  # inf or NaN
        special = np.bitwise_and(h, 0x7C00) == 0x7C00
        s[special] |= 0x7F800000  # the exponent all ones; sign and payload << 13 stay


def _f32_to_bf16_block(u: np.ndarray, b: np.ndarray) -> None:
    """float32 bits u (uint32) -> bfloat16 bits b (uint16), ties to even."""
    odd = np.right_shift(u, 16)
    odd &= 1
    odd += u
    odd += 0x7FFF  # wraps only for NaN bits, fixed below
    odd >>= 16
    np.copyto(b, odd, casting="unsafe")
    if np.max(np.bitwise_and(u, 0x7FFFFFFF), initial=0) > 0x7F800000:
        nan = np.isnan(u.view(np.float32))
        b[nan] = (np.right_shift(u[nan], 16) & 0x8000 | 0x7FC0).astype(np.uint16)


# --- Argument handling ---


def _c_array(x: npt.ArrayLike, dtype: np.dtype[Any], name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != dtype:
        raise TypeError(f"{name}: expected a {dtype} array, got dtype {a.dtype}")
    return a if a.flags.c_contiguous else a.copy(order="C")  # (0-d stays 0-d)


def _out(out: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype)
    if out.dtype != dtype or out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(
            f"out: expected a C-contiguous {dtype} array of shape {shape}, got "
            f"{out.dtype} {out.shape}{'' if out.flags.c_contiguous else ' (not contiguous)'}"
        )
    return out
