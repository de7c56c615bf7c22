"""The maths of the stable softmax family on prepared arrays (the rows already in the
accumulate dtype, the reduced axes known): the shift by the row max, the normalised
exponentials, log-sum-exp with counts of the maxima, and the per-label cross-entropy.

:mod:`flashmath.softmax.stable` validates and prepares the input and calls these; the
row-block fast path (:mod:`flashmath.softmax.blocks`) calls the same functions on each
block, so both give the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from flashmath.softmax.rule import row_shift

__all__ = ["count_per_row", "log_sum", "nan_rows", "nll", "normalized", "pairwise_sum0",
           "shift_of", "shifted", "smoothed"]



def shift_of(a: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Each row's max where it is finite, 0 for a dead row (keepdims shape).

    ``initial=-inf`` gives a zero-length row the max -inf (shift 0) instead of an error;
    NaN propagates through the max, +inf stays +inf: both make the row NaN downstream.
    """
    with np.errstate(invalid="ignore"):  # ml_dtypes' max flags NaN (bfloat16, float8)
        return row_shift(np.max(a, axis=axes, keepdims=True, initial=-np.inf))


def shifted(
    a: np.ndarray, axes: tuple[int, ...], *, owned: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(a - shift, shift)`` with ``shift = row_shift(max)`` (keepdims): the first is
    <= 0 and exactly 0 at each row's max; a fresh array, or ``a`` itself if ``owned``."""
    shift = shift_of(a, axes)
    with np.errstate(invalid="ignore"):  # inf - inf in a +inf row: NaN, on purpose
        d = np.subtract(a, shift, out=a if owned else None)
    return nan_rows(d, shift), shift


def nan_rows(d: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """d with every entry of a NaN row (NaN shift) set to the default NaN, in place.

    ``d - shift`` leaves the row's own NaNs where the input had them and the shift's
    elsewhere; which of several NaNs a sum passes on depends on its order, so without this
    a NaN row's bits would depend on how its reductions were taken (NumPy's row loops, the
    fast path's columns). Then every output of the row is the default NaN on every path."""
    nan = np.isnan(shift)
    if nan.any():
        np.copyto(d, np.array(np.nan, d.dtype), where=nan)
    return d


def normalized(a: np.ndarray, axes: tuple[int, ...], empty: str, *, owned: bool) -> np.ndarray:
    d, _ = shifted(a, axes, owned=owned)
    with np.errstate(over="ignore"):  # only a narrow accum_dtype's sum can overflow
        e = np.exp(d, out=d)
        s = np.sum(e, axis=axes, keepdims=True)
    # s >= 1 wherever the row has anything left (its max contributes exp(0) = 1), and
    # s = 0 for a dead row: dividing by max(s, 1) gives that row 0 / 1 = 0, no branch.
    out = np.divide(e, np.maximum(s, 1), out=e)
    if empty != "zeros" and out.size:  # (a zero-length row has no entries to fill)
        dead = s == 0
        if dead.any():
            n = math.prod(a.shape[i] for i in axes)
            fill = np.nan if empty == "nan" else 1.0 / n
            out = np.where(dead, np.array(fill, dtype=out.dtype), out)
    return out


def log_sum(
    d: np.ndarray, axes: tuple[int, ...], b: np.ndarray | None = None,
    row_sum: Callable[[np.ndarray], np.ndarray] | None = None,
    row_count: Callable[[np.ndarray], np.ndarray] | None = None, *, overwrite: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``log|sum(b * exp(d))|`` and the sum's sign, per row (keepdims), for shifted ``d``.

    The terms at the row max (``d == 0``, each exactly ``b``) are summed apart into
    ``top``, the rest into ``rest``, and the log taken as ``log|top| + log1p(rest/top)``:
    accurate also when ``rest`` is tiny (scipy's device). Where that form does not
    apply (``top == 0``, or ``rest/top <= -1`` with negative weights) ``log|top + rest|``
    is used; for a dead row that is ``log(0) = -inf``, on purpose. ``row_sum`` and
    ``row_count`` replace the sum and the count of True over ``axes`` (keepdims; the fast
    path's column-wise reductions of short rows). ``overwrite``: exp(d) may be written
    over ``d`` (a caller that needs ``d`` no more saves a temporary).
    """
    at_max = d == 0
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        e = np.exp(d, out=d if overwrite else None)
        if b is None:
            top = (count_per_row(at_max, axes) if row_count is None
                   else row_count(at_max)).astype(e.dtype)
            # e is exactly exp(0) = 1 at the max: taking the mask away leaves +0 there and
            # e elsewhere (a masked copy is 10x slower where maxima are many: short rows)
            np.subtract(e, at_max, out=e)
        else:
            e *= b
            top = np.sum(np.where(at_max, b, 0), axis=axes, keepdims=True, dtype=e.dtype)
            np.copyto(e, 0, where=at_max)
        rest = np.sum(e, axis=axes, keepdims=True) if row_sum is None else row_sum(e)
        total = top + rest
        ratio = rest / top
        log_s = np.where(
            (top != 0) & (ratio > -1),
            np.log(np.abs(top)) + np.log1p(ratio),
            np.log(np.abs(total)),
        )
    return log_s, np.sign(total)


def count_per_row(mask: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``np.count_nonzero(mask, axis=axes, keepdims=True)``; for a few long rows (a block
    of the fast path) one whole-row count each, which skips the reduction's casting
    buffer (several times faster)."""
    if mask.ndim == 2 and axes == (1,) and mask.shape[0] <= 16:
        counts = [np.count_nonzero(row) for row in mask]
        return np.array(counts, dtype=np.intp).reshape(mask.shape[0], 1)
    return np.count_nonzero(mask, axis=axes, keepdims=True)


def nll(
    a: np.ndarray,
    y: np.ndarray,
    ignored: np.ndarray | None,
    axis: int,
    smoothing: float,
    *,
    owned: bool,
) -> np.ndarray:
    """Per-label loss, ``y.shape``, accumulate dtype; 0 where ignored."""
    if a.shape[axis] == 0:  # no classes: every label was ignore_index (else an error)
        return np.zeros(y.shape, dtype=a.dtype)
    d, _ = shifted(a, (axis,), owned=owned)
    log_s, _ = log_sum(d, (axis,))
    # log_s >= 0 in every live row; a dead row (log_s = -inf) must still lose +inf,
    # so clamp at 0: then 0 - d[y] = +inf. NaN (a +inf or NaN row) passes through.
    log_s = np.maximum(log_s, 0)
    idx = y if ignored is None else np.where(ignored, 0, y)
    picked = np.take_along_axis(d, np.expand_dims(idx, axis), axis=axis)
    with np.errstate(invalid="ignore"):
        loss = smoothed(log_s - picked, log_s, d, axis, smoothing)
    loss = np.squeeze(loss, axis=axis).astype(a.dtype, copy=False)
    if ignored is not None:
        loss = np.where(ignored, np.zeros((), loss.dtype), loss)
    return loss


def smoothed(
    loss: np.ndarray, log_s: np.ndarray, d: np.ndarray, axis: int, smoothing: float,
    row_sum: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """torch's label smoothing of the per-label ``loss`` (keepdims), from the shifted
    logits ``d`` and their ``log_s``: ``(1 - s) loss + s (log_s - mean(d))``; ``row_sum``
    as in :func:`log_sum` (the mean is then ``row_sum(d) / n``, as np.mean divides)."""
    if not smoothing:
        return loss
    mean = (np.mean(d, axis=axis, keepdims=True) if row_sum is None
            else row_sum(d) / d.shape[axis])
    uniform = log_s - mean
    return uniform if smoothing == 1.0 else (1.0 - smoothing) * loss + smoothing * uniform


def pairwise_sum0(a: np.ndarray) -> np.ndarray:
    """The sum of each column of ``a`` (n, r), float32 or float64, keepdims (1, r): bit for
    bit ``np.sum(a.T, axis=1)``, for rows held as columns (short rows seen through a
    transposed view, whose row-wise reductions cost NumPy a loop call per row).

    It repeats NumPy's pairwise summation of a contiguous row, one vector operation per
    step across all r rows: below 8 terms in order, up to 128 in 8 interleaved partial
    sums added as ((0+1)+(2+3))+((4+5)+(6+7)) and the remainder in order, longer rows
    split at a multiple of 8 near the middle; the reduction starts from +0 (so a row of
    -0.0 sums to +0.0, as NumPy's does). A test holds it to the installed NumPy's sums.
    """
    out = _pairwise(a)
    out += 0  # the reduction's identity: -0.0 becomes +0.0, as in np.sum
    return out[None, :]


def _pairwise(a: np.ndarray) -> np.ndarray:
    n = a.shape[0]
    if n < 8:
        r = a[0] + 0
        for i in range(1, n):
            r += a[i]
        return r
    if n <= 128:
        acc = a[:8].copy()
        whole = n - n % 8
        for i in range(8, whole, 8):
            acc += a[i : i + 8]
        pairs = acc[0::2] + acc[1::2]
        r = pairs[0::2] + pairs[1::2]
        r = r[0] + r[1]
        for i in range(whole, n):
            r += a[i]
        return r
    half = n // 2
    half -= half % 8
    return _pairwise(a[:half]) + _pairwise(a[half:])
