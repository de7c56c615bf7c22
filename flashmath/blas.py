"""NumPy's own OpenBLAS through ctypes: single-precision GEMM with alpha and beta.

``np.matmul`` computes ``a @ b`` only; the tiled kernels also want ``c = alpha a b + beta c``
(a scale applied inside the GEMM, accumulation into an existing tile) without a temporary
and an extra pass. :func:`sgemm` calls ``cblas_sgemm`` of the OpenBLAS that NumPy itself
loaded (found in /proc/self/maps; NumPy 2 wheels name it ``scipy_cblas_sgemm64_``, with
64-bit integers), which releases the GIL like any ctypes call. Where that library or
symbol is missing (other NumPy builds: MKL, Accelerate; other platforms) or an operand's
layout is not one BLAS takes, it falls back to ``np.matmul`` plus the same arithmetic: the
results agree to rounding (BLAS may order the sums differently), and the callers' accuracy
does not depend on which runs.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["available", "openblas_paths", "sgemm"]

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
#: (symbol, integer type) tried in order.
_SYMBOLS = (("scipy_cblas_sgemm64_", ctypes.c_int64), ("cblas_sgemm64_", ctypes.c_int64),
            ("scipy_cblas_sgemm", ctypes.c_int), ("cblas_sgemm", ctypes.c_int))


@functools.cache
def openblas_paths() -> tuple[str, ...]:
    """The OpenBLAS shared libraries this process has loaded (after loading NumPy's BLAS),
    from /proc/self/maps; empty where that file does not exist."""
    np.matmul(np.ones((2, 2)), np.ones((2, 2)))  # make sure BLAS is loaded
    try:
        with open("/proc/self/maps") as maps:
            return tuple(sorted({line.split()[-1] for line in maps
                                 if "openblas" in line.lower()}))
    except OSError:
        return ()


@functools.cache
def _kernel() -> Callable[..., None] | None:
    """The ctypes-bound cblas_sgemm, or None."""
    for path in openblas_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name, integer in _SYMBOLS:
            fn: Any = getattr(lib, name, None)
            if fn is None:
                continue
            p, f, e = ctypes.c_void_p, ctypes.c_float, ctypes.c_int
            fn.argtypes = [e, e, e, integer, integer, integer, f, p, integer, p, integer, f,
                           p, integer]
            fn.restype = None
            return fn
    return None


def available() -> bool:
    """Whether :func:`sgemm` reaches cblas_sgemm (else it runs on np.matmul)."""
    return _kernel() is not None


def _operand(x: np.ndarray) -> tuple[int, int] | None:
    """(transpose flag, leading dimension) for a float32 2-D operand BLAS can read in place:
    row-major with unit column stride, or a transposed view of one; None otherwise."""
    if x.dtype != np.float32 or x.ndim != 2:
        return None
    r, c = x.strides
    if c == 4 and r >= 4 * max(1, x.shape[1]) and r % 4 == 0:
        return _NO_TRANS, r // 4
    if r == 4 and c >= 4 * max(1, x.shape[0]) and c % 4 == 0:
        return _TRANS, c // 4
    return None


def sgemm(a: np.ndarray, b: np.ndarray, c: np.ndarray, *, alpha: float = 1.0,
          beta: float = 0.0) -> None:
    """c <- alpha (a @ b) + beta c, in place, in float32.

    a (M, K), b (K, N), c (M, N), all float32 and 2-D; a and b may be transposed views
    (``x.T``) of row-major arrays; c must be row-major with unit column stride (a view of
    a larger buffer is fine). beta = 0 ignores c's old contents (NaN included), as BLAS
    does. alpha and beta are rounded to float32. Other layouts, dtypes, empty shapes or a
    missing BLAS symbol take the np.matmul path.
    """
    m, n = c.shape
    if a.shape[0] != m or b.shape[1] != n or a.shape[1] != b.shape[0]:
        raise ValueError(f"sgemm: shapes a {a.shape}, b {b.shape}, c {c.shape} do not "
                         f"chain as (M, K) @ (K, N) -> (M, N)")
    fn, ka, kb = _kernel(), _operand(a), _operand(b)
    kc = _operand(c)
    if (fn is None or ka is None or kb is None or kc is None or kc[0] != _NO_TRANS
            or 0 in (m, n, a.shape[1])):
        _fallback(a, b, c, alpha, beta)
        return
    fn(_ROW_MAJOR, ka[0], kb[0], m, n, a.shape[1], alpha, a.ctypes.data, ka[1],
       b.ctypes.data, kb[1], beta, c.ctypes.data, kc[1])


def _fallback(a: np.ndarray, b: np.ndarray, c: np.ndarray, alpha: float,
              beta: float) -> None:
    """sgemm on np.matmul: the same float32 arithmetic, with a temporary for beta != 0."""
    f32 = np.float32
    if beta == 0:
        np.matmul(a, b, out=c)
        if f32(alpha) != 1:
            c *= f32(alpha)
        return
    t = np.matmul(a, b, dtype=f32)
    if f32(alpha) != 1:
        t *= f32(alpha)
    if f32(beta) != 1:
        c *= f32(beta)
    c += t
