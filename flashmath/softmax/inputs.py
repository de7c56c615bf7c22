"""Argument handling of the stable softmax family: the input as rows in the accumulate
dtype, the reduced axes, ``where`` masks and scipy's ``b``, the labels of cross-entropy,
and the result's shape and dtype. Errors name the argument and what was wrong.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from flashmath.dtypes import accumulate_dtype, as_float_array
from flashmath.rounding import cast

__all__ = ["Rows", "broadcast_where", "check_labels", "finish", "normalize_axes", "prepare",
           "reduced_shape"]



class Rows(NamedTuple):
    a: np.ndarray  # the input in the accumulate dtype, >= 1-d, masked entries -inf
    axes: tuple[int, ...]  # the reduced axes, non-negative, sorted as given
    in_dtype: np.dtype[Any]  # the dtype results return in
    shape: tuple[int, ...]  # the caller's shape (0-d inputs are read as shape (1,))
    owned: bool  # a is a fresh array this call may overwrite
    b: np.ndarray | None  # logsumexp weights, broadcast to a.shape, accumulate dtype


def prepare(
    x: npt.ArrayLike,
    axis: int | tuple[int, ...] | None,
    where: npt.ArrayLike | None,
    accum_dtype: npt.DTypeLike | str | None,
    *,
    name: str = "x",
    b: npt.ArrayLike | None = None,
    given: Any = None,
) -> Rows:
    """Promote ``x``, choose the accumulate dtype, normalise ``axis``, apply ``where``/``b``.

    ``given`` is what the caller passed, if ``x`` is that already converted: an array
    ``x`` shares memory with only if it is the caller's.
    """
    caller = x if given is None else given
    given = np.asarray(caller) if hasattr(caller, "__array__") else None  # the caller's memory
    arr = as_float_array(x, name=name)
    in_dtype = arr.dtype
    acc = accumulate_dtype(in_dtype, accum_dtype)  # refuses dtypes without -inf
    weights = None
    if b is not None:
        weights = as_float_array(b, name="b")
        try:
            shape = np.broadcast_shapes(arr.shape, weights.shape)
        except ValueError:
            raise ValueError(
                f"b: shape {weights.shape} does not broadcast with {name}'s shape {arr.shape}"
            ) from None
        arr = np.broadcast_to(arr, shape)
        weights = np.broadcast_to(weights, shape).astype(acc, copy=False)
    shape = arr.shape
    if arr.ndim == 0:  # one row of one element, as torch and scipy read a 0-d input
        arr = arr.reshape(1)
        weights = None if weights is None else weights.reshape(1)
    axes = normalize_axes(axis, arr.ndim)
    a = arr.astype(acc, copy=False)
    # Fresh (ours to overwrite) only if made here: never a view of the caller's memory,
    # whether that is an ndarray, or a torch tensor seen through np.asarray.
    owned = given is None or not np.may_share_memory(a, given)
    keep = None if where is None else broadcast_where(where, shape, name).reshape(a.shape)
    if weights is not None:  # a zero weight removes the entry, even an inf or NaN one (scipy)
        nonzero = weights != 0
        keep = nonzero if keep is None else keep & nonzero
    if keep is not None:
        a = np.where(keep, a, np.array(-np.inf, dtype=acc))
        owned = True
    return Rows(a, axes, in_dtype, shape, owned, weights)


def normalize_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    """``axis`` (int, tuple/list of ints, or None for all) as non-negative ints."""
    if axis is None:
        return tuple(range(ndim))
    items = tuple(axis) if isinstance(axis, tuple | list) else (axis,)
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | np.integer):
            raise TypeError(f"axis: expected an int or a tuple of ints, got {axis!r}")
        if not -ndim <= item < ndim:
            raise np.exceptions.AxisError(
                f"axis: {axis!r} is out of bounds for an array of dimension {ndim}"
            )
        out.append(int(item) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis: {axis!r} repeats an axis")
    return tuple(out)


def broadcast_where(where: npt.ArrayLike, shape: tuple[int, ...], name: str) -> np.ndarray:
    keep = np.asarray(where)
    if keep.dtype != np.bool_:
        raise TypeError(f"where: expected a boolean array, got dtype {keep.dtype}")
    try:
        return np.broadcast_to(keep, shape)
    except ValueError:
        raise ValueError(
            f"where: shape {keep.shape} does not broadcast to {name}'s shape {shape}"
        ) from None


def check_labels(
    labels: npt.ArrayLike, shape: tuple[int, ...], axis: int, ignore_index: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate class labels against logits of ``shape`` with class axis ``axis`` (>= 0).

    Returns ``(labels as an array, the mask of labels equal to ignore_index or None)``.
    Raises TypeError for non-integer labels, ValueError for labels whose shape is not
    ``shape`` without ``axis`` or for a label outside ``[0, shape[axis])`` that is not
    ``ignore_index`` (the message lists the offending values). Used by both
    cross-entropies (stable and naive), so they refuse the same labels the same way.
    """
    y = np.asarray(labels)
    if y.dtype.kind not in "iu":
        raise TypeError(f"labels: expected an integer array of class indices, got dtype {y.dtype}")
    expected = shape[:axis] + shape[axis + 1 :]
    if y.shape != expected:
        raise ValueError(
            f"labels: shape {y.shape} does not match logits' shape {shape} without "
            f"axis {axis}, which is {expected}"
        )
    n_classes = shape[axis]
    ignored = None if ignore_index is None else y == ignore_index
    bad = (y < 0) | (y >= n_classes)
    if ignored is not None:
        bad &= ~ignored
    if bad.any():
        values = np.unique(y[bad])
        raise ValueError(
            f"labels: values {values[:8].tolist()}{' ...' if values.size > 8 else ''} are out "
            f"of range [0, {n_classes}) for logits axis {axis} of size {n_classes}"
            + ("" if ignore_index is None else f" and are not ignore_index={ignore_index}")
        )
    return y, ignored


def reduced_shape(
    shape: tuple[int, ...], axes: tuple[int, ...], keepdims: bool, caller_shape: tuple[int, ...]
) -> tuple[int, ...]:
    if not caller_shape:  # a 0-d input reduces to a 0-d result, with or without keepdims
        return ()
    if keepdims:
        return tuple(1 if i in axes else n for i, n in enumerate(shape))
    return tuple(n for i, n in enumerate(shape) if i not in axes)


def finish(out: np.ndarray, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Any:
    """Round to the caller's dtype (:func:`flashmath.rounding.cast`: NumPy's bits, without
    its slow path), give the result its shape; 0-d becomes a NumPy scalar."""
    return cast(out, dtype).reshape(shape)[()]
