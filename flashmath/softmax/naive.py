"""The textbook formulas, computed in the input dtype: kept only to be compared against.

These are the functions seed 001 asks you to break::

    softmax(x)        = exp(x) / sum(exp(x))
    log_softmax(x)    = log(softmax(x))
    logsumexp(x)      = log(sum(exp(x)))
    cross_entropy(x, y) = -log(softmax(x)[y])

No shift, no upcast: every operation runs in ``x``'s own dtype, so they
overflow (``exp(x) = inf``, then ``inf / inf = NaN``) and underflow
(``0 / 0 = NaN``, ``log(0) = -inf``) exactly where the formula does in that
dtype. That is their point: the lab and the conformance checker put them
beside :mod:`flashmath.softmax.stable` to show where the stable versions matter.
NumPy's floating-point warnings are silenced inside; the NaN and inf stay in
the result.

What "in the input dtype" means here: each ufunc (``exp``, ``/``, ``log``)
rounds its result to the dtype, as NumPy and ml_dtypes do for float16,
bfloat16 and float8. Sums are ``np.sum`` in the dtype; NumPy adds float16
pairwise in float32 and rounds the total once, ml_dtypes adds bfloat16 and
float8 in their own dtype. Either way a sum whose total exceeds the dtype's
maximum overflows, as it would on a device.

Shapes: any, batched along ``axis`` (an int, default -1, or a tuple). Integer
and bool input is promoted to float64; other dtypes are a TypeError.

Examples
--------
>>> import numpy as np
>>> import flashmath as fm
>>> x = np.array([1.0, 92.0, 3.0], dtype=np.float32)
>>> fm.naive.softmax(x)                                    # exp(92) overflows float32
array([ 0., nan,  0.], dtype=float32)
>>> fm.softmax(x)                                          # the shifted one does not
array([3.014403e-40, 1.000000e+00, 2.227364e-39], dtype=float32)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from flashmath.dtypes import as_float_array
from flashmath.softmax.stable import (  # the same reductions and labels as the stable versions
    REDUCTIONS,
    check_labels,
)

__all__ = ["cross_entropy", "exp_and_softmax", "log_softmax", "logsumexp", "softmax"]

Axis = int | tuple[int, ...]


def softmax(x: npt.ArrayLike, axis: Axis = -1) -> Any:
    """``exp(x) / sum(exp(x))`` along ``axis``, in ``x``'s dtype; NaN where it overflows.

    Returns an array of ``x``'s shape and dtype (float64 for integer input).
    """
    _, p = exp_and_softmax(as_float_array(x), axis)
    return p[()]


def log_softmax(x: npt.ArrayLike, axis: Axis = -1) -> Any:
    """``log(softmax(x))``, in ``x``'s dtype: -inf where softmax underflowed to 0."""
    _, p = exp_and_softmax(as_float_array(x), axis)
    with np.errstate(all="ignore"):
        return np.log(p)[()]


def logsumexp(x: npt.ArrayLike, axis: Axis = -1, *, keepdims: bool = False) -> Any:
    """``log(sum(exp(x)))`` along ``axis``, in ``x``'s dtype: inf once ``exp`` overflows."""
    arr = as_float_array(x)
    with np.errstate(all="ignore"):
        return np.log(np.sum(np.exp(arr), axis=axis, keepdims=keepdims))[()]


def cross_entropy(
    logits: npt.ArrayLike, labels: npt.ArrayLike, axis: int = -1, *, reduction: str = "mean"
) -> Any:
    """``-log(softmax(x)[y])`` per label, in the logits' dtype, then reduced.

    ``labels`` has the logits' shape without ``axis``; ``reduction`` is "mean",
    "sum" or "none" (the per-label losses, ``labels.shape``), as in
    :func:`flashmath.cross_entropy` (no ignore_index or smoothing here). Labels are
    checked as the stable version checks them: non-integer labels are a TypeError, a
    wrong shape or a label outside ``[0, C)`` a ValueError naming ``labels``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    arr = as_float_array(logits, name="logits")
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"axis: the naive cross_entropy takes one int class axis, got {axis!r}")
    shape = arr.shape or (1,)  # a 0-d input is one class
    if not -len(shape) <= axis < len(shape):
        raise np.exceptions.AxisError(
            f"axis: {axis} is out of bounds for logits of dimension {len(shape)}"
        )
    y, _ = check_labels(labels, shape, int(axis) % len(shape))
    _, p = exp_and_softmax(arr, axis if arr.ndim else -1)
    if p.ndim == 0:
        p = p.reshape(1)
        axis = 0
    picked = np.take_along_axis(p, np.expand_dims(y, axis), axis=axis).squeeze(axis)
    with np.errstate(all="ignore"):
        loss = -np.log(picked)
        if reduction == "sum":
            loss = np.sum(loss)
        elif reduction == "mean":
            loss = np.mean(loss, dtype=loss.dtype)
    return np.asarray(loss)[()]


def exp_and_softmax(x: np.ndarray, axis: Axis) -> tuple[np.ndarray, np.ndarray]:
    """``(exp(x), exp(x) / sum(exp(x)))`` in ``x``'s dtype (analyze_softmax_safety reads both)."""
    with np.errstate(all="ignore"):
        e = np.exp(x)
        return e, e / np.sum(e, axis=axis, keepdims=True)
