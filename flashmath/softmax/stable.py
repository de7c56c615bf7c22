"""Numerically stable softmax, log_softmax, logsumexp and cross_entropy.

Every function here shifts each row by its maximum before ``exp`` so nothing
overflows, and takes the logarithm of a sum whose largest term is exactly 1.
A *row* is everything that shares the reduced axes (``axis``, an int or a
tuple of ints). The public functions are thin: they promote the input
(:func:`flashmath.dtypes.as_float_array`), pick the accumulate dtype
(:func:`flashmath.dtypes.accumulate_dtype`), normalise ``axis`` and validate
the other arguments, then hand over to the private workers ``maths.normalized``,
``maths.log_sum`` and friends, which hold the maths. Shapes are fixed up at the end.

Edge cases (the same for every function; DESIGN.md):

- ``-inf`` entries and entries where ``where`` is False get probability exactly
  0 (log-probability ``-inf``). They are replaced by ``-inf`` before anything
  else, so a masked NaN or +inf is ignored, like JAX's ``where``.
- A row with nothing left (all ``-inf`` or masked out): softmax zeros (or
  uniform / NaN, see ``empty=``), log_softmax and logsumexp ``-inf``,
  cross_entropy ``+inf``. The shift is 0 for such rows (``online.row_shift``),
  so they need no branch and never produce NaN.
- ``+inf`` or NaN anywhere in a row makes that whole row NaN, other rows are
  untouched. This includes logsumexp, where scipy and torch return ``+inf``
  for a row containing ``+inf``: flashmath returns NaN because the softmax of
  that row (the gradient of logsumexp) is undefined, and every flashmath kernel
  reports such rows the same way.
- A zero-length reduced axis: logsumexp ``-inf``, softmax and log_softmax an
  empty array.
- A 0-d input is a single row of one element (as in torch and scipy):
  ``softmax(3.0) == 1``, ``logsumexp(3.0) == 3``. Results that are 0-d come
  back as NumPy scalars, like NumPy's reductions.

Dtypes: float64 is computed in float64; float32 and every narrower float
(float16, bfloat16, the float8 types) in float32, and the result is rounded
back to the input dtype. ``accum_dtype=`` forces another arithmetic dtype (the
lab uses float16 to show why the float32 default matters); it must be able to
hold ``-inf``, so the float8 types without infinities are refused there.
Integer and bool input is promoted to float64. float8_e8m0fnu holds only
positive powers of two and no zero: results it cannot hold (0, anything
negative) come back as NaN, which is how ml_dtypes rounds them.

Accuracy. ``r*`` is the exact result of the exact inputs (the 50-digit mpmath
oracle, tests/mp_oracle.py), eps the machine epsilon of the dtype computed in,
``s`` its smallest subnormal, n the row length, and
``E = sum_j p*_j |x_j - max x|`` the row's softmax-weighted spread below its
max: ``0 <= E <= ln(n) + 1``, and ``E ~ 0`` when one entry dominates. E and the
``|x_i - max x|`` term are the problem's own conditioning (DESIGN.md): rounding
``x_i - max x`` perturbs an exponent by up to ``eps/2 |x_i - max x|``, in any
implementation that forms that difference (scipy, torch). float64 and float32
are computed in their own dtype and meet (tested on seed 001's battery, random
rows and hypothesis rows with magnitudes up to 1e300):

=============  ===================================================================
logsumexp      ``|r - r*| <= eps (|r*| + E + log2(n) + 2) + (n + 1) s``
log_softmax    ``|r - r*| <= eps (2 |r*| + E) + (n + 1) s``
cross_entropy  ``|r - r*| <= eps (2 |r*| + E) + (n + 1) s`` per label
               (with label smoothing ``2 |r*|`` becomes ``(2 + log2(n)) |r*|``)
softmax        ``|p - p*| <= eps (|x_i - max x| + E + log2(n) + 2) p* + 2 s``
=============  ===================================================================

So in float64, rows up to 2**20 entries are within 1e-14 relative (softmax:
plus ``eps |x_i - max x|``); logsumexp is a few ulps of ``max(1, |r*|)``; and
log_softmax and cross_entropy carry no cancellation, so the log-probability of
a dominant entry is relatively accurate even when tiny (``-1.9e-22`` for
``[0, -50]``, where ``x - logsumexp(x)`` gives 0). float16, bfloat16 and float8
are computed in float32 and rounded once: ``|r - r*| <= eps |r*| + s`` (one
ulp) for softmax, log_softmax and cross_entropy, ``eps max(1, |r*|)`` for
logsumexp.

Measured max relative error (results in the dtype's normal range; seed 001's
battery and random rows of scale 0.1 to 1e4; * rows whose entries lie up to
~700 below their max, i.e. the ``|x_i - max x|`` term: 1.7e-16 on the battery):

=============  =========  ===========  =========  =============
dtype          softmax    log_softmax  logsumexp  cross_entropy
=============  =========  ===========  =========  =============
float64        2.9e-14 *  2.2e-16      2.0e-16    2.0e-16
float32        3.8e-6 *   1.2e-7       3.1e-8     6.3e-8
float16        4.8e-4     4.9e-4       4.7e-4     3.7e-4
bfloat16       3.5e-3     3.9e-3       2.4e-3     3.9e-3
float8_e4m3fn  0.053      0.059        0.031      0.059
float8_e5m2    0.11       0.11         0.10       0.11
=============  =========  ===========  =========  =============

(one ulp = eps: float32 1.2e-7, float16 9.8e-4, bfloat16 7.8e-3, float8_e4m3fn
0.125, float8_e5m2 0.25; the narrow dtypes land within half an ulp.)

Speed and memory. When the reduced axes are the trailing axes of a C-contiguous input
(the usual ``axis=-1``) and there is no ``where``/``b``, the rows are computed in blocks
of about 2 MiB of accumulate dtype, and the blocks are shared between the cores
(:mod:`flashmath.parallel`: one contiguous run of blocks per core) once the input has
two blocks or more; smaller inputs take no thread overhead. Each block runs, row by
row, exactly the NumPy operations of the general path, so the results are bit for bit
those of the general path whatever the blocks or threads (rows of at most 24 entries,
computed in float32 or float64, have their max, sums and counts taken column by column,
with the same bits; a row holding NaN gives the default NaN in every output on both
paths). Extra memory beyond the output is a few
blocks (about 10 MiB; less for inputs smaller than a block), for every dtype; narrow
inputs are widened to float32 a block at a time and rounded back with
:func:`flashmath.rounding.cast` (a float16 softmax's probabilities with
:func:`flashmath.rounding.probabilities_to_float16`): NumPy's bits,
without its 25x slower path for float16 results that are subnormal, which is most of a
softmax over a large vocabulary. Other layouts take the general path: one array in the
accumulate dtype, then the same steps over the whole array.

Examples
--------
The textbook formula overflows where the shifted one does not:

>>> import numpy as np
>>> import flashmath as fm
>>> x = np.array([1.0, 1000.0, 3.0])
>>> with np.errstate(over="ignore", invalid="ignore"):
...     np.exp(x) / np.exp(x).sum()                      # naive: inf / inf
array([ 0., nan,  0.])
>>> fm.softmax(x)
array([0., 1., 0.])
>>> fm.logsumexp([1000.0, 1000.0]) == 1000.0 + np.log(2.0)
np.True_
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from flashmath.dtypes import accumulate_dtype, as_float_array
from flashmath.softmax import blocks, inputs, maths
from flashmath.softmax.inputs import check_labels

__all__ = ["check_labels", "cross_entropy", "log_softmax", "logsumexp", "softmax"]

Empty = Literal["zeros", "uniform", "nan"]
Reduction = Literal["mean", "sum", "none"]
_EMPTY = ("zeros", "uniform", "nan")
REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------
# Public functions: promote, validate, normalise axes; the maths is in the workers below.
# --------------------------------------------------------------------------------------


def softmax(
    x: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    accum_dtype: npt.DTypeLike | str | None = None,
    empty: Empty = "zeros",
) -> Any:
    """Softmax ``exp(x_i) / sum_j exp(x_j)`` along ``axis``, without overflow.

    Parameters
    ----------
    x : array_like, any shape
        Scores. float64/float32/float16/bfloat16/float8, or integer/bool
        (promoted to float64). Non-contiguous views are read as they are.
    axis : int, tuple of ints or None, default -1
        The axes of a row (None: all). Negative axes count from the end.
    where : array_like of bool, broadcastable to ``x.shape``, optional
        False entries are left out: probability exactly 0.
    accum_dtype : dtype or name, optional
        Arithmetic dtype; default float64 for float64 input, else float32.
    empty : {"zeros", "uniform", "nan"}, default "zeros"
        Output for a row with nothing left (every entry -inf or masked):
        zeros (PyTorch's safe softmax, FlashAttention), ``1/n`` on every entry
        of the row (masked ones too: "the input carries no signal"), or NaN
        (to make the pathology loud).

    Returns
    -------
    ndarray, ``x.shape``, ``x``'s dtype (float64 for integer input)
        Rows sum to 1 up to rounding. ``-inf``/masked entries are exactly 0;
        a row holding +inf or NaN is all NaN.

    Notes
    -----
    float64/float32: ``|p_i - p*_i| <= eps (|x_i - max x| + E + log2(n) + 2)
    p*_i + 2 s``, within 1e-14 relative plus ``eps |x_i - max x|`` in float64
    (the shift's conditioning; module docstring). float16/bfloat16/float8:
    within one ulp of the exact value.

    Examples
    --------
    >>> import numpy as np
    >>> import flashmath as fm
    >>> x = np.array([1.0, 92.0, 3.0, 0.0, 2.0], dtype=np.float16)
    >>> with np.errstate(over="ignore", invalid="ignore"):
    ...     np.exp(x) / np.exp(x).sum()                   # naive float16: exp(92) = inf
    array([ 0., nan,  0.,  0.,  0.], dtype=float16)
    >>> fm.softmax(x)
    array([0., 1., 0., 0., 0.], dtype=float16)
    >>> fm.softmax([[0.0, -np.inf], [-np.inf, -np.inf]])  # a dead row gives zeros
    array([[1., 0.],
           [0., 0.]])
    """
    if empty not in _EMPTY:
        raise ValueError(f"empty: expected one of {_EMPTY}, got {empty!r}")
    flat = _fast(x, axis, accum_dtype, plain=where is None)
    if isinstance(flat, blocks.Flat):
        return blocks.softmax_rows(flat, empty).reshape(flat.shape)
    rows = inputs.prepare(flat, axis, where, accum_dtype, given=x)
    out = maths.normalized(rows.a, rows.axes, empty, owned=rows.owned)
    return inputs.finish(out, rows.in_dtype, rows.shape)


def log_softmax(
    x: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: npt.ArrayLike | None = None,
    accum_dtype: npt.DTypeLike | str | None = None,
) -> Any:
    """Log-softmax ``x_i - logsumexp(x)`` along ``axis``, accurate also near 0.

    Computed as ``(x_i - max) - log(sum_j exp(x_j - max))`` with the sum's
    largest term (exactly 1) kept apart and ``log1p`` taken of the rest, so
    both parts are <= 0 and >= 0 respectively and never cancel.

    Parameters
    ----------
    x, axis, where, accum_dtype
        As in :func:`softmax`.

    Returns
    -------
    ndarray, ``x.shape``, ``x``'s dtype (float64 for integer input)
        ``-inf`` for ``-inf``/masked entries and for every entry of a row with
        nothing left; NaN for a row holding +inf or NaN.

    Notes
    -----
    float64/float32: ``|r - r*| <= eps (2 |r*| + E) + (n + 1) s``, relative
    also for the largest entry's value near 0 when it dominates its row
    (``E ~ 0``). float16/bfloat16/float8: one ulp.

    Examples
    --------
    >>> import numpy as np
    >>> import flashmath as fm
    >>> x = np.array([1000.0, 1.0])
    >>> with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
    ...     np.log(np.exp(x) / np.exp(x).sum())            # naive: log(inf / inf)
    array([ nan, -inf])
    >>> fm.log_softmax(x)
    array([   0., -999.])
    >>> float(fm.log_softmax([0.0, -50.0])[0])             # -exp(-50), not 0
    -1.9287498479639178e-22
    """
    flat = _fast(x, axis, accum_dtype, plain=where is None)
    if isinstance(flat, blocks.Flat):
        return blocks.log_softmax_rows(flat).reshape(flat.shape)
    rows = inputs.prepare(flat, axis, where, accum_dtype, given=x)
    d, _ = maths.shifted(rows.a, rows.axes, owned=rows.owned)
    log_s, _ = maths.log_sum(d, rows.axes)
    # log_s >= 0 in every row with something left; clamping at 0 keeps a dead row
    # (log_s = -inf, d = -inf) at -inf instead of -inf - -inf = NaN. NaN passes through.
    out = np.subtract(d, np.maximum(log_s, 0), out=d)
    return inputs.finish(out, rows.in_dtype, rows.shape)


def logsumexp(
    x: npt.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    *,
    keepdims: bool = False,
    where: npt.ArrayLike | None = None,
    b: npt.ArrayLike | None = None,
    return_sign: bool = False,
    accum_dtype: npt.DTypeLike | str | None = None,
) -> Any:
    """``log(sum(b * exp(x)))`` along ``axis``, without overflow.

    Parameters
    ----------
    x, axis, where, accum_dtype
        As in :func:`softmax`.
    keepdims : bool, default False
        Keep the reduced axes with length 1.
    b : array_like, broadcastable with ``x``, optional
        Weights, as in ``scipy.special.logsumexp``; they may be negative. An
        entry whose weight is 0 adds nothing, even where ``x`` is inf or NaN.
        ``x`` and ``b`` broadcast against each other; ``b`` is computed in the
        accumulate dtype and the result has ``x``'s dtype.
    return_sign : bool, default False
        Return ``(log|sum|, sign(sum))`` (sign 1, -1, or 0 for an empty sum).
        Without it a negative sum gives NaN, as in scipy.

    Returns
    -------
    ndarray or scalar, ``x``'s shape without the reduced axes (kept as 1 with
    ``keepdims``), ``x``'s dtype (float64 for integer input)
        ``-inf`` for a row with nothing left and for a zero-length axis; NaN for
        a row holding +inf or NaN (scipy and torch give +inf for +inf: see the
        module docstring). With ``return_sign`` a pair of such arrays.

    Notes
    -----
    float64/float32: ``|r - r*| <= eps (|r*| + E + log2(n) + 2) + (n + 1) s``,
    a few ulps of ``max(1, |r*|)``; ``logsumexp([1000, 1000])`` is exactly
    ``1000 + log(2)``. float16/bfloat16/float8: ``eps max(1, |r*|)``.

    Examples
    --------
    >>> import numpy as np
    >>> import flashmath as fm
    >>> x = np.array([1000.0, 1000.0])
    >>> with np.errstate(over="ignore"):
    ...     np.log(np.exp(x).sum())                        # naive: log(inf)
    np.float64(inf)
    >>> float(fm.logsumexp(x))
    1000.6931471805599
    >>> fm.logsumexp([1.0, 2.0], b=[1.0, -1.0], return_sign=True)
    (np.float64(1.5413248546129181), np.float64(-1.0))
    """
    flat = _fast(x, axis, accum_dtype, plain=where is None and b is None)
    if isinstance(flat, blocks.Flat):
        lse, sign = blocks.logsumexp_rows(flat)
        shape = inputs.reduced_shape(flat.shape, flat.axes, keepdims, flat.shape)
        result = inputs.finish(lse, flat.x.dtype, shape)
        return (result, inputs.finish(sign, flat.x.dtype, shape)) if return_sign else result
    rows = inputs.prepare(flat, axis, where, accum_dtype, b=b, given=x)
    d, shift = maths.shifted(rows.a, rows.axes, owned=rows.owned)
    log_s, sign = maths.log_sum(d, rows.axes, rows.b)
    # The shift is 0 for dead rows, so they come out as 0 + -inf = -inf.
    out = np.add(shift, log_s, out=log_s)
    if not return_sign:
        with np.errstate(invalid="ignore"):  # a NaN row's sign (ml_dtypes flags NaN < 0)
            out[sign < 0] = np.nan
    out_shape = inputs.reduced_shape(rows.a.shape, rows.axes, keepdims, rows.shape)
    result = inputs.finish(out, rows.in_dtype, out_shape)
    if return_sign:
        return result, inputs.finish(sign, rows.in_dtype, out_shape)
    return result


def cross_entropy(
    logits: npt.ArrayLike,
    labels: npt.ArrayLike,
    axis: int = -1,
    *,
    reduction: Reduction = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    accum_dtype: npt.DTypeLike | str | None = None,
) -> Any:
    """Cross-entropy of integer ``labels`` under ``softmax(logits)``, from the logits.

    ``loss = logsumexp(x) - x[y]``, computed as ``log(sum exp(x - max)) -
    (x[y] - max)`` (a sum of two non-negative terms, never ``log(softmax)``),
    with torch's label smoothing: ``(1 - s) * loss + s * mean_c(logsumexp(x)
    - x[c])``.

    Parameters
    ----------
    logits : array_like, shape ``(..., C, ...)``
        Scores; ``axis`` is the class axis (torch's ``dim=1`` is ``axis=1``).
        Dtypes as in :func:`softmax`. A 0-d input is one class.
    labels : array_like of int, ``logits.shape`` without ``axis``
        Class indices in ``[0, C)``, or ``ignore_index``.
    axis : int, default -1
        The class axis.
    reduction : {"mean", "sum", "none"}, default "mean"
        "none": one loss per label (0 where ignored); "sum": their sum;
        "mean": the sum divided by the number of labels not ignored (torch),
        so NaN when every label is ignored (0 / 0, as torch).
    ignore_index : int, optional
        Labels equal to it contribute nothing (torch's default -100 is not
        assumed: None ignores nothing).
    label_smoothing : float in [0, 1], default 0
        torch's definition: the target is ``(1 - s) * onehot(y) + s / C``.
    accum_dtype : dtype or name, optional
        As in :func:`softmax`.

    Returns
    -------
    ndarray or scalar, ``logits``' dtype (float64 for integer input)
        A scalar for "mean" and "sum", ``labels.shape`` for "none". A label
        whose logit is ``-inf`` (probability 0 of the truth) gives ``+inf``, as
        does a row with every logit ``-inf``: a poison pill in training, where
        the true class should never be masked. A row holding +inf or NaN gives NaN.

    Raises
    ------
    TypeError
        Non-integer labels, or an unsupported logits dtype.
    ValueError
        Labels' shape not ``logits.shape`` without ``axis``; a label outside
        ``[0, C)`` that is not ``ignore_index``; a bad reduction or smoothing.

    Notes
    -----
    float64/float32, per label: ``|r - r*| <= eps (2 |r*| + E) + (C + 1) s``
    (``(2 + log2(C)) |r*|`` with label smoothing). float16/bfloat16/float8:
    one ulp.

    Examples
    --------
    >>> import numpy as np
    >>> import flashmath as fm
    >>> x = np.array([1.0, 1000.0, 3.0])
    >>> with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
    ...     -np.log((np.exp(x) / np.exp(x).sum())[0])      # naive: -log(e / inf)
    np.float64(inf)
    >>> float(fm.cross_entropy(x, 0))
    999.0
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    smoothing = float(label_smoothing)
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing!r}")
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"axis: cross_entropy takes one int class axis, got {axis!r}")
    flat = _fast(logits, axis, accum_dtype, name="logits")
    if isinstance(flat, blocks.Flat):
        ax = len(flat.shape) - 1
        y, ignored = check_labels(labels, flat.shape, ax, ignore_index)
        in_dtype = flat.x.dtype
        loss = blocks.cross_entropy_rows(flat, y, ignored, smoothing)
    else:
        rows = inputs.prepare(flat, axis, None, accum_dtype, name="logits", given=logits)
        (ax,) = rows.axes
        y, ignored = check_labels(labels, rows.a.shape, ax, ignore_index)
        in_dtype = rows.in_dtype
        loss = maths.nll(rows.a, y, ignored, ax, smoothing, owned=rows.owned)
    if reduction == "none":
        return inputs.finish(loss, in_dtype, y.shape)
    total = np.sum(loss)
    if reduction == "mean":
        count = loss.size if ignored is None else loss.size - int(np.count_nonzero(ignored))
        with np.errstate(invalid="ignore", divide="ignore"):
            total = total / np.asarray(count, dtype=loss.dtype)  # every label ignored: 0/0 = NaN
    return inputs.finish(np.asarray(total), in_dtype, ())




def _fast(x: npt.ArrayLike, axis: Any, accum_dtype: Any, *, name: str = "x",
          plain: bool = True) -> blocks.Flat | np.ndarray:
    """``x`` prepared for the row-block fast path when it applies (no ``where``/``b``,
    the reduced axes trailing, C order), else ``x`` as an array for the general path."""
    arr = as_float_array(x, name=name)
    if not plain:
        return arr
    if arr.ndim == 0 or arr.size == 0:
        return arr
    found = blocks.flat(arr, inputs.normalize_axes(axis, arr.ndim),
                        accumulate_dtype(arr.dtype, accum_dtype))
    return arr if found is None else found
