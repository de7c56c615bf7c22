"""The fast path of the stable softmax family: rows along the trailing axes of a
C-contiguous array, in cache-sized blocks of rows, on every core when the array is large.

Every block does, row by row, exactly the operations of the general path (the functions
of :mod:`flashmath.softmax.maths` on the same row-contiguous data), so results are bit for
bit the same whatever the blocks or threads. Rows of at most SHORT entries are held as the
columns of a transposed block, where each reduction is a few vector operations across all
rows instead of a loop call per row (measured 1.6-4.5x faster for rows of 2-8 entries); their sums
repeat NumPy's pairwise order (:func:`maths.pairwise_sum0`), so the bits are the same
(a NaN's sign and payload aside: NumPy's row max may return the default NaN where the
columns' max passes the input's on).
Narrow inputs are widened and rounded back one block at a time
(:func:`flashmath.rounding.cast`), so the extra memory is a few blocks, never a float32
copy of the whole input.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from flashmath.parallel import cores, row_blocks, run_units
from flashmath.rounding import cast, probabilities_to_float16
from flashmath.softmax import maths

__all__ = ["BLOCK_BYTES", "PARALLEL_MIN", "SHORT", "Flat", "cross_entropy_rows", "flat",
           "log_softmax_rows", "logsumexp_rows", "softmax_rows"]


#: Bytes of accumulate dtype per block of rows (its temporaries stay in the cache).
BLOCK_BYTES = 1 << 18
#: Elements from which the blocks are shared between the cores (below: no thread overhead).
PARALLEL_MIN = 1 << 18
#: Rows of at most this many entries are computed as columns (:func:`_load_columns`).
SHORT = 12


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
    """``work(rows)`` for blocks of rows; for large arrays the blocks are cut into one
    contiguous run per core, each run a thread's (a thread hand-off per block cost
    ~0.1 ms, as much as a block of short rows takes)."""
    rows, n = f.x.shape
    blocks = row_blocks(rows, n, block=max(1, BLOCK_BYTES // f.acc.itemsize))
    if rows * n < PARALLEL_MIN or len(blocks) == 1:
        for b in blocks:
            work(b)
        return
    runs = np.array_split(np.arange(len(blocks)), min(cores(), len(blocks)))

    def run(idx: np.ndarray) -> None:
        for i in idx:
            work(blocks[i])

    run_units(runs, run)


def _load(f: Flat, rows: slice, into: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``(a - shift, shift)`` for a block: a = the rows in the accumulate dtype, written
    into ``into`` when given (a block of the output in that dtype), else a fresh block."""
    xb = f.x[rows]
    if xb.dtype != f.acc:
        xb = cast(xb, f.acc, out=into)
        into = xb
    shift = maths.shift_of(xb, (1,))
    return np.subtract(xb, shift, out=into), shift


def _short(f: Flat) -> bool:
    """Whether f's rows take the columns path: at most SHORT entries, and an accumulate
    dtype whose sums :func:`maths.pairwise_sum0` repeats (float32, float64: NumPy sums
    float16 in float32, ml_dtypes sums bfloat16 and float8 in order)."""
    return f.x.shape[1] <= SHORT and f.acc in (np.float32, np.float64)


def _load_columns(f: Flat, rows: slice) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_load` for short rows (at most SHORT entries), transposed: ``(a - shift,
    shift)`` as an (n, r) array whose columns are the block's rows and a (1, r) shift.

    NumPy reduces a row in a loop call per row, which short rows do not amortise, so they
    are reduced as columns, one vector step across all rows at a time
    (:func:`maths.pairwise_sum0` keeps the sums' bits). The two transposing copies cost
    about as much as the reductions save at 16 entries, hence SHORT = 12."""
    xb = f.x[rows]
    if xb.dtype != f.acc:
        xb = cast(xb, f.acc)
    t = np.empty(xb.shape[::-1], f.acc)
    np.copyto(t, xb.T)
    shift = maths.shift_of(t, (0,))
    return np.subtract(t, shift, out=t), shift


def _store(out: np.ndarray, rows: slice, d: np.ndarray) -> None:
    """Round a block computed apart (narrow output, or short rows as columns: ``d`` is then
    the transposed view) into its rows of ``out``."""
    if not np.may_share_memory(d, out):
        cast(d, out.dtype, out=out[rows])


class _Block(NamedTuple):
    """One block, shifted: d (a - shift, the rows as rows or, short, as columns), shift
    (keepdims), the reduced axis, and the row sum to use (None: NumPy's along the axis)."""

    d: np.ndarray
    shift: np.ndarray
    axis: int
    row_sum: Any

    @property
    def rows(self) -> np.ndarray:
        """d with one row per row (a view)."""
        return self.d.T if self.axis == 0 else self.d


def _block(f: Flat, rows: slice, short: bool, into: np.ndarray | None = None) -> _Block:
    """:func:`_load_columns` when ``short``, else :func:`_load` (into ``into``)."""
    if short:
        return _Block(*_load_columns(f, rows), 0, maths.pairwise_sum0)
    return _Block(*_load(f, rows, into), 1, None)


def softmax_rows(f: Flat, empty: str) -> np.ndarray:
    out = np.empty(f.x.shape, f.x.dtype)
    fill = np.nan if empty == "nan" else 1.0 / f.x.shape[1]
    short = _short(f)

    def work(rows: slice) -> None:
        with np.errstate(invalid="ignore", over="ignore"):
            blk = _block(f, rows, short, out[rows] if out.dtype == f.acc else None)
            e = np.exp(blk.d, out=blk.d)
            s = (np.sum(e, axis=1, keepdims=True) if blk.row_sum is None
                 else blk.row_sum(e))
            np.divide(e, np.maximum(s, 1), out=e)
            if empty != "zeros":
                np.copyto(e, np.array(fill, dtype=e.dtype), where=s == 0)
            if not short and out.dtype == np.float16 and e.dtype == np.float32:
                probabilities_to_float16(e, out[rows])  # e: this block's own p
            else:
                _store(out, rows, blk.rows)

    _each_block(f, work)
    return out


def log_softmax_rows(f: Flat) -> np.ndarray:
    out = np.empty(f.x.shape, f.x.dtype)
    short = _short(f)

    def work(rows: slice) -> None:
        with np.errstate(invalid="ignore", over="ignore"):
            blk = _block(f, rows, short, out[rows] if out.dtype == f.acc else None)
            log_s, _ = maths.log_sum(blk.d, (blk.axis,), row_sum=blk.row_sum)
            np.subtract(blk.d, np.maximum(log_s, 0), out=blk.d)
            _store(out, rows, blk.rows)

    _each_block(f, work)
    return out


def logsumexp_rows(f: Flat) -> tuple[np.ndarray, np.ndarray]:
    lse = np.empty((f.x.shape[0], 1), f.acc)
    sign = np.empty((f.x.shape[0], 1), f.acc)
    short = _short(f)

    def work(rows: slice) -> None:
        with np.errstate(invalid="ignore"):
            blk = _block(f, rows, short)
            log_s, sign_b = maths.log_sum(blk.d, (blk.axis,), row_sum=blk.row_sum)
            sign[rows] = sign_b.reshape(-1, 1)
            lse[rows] = np.add(blk.shift, log_s).reshape(-1, 1)

    _each_block(f, work)
    return lse, sign


def cross_entropy_rows(
    f: Flat, y: np.ndarray, ignored: np.ndarray | None, smoothing: float
) -> np.ndarray:
    """Per-label loss as :func:`maths.nll` computes it, ``y.shape``, accumulate dtype."""
    idx = (y if ignored is None else np.where(ignored, 0, y)).reshape(-1, 1)
    loss = np.empty((f.x.shape[0], 1), f.acc)
    short = _short(f)

    def work(rows: slice) -> None:
        with np.errstate(invalid="ignore"):
            blk = _block(f, rows, short)
            ax = blk.axis
            log_s = np.maximum(maths.log_sum(blk.d, (ax,), row_sum=blk.row_sum)[0], 0)
            picked = np.take_along_axis(blk.d, idx[rows].reshape(blk.shift.shape), axis=ax)
            loss[rows] = maths.smoothed(log_s - picked, log_s, blk.d, ax, smoothing,
                                        blk.row_sum).reshape(-1, 1)

    _each_block(f, work)
    out = loss.reshape(y.shape)
    return out if ignored is None else np.where(ignored, np.zeros((), out.dtype), out)




