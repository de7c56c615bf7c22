"""The fast path of the stable softmax family: rows along the trailing axes of a
C-contiguous array, in cache-sized blocks of rows, on every core when the array is large.

Every block does, row by row, exactly the operations of the general path (the functions
of :mod:`flashmath.softmax.maths` on the same row-contiguous data), so results are bit for
bit the same whatever the blocks or threads. Narrow inputs are widened and rounded back
one block at a time (:func:`flashmath.rounding.cast`), so the extra memory is a few
blocks, never a float32 copy of the whole input.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from flashmath.parallel import row_blocks, run_units
from flashmath.rounding import cast
from flashmath.softmax import maths

__all__ = ["BLOCK_BYTES", "PARALLEL_MIN", "Flat", "cross_entropy_rows", "flat",
           "log_softmax_rows", "logsumexp_rows", "softmax_rows"]


#: Bytes of accumulate dtype per block of rows (its temporaries stay in the cache).
BLOCK_BYTES = 1 << 18
#: Elements from which the blocks are shared between the cores (below: no thread overhead).
PARALLEL_MIN = 1 << 18


class Flat(NamedTuple):
    x: np.ndarray  # (R, n): the caller's data in its own dtype, one row per row
    acc: np.dtype[Any]  # the accumulate dtype
    shape: tuple[int, ...]  # the caller's shape
    axes: tuple[int, ...]  # the reduced axes: the trailing ones


def flat(arr: np.ndarray, axes: tuple[int, ...], acc: np.dtype[Any]) -> Flat | None:
    """``arr`` as (rows, row length) when the fast path applies (the reduced ``axes``
    trailing, C order, non-empty, >= 1-d), else None."""
    if arr.ndim == 0 or arr.size == 0 or not arr.flags.c_contiguous:
        return None
    k = len(axes)
    if sorted(axes) != list(range(arr.ndim - k, arr.ndim)):
        return None
    n = math.prod(arr.shape[arr.ndim - k :])
    return Flat(arr.reshape(-1, n), acc, arr.shape, tuple(sorted(axes)))


def _each_block(f: Flat, work: Any) -> None:
    """``work(rows)`` for blocks of rows, shared between the cores for large arrays."""
    rows, n = f.x.shape
    blocks = row_blocks(rows, n, block=max(1, BLOCK_BYTES // f.acc.itemsize))
    run_units(blocks, work, parallel=rows * n >= PARALLEL_MIN)


def _load(f: Flat, rows: slice, into: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``(a - shift, shift)`` for a block: a = the rows in the accumulate dtype, written
    into ``into`` when given (a block of the output in that dtype), else a fresh block."""
    xb = f.x[rows]
    if xb.dtype != f.acc:
        xb = cast(xb, f.acc, out=into)
        into = xb
    shift = maths.shift_of(xb, (1,))
    return np.subtract(xb, shift, out=into), shift


def _store(out: np.ndarray, rows: slice, d: np.ndarray) -> None:
    """Round a block computed apart (narrow output) into its rows of ``out``."""
    if not np.may_share_memory(d, out):
        cast(d, out.dtype, out=out[rows])


def softmax_rows(f: Flat, empty: str) -> np.ndarray:
    out = np.empty(f.x.shape, f.x.dtype)
    fill = np.nan if empty == "nan" else 1.0 / f.x.shape[1]

    def work(rows: slice) -> None:
        with np.errstate(invalid="ignore", over="ignore"):
            d, _ = _load(f, rows, out[rows] if out.dtype == f.acc else None)
            e = np.exp(d, out=d)
            s = np.sum(e, axis=1, keepdims=True)
            np.divide(e, np.maximum(s, 1), out=e)
            if empty != "zeros":
                np.copyto(e, np.array(fill, dtype=e.dtype), where=s == 0)
            _store(out, rows, e)

    _each_block(f, work)
    return out


def log_softmax_rows(f: Flat) -> np.ndarray:
    out = np.empty(f.x.shape, f.x.dtype)

    def work(rows: slice) -> None:
        with np.errstate(invalid="ignore", over="ignore"):
            d, _ = _load(f, rows, out[rows] if out.dtype == f.acc else None)
            log_s, _ = maths.log_sum(d, (1,))
            _store(out, rows, np.subtract(d, np.maximum(log_s, 0), out=d))

    _each_block(f, work)
    return out


def logsumexp_rows(f: Flat) -> tuple[np.ndarray, np.ndarray]:
    lse = np.empty((f.x.shape[0], 1), f.acc)
    sign = np.empty((f.x.shape[0], 1), f.acc)

    def work(rows: slice) -> None:
        with np.errstate(invalid="ignore"):
            d, shift = _load(f, rows, None)
            log_s, sign[rows] = maths.log_sum(d, (1,))
            np.add(shift, log_s, out=lse[rows])

    _each_block(f, work)
    return lse, sign


def cross_entropy_rows(
    f: Flat, y: np.ndarray, ignored: np.ndarray | None, smoothing: float
) -> np.ndarray:
    """Per-label loss as :func:`maths.nll` computes it, ``y.shape``, accumulate dtype."""
    idx = (y if ignored is None else np.where(ignored, 0, y)).reshape(-1, 1)
    loss = np.empty((f.x.shape[0], 1), f.acc)

    def work(rows: slice) -> None:
        with np.errstate(invalid="ignore"):
            d, _ = _load(f, rows, None)
            log_s = np.maximum(maths.log_sum(d, (1,))[0], 0)
            picked = np.take_along_axis(d, idx[rows], axis=1)
            loss[rows] = maths.smoothed(log_s - picked, log_s, d, 1, smoothing)

    _each_block(f, work)
    out = loss.reshape(y.shape)
    return out if ignored is None else np.where(ignored, np.zeros((), out.dtype), out)




