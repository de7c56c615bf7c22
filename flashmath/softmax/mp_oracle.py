"""The one high-precision oracle for softmax, log_softmax, logsumexp and cross_entropy.

Every test, and the lab, that needs the exact value of one of these imports it
from here (``from flashmath.softmax import mp_oracle``; needs mpmath, a test extra that torch's
sympy also brings; ``import flashmath`` does not import this module). Each row is
computed in mpmath with 50 significant digits from the inputs' exact values
(every float64, float32, float16, bfloat16 and float8 value is exactly a
float64), then rounded once to float64: the result is the correctly rounded
exact value, up to a last-bit tie that no test can see.

Semantics are flashmath's contract (docs/conventions.md), so results compare directly:

- ``-inf`` entries and ``where=False`` entries are left out (probability 0);
  a row with nothing left gives softmax 0, log_softmax and logsumexp ``-inf``,
  cross-entropy ``+inf``;
- ``+inf`` or NaN in a row (not left out) makes the row NaN;
- ``b`` weights as in scipy (a zero weight leaves the entry out);
- cross-entropy: ``logsumexp(x) - x[y]``, torch's label smoothing, ignored
  labels give 0, "mean" divides by the labels not ignored.

Rows are found like flashmath does: ``axis`` is an int, a tuple or None, and a
0-d input is one row of one element. This is slow (a Python loop over rows and
entries): keep inputs small, a few thousand entries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mpmath
import numpy as np

__all__ = [
    "DPS",
    "cross_entropy",
    "log_softmax",
    "logsumexp",
    "logsumexp_mp",
    "softmax",
]

#: Significant decimal digits of every computation here.
DPS = 50

_NAN = mpmath.mpf("nan")
_NEG_INF = mpmath.mpf("-inf")


def softmax(x: Any, axis: Any = -1, *, where: Any = None) -> np.ndarray:
    """Exact softmax along ``axis``, rounded to float64; ``x``'s shape."""
    return _map_rows(_softmax_row, x, axis, where)


def log_softmax(x: Any, axis: Any = -1, *, where: Any = None) -> np.ndarray:
    """Exact log-softmax along ``axis``, rounded to float64; ``x``'s shape."""
    return _map_rows(_log_softmax_row, x, axis, where)


def logsumexp(
    x: Any,
    axis: Any = -1,
    *,
    where: Any = None,
    b: Any = None,
    keepdims: bool = False,
    return_sign: bool = False,
) -> Any:
    """Exact ``log|sum(b exp(x))|`` along ``axis`` rounded to float64 (and the sign).

    Without ``return_sign`` a negative sum is NaN, as in scipy and flashmath.
    """
    values = logsumexp_mp(x, axis, where=where, b=b, keepdims=keepdims)
    lse = np.array([float(v[0]) for v in values.flat], dtype=np.float64).reshape(values.shape)
    sign = np.array([float(v[1]) for v in values.flat], dtype=np.float64).reshape(values.shape)
    if return_sign:
        return lse[()], sign[()]
    return np.where(sign < 0, np.nan, lse)[()]


def logsumexp_mp(
    x: Any, axis: Any = -1, *, where: Any = None, b: Any = None, keepdims: bool = False
) -> np.ndarray:
    """Object array of ``(log|sum|, sign)`` mpf pairs, unrounded: for error measurement."""
    arr = np.asarray(x, dtype=np.float64)
    weights = None if b is None else np.asarray(b, dtype=np.float64)
    if weights is not None:
        shape = np.broadcast_shapes(arr.shape, weights.shape)
        arr, weights = np.broadcast_to(arr, shape), np.broadcast_to(weights, shape)
    keep = np.ones(arr.shape, bool) if where is None else np.broadcast_to(where, arr.shape)
    shape0 = arr.shape
    if arr.ndim == 0:
        arr, keep = arr.reshape(1), keep.reshape(1)
        weights = None if weights is None else weights.reshape(1)
    axes = _axes(axis, arr.ndim)
    rows, _ = _to_rows(arr, axes)
    keeps, _ = _to_rows(keep, axes)
    ws = None if weights is None else _to_rows(weights, axes)[0]
    out = np.empty(rows.shape[0], dtype=object)
    with mpmath.workdps(DPS):
        for r in range(rows.shape[0]):
            w = None if ws is None else ws[r]
            out[r] = _lse_row(rows[r], keeps[r], w)
    if not shape0:
        return out.reshape(())
    reduced = [1 if i in axes else n for i, n in enumerate(arr.shape)]
    out = out.reshape(reduced)
    return out if keepdims else out.reshape([n for i, n in enumerate(arr.shape) if i not in axes])


def cross_entropy(
    logits: Any,
    labels: Any,
    axis: int = -1,
    *,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
) -> Any:
    """Exact cross-entropy per label, reduced like flashmath (and torch), rounded to float64."""
    arr = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    moved = np.moveaxis(arr, axis, -1).reshape(-1, arr.shape[axis])
    ys = y.reshape(-1)
    eps = mpmath.mpf(label_smoothing)
    losses: list[Any] = []
    with mpmath.workdps(DPS):
        for row, label in zip(moved, ys, strict=True):
            if ignore_index is not None and label == ignore_index:
                losses.append(None)
                continue
            logp = _log_softmax_row(row, np.ones(row.shape, bool))
            nll = -logp[int(label)]  # -inf - (-inf) never arises: a dead row's logp is -inf
            smooth = -mpmath.fsum(logp) / len(logp)
            losses.append((1 - eps) * nll + eps * smooth if eps else nll)
    kept = [v for v in losses if v is not None]
    with mpmath.workdps(DPS):
        if reduction == "none":
            per = [0.0 if v is None else float(v) for v in losses]
            return np.array(per, dtype=np.float64).reshape(y.shape)
        total = mpmath.fsum(kept) if kept else mpmath.mpf(0)
        if reduction == "sum":
            return float(total)
        return float(total / len(kept)) if kept else float("nan")


# --------------------------------------------------------------------------------------
# Rows.
# --------------------------------------------------------------------------------------


def _mp(v: float) -> Any:
    return mpmath.mpf(float(v))


def _shifted_row(
    row: np.ndarray, keep: np.ndarray, w: np.ndarray | None
) -> tuple[Any, list[Any], Any, Any] | None:
    """``(m, shifted, log|S|, sign S)`` of one row with ``S = sum w_i exp(x_i - m)``:
    ``shifted[i] = x_i - m`` exactly, None where entry i is left out; ``m`` None and
    ``log|S| = -inf`` for a row with nothing left; None for a NaN row.

    ``log|S|`` is ``log|top| + log1p(rest/top)``, ``top`` the weights at the max (each
    term exactly ``w_i``): at 50 digits ``1 + 1e-304`` would round to 1, and the
    log-probabilities of a dominant entry would come out 0. Results are formed from
    ``x_i - m`` and ``log|S|``, never as ``x_i - (m + log S)``, for the same reason.
    """
    weights = w if w is not None else np.ones(len(row))
    live: list[Any] = []
    for v, k, wi in zip(row, keep, weights, strict=True):
        if not k or wi == 0 or v == -np.inf:
            live.append(None)
        elif np.isnan(v) or v == np.inf or np.isnan(wi):
            return None
        else:
            live.append(_mp(v))
    present = [v for v in live if v is not None]
    if not present:
        return None, [None] * len(row), _NEG_INF, mpmath.mpf(0)
    m = max(present)
    shifted = [None if v is None else v - m for v in live]
    pairs = [(d, _mp(wi)) for d, wi in zip(shifted, weights, strict=True) if d is not None]
    top = mpmath.fsum(wi for d, wi in pairs if d == 0)
    rest = mpmath.fsum(wi * mpmath.exp(d) for d, wi in pairs if d != 0)
    total = top + rest
    if total == 0:
        return m, shifted, _NEG_INF, mpmath.mpf(0)
    if top != 0 and rest / top > -1:
        log_s = mpmath.log(abs(top)) + mpmath.log1p(rest / top)
    else:
        log_s = mpmath.log(abs(total))
    return m, shifted, log_s, mpmath.sign(total)


def _lse_row(row: np.ndarray, keep: np.ndarray, w: np.ndarray | None) -> tuple[Any, Any]:
    """``(log|sum w exp(x)|, sign)`` of one row, in the current mpmath precision."""
    parts = _shifted_row(row, keep, w)
    if parts is None:
        return _NAN, _NAN
    m, _, log_s, sign = parts
    if m is None or log_s == _NEG_INF:
        return _NEG_INF, mpmath.mpf(0)
    return m + log_s, sign


def _softmax_row(row: np.ndarray, keep: np.ndarray) -> list[Any]:
    parts = _shifted_row(row, keep, None)
    if parts is None:
        return [_NAN] * len(row)
    m, shifted, log_s, _ = parts
    return [0 if m is None or d is None else mpmath.exp(d - log_s) for d in shifted]


def _log_softmax_row(row: np.ndarray, keep: np.ndarray) -> list[Any]:
    parts = _shifted_row(row, keep, None)
    if parts is None:
        return [_NAN] * len(row)
    m, shifted, log_s, _ = parts
    return [_NEG_INF if m is None or d is None else d - log_s for d in shifted]


def _map_rows(
    fn: Callable[[np.ndarray, np.ndarray], list[Any]], x: Any, axis: Any, where: Any
) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    keep = np.ones(arr.shape, bool) if where is None else np.broadcast_to(where, arr.shape)
    shape0 = arr.shape
    if arr.ndim == 0:
        arr, keep = arr.reshape(1), keep.reshape(1)
    axes = _axes(axis, arr.ndim)
    rows, undo = _to_rows(arr, axes)
    keeps, _ = _to_rows(keep, axes)
    out = np.empty(rows.shape, dtype=np.float64)
    with mpmath.workdps(DPS):
        for r in range(rows.shape[0]):
            out[r] = [float(v) for v in fn(rows[r], keeps[r])]
    return undo(out).reshape(shape0)


def _axes(axis: Any, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    items: Sequence[int] = axis if isinstance(axis, tuple | list) else (axis,)
    return tuple(int(a) % ndim for a in items)


def _to_rows(
    arr: np.ndarray, axes: tuple[int, ...]
) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """``arr`` with the reduced axes moved last and flattened into one: (rows, n); and the
    function that puts an array of that layout back into ``arr``'s shape."""
    others = [i for i in range(arr.ndim) if i not in axes]
    order = others + list(axes)
    moved = np.transpose(arr, order)
    n = int(np.prod(moved.shape[len(others) :], dtype=np.int64))
    rows = moved.reshape(-1, n)

    def undo(flat: np.ndarray) -> np.ndarray:
        return np.transpose(flat.reshape(moved.shape), np.argsort(order))

    return rows, undo
