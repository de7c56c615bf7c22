"""The fast path of the stable softmax family: rows along the trailing axes of a
C-contiguous array, in blocks of rows of about 2 MiB, on every core when the array is large.

Every block does, row by row, exactly the operations of the general path (the functions
of :mod:`flashmath.softmax.maths` on the same row-contiguous data), so results are bit for
bit the same whatever the blocks or threads. Rows of at most SHORT entries have their max,
sums and counts taken column by column, one vector operation across all the block's rows
per column, instead of NumPy's loop call per row (its row max is 5x slower at 16 entries);
the sums repeat NumPy's pairwise order (:func:`maths.pairwise_sum0`), so the bits are the
same (a NaN row is made the default NaN throughout first, :func:`maths.nan_rows`, since
which of several NaNs a sum passes on depends on its order).
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
from flashmath.softmax.rule import row_shift

__all__ = ["BLOCK_BYTES", "PARALLEL_MIN", "SHORT", "Flat", "cross_entropy_rows", "flat",
           "log_softmax_rows", "logsumexp_rows", "softmax_rows"]


#: Bytes of accumulate dtype per block of rows. Measured here (2 cores, 1 MiB L2 each):
#: 2 MiB blocks took 0.5-0.7x the time of 256 KiB ones, whose dozen small NumPy calls per
#: block the two threads spent waiting on each other's GIL; 4 MiB was slower again.
BLOCK_BYTES = 1 << 21
#: Elements from which the blocks are shared between the cores (below: no thread overhead).
#: At the default BLOCK_BYTES two blocks always hold more; it matters for smaller blocks.
PARALLEL_MIN = 1 << 18
#: Rows of at most this many entries are reduced column by column (:func:`_column_max`):
#: measured faster than NumPy's row reductions up to 24 entries, even at 32 and 48.
SHORT = 24


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


def _short(f: Flat) -> bool:
    """Whether f's rows are short (at most SHORT entries) in an accumulate dtype whose
    sums :func:`maths.pairwise_sum0` repeats (float32, float64: NumPy sums float16 in
    float32, ml_dtypes sums bfloat16 and float8 in order): their max and sums are then
    taken across the rows, one column at a time (:func:`_column_max`)."""
    return f.x.shape[1] <= SHORT and f.acc in (np.float32, np.float64)


def _column_max(a: np.ndarray) -> np.ndarray:
    """``np.max(a, axis=1, keepdims=True, initial=-inf)`` of short rows, as one vector
    step per column across all rows (a strided view each: no copy). NumPy reduces a row in
    a loop call per row, 5x slower at 16 entries. The same values, but for the sign of a
    zero max (taken in column order: it can differ only where a row holds both +0 and -0
    maxima, whose log-sum is then >= log 2, so no output sees it) and a NaN's payload
    (:func:`row_shift` makes it the default NaN)."""
    m = a[:, 0].copy()
    for j in range(1, a.shape[1]):
        np.maximum(m, a[:, j], out=m)
    return m[:, None]


def _column_sum(a: np.ndarray) -> np.ndarray:
    """``np.sum(a, axis=1, keepdims=True)`` bit for bit (rows of NaNs of several kinds
    aside: :func:`maths.nan_rows` leaves none), for short rows: NumPy's pairwise order
    across the rows (:func:`maths.pairwise_sum0` on the transposed view)."""
    return maths.pairwise_sum0(a.T).T


def _column_count(mask: np.ndarray) -> np.ndarray:
    """``np.count_nonzero(mask, axis=1, keepdims=True)`` of short rows, column by column."""
    m = mask.view(np.uint8)  # 0/1; at most SHORT (< 256) per row
    c = m[:, 0].copy()
    for j in range(1, m.shape[1]):
        c += m[:, j]
    return c[:, None]


class _Block(NamedTuple):
    """One block of rows, shifted: d = a - shift (r, n), shift (r, 1), and the row sum and
    count to use (None: NumPy's along axis 1; the column-wise ones for short rows)."""

    d: np.ndarray
    shift: np.ndarray
    row_sum: Any
    row_count: Any

    def log_sum(self, overwrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """:func:`maths.log_sum` of the block's rows (``overwrite``: d may be overwritten)."""
        return maths.log_sum(self.d, (1,), row_sum=self.row_sum, row_count=self.row_count,
                             overwrite=overwrite)


def _block(f: Flat, rows: slice, short: bool, into: np.ndarray | None = None) -> _Block:
    """The block ``rows`` of f in the accumulate dtype, shifted by its row max: written into
    ``into`` when given (a block of the output in that dtype), else a fresh array."""
    xb = f.x[rows]
    if xb.dtype != f.acc:
        xb = cast(xb, f.acc, out=into)
        into = xb
    shift = row_shift(_column_max(xb)) if short else maths.shift_of(xb, (1,))
    d = maths.nan_rows(np.subtract(xb, shift, out=into), shift)
    return _Block(d, shift, *((_column_sum, _column_count) if short else (None, None)))


def _store(out: np.ndarray, rows: slice, d: np.ndarray) -> None:
    """Round a block computed apart (narrow output) into its rows of ``out``."""
    if not np.may_share_memory(d, out):
        cast(d, out.dtype, out=out[rows])


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
            if out.dtype == np.float16 and e.dtype == np.float32:
                probabilities_to_float16(e, out[rows])  # e: this block's own p
            else:
                _store(out, rows, e)

    _each_block(f, work)
    return out


def log_softmax_rows(f: Flat) -> np.ndarray:
    out = np.empty(f.x.shape, f.x.dtype)
    short = _short(f)

    def work(rows: slice) -> None:
        with np.errstate(invalid="ignore", over="ignore"):
            blk = _block(f, rows, short, out[rows] if out.dtype == f.acc else None)
            log_s, _ = blk.log_sum()
            np.subtract(blk.d, np.maximum(log_s, 0), out=blk.d)
            _store(out, rows, blk.d)

    _each_block(f, work)
    return out


def logsumexp_rows(f: Flat) -> tuple[np.ndarray, np.ndarray]:
    lse = np.empty((f.x.shape[0], 1), f.acc)
    sign = np.empty((f.x.shape[0], 1), f.acc)
    short = _short(f)

    def work(rows: slice) -> None:
        with np.errstate(invalid="ignore"):
            blk = _block(f, rows, short)
            log_s, sign[rows] = blk.log_sum(overwrite=True)
            lse[rows] = blk.shift + log_s

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
            picked = np.take_along_axis(blk.d, idx[rows], axis=1)
            log_s = np.maximum(blk.log_sum(overwrite=not smoothing)[0], 0)
            loss[rows] = maths.smoothed(log_s - picked, log_s, blk.d, 1, smoothing,
                                        blk.row_sum)

    _each_block(f, work)
    out = loss.reshape(y.shape)
    return out if ignored is None else np.where(ignored, np.zeros((), out.dtype), out)




