"""The max-shift rule every stable and online softmax in flashmath follows.

softmax(x) = exp(x - c) / sum exp(x - c) for any constant c: the shift cancels in the
ratio, so choosing c = max(x) changes nothing but the arithmetic, and makes every
exponent <= 0, so exp can no longer overflow. The two helpers here are that rule, with
the edge cases decided once: :func:`row_shift` (what to subtract, also for empty rows) and
:func:`rescale` (how a running state moves to a new max).
"""

from __future__ import annotations

import numpy as np

__all__ = ["rescale", "row_shift"]


def row_shift(m: np.ndarray) -> np.ndarray:
    """The value subtracted from a row's scores before exp.

    The running max ``m`` where it is finite, 0 where the row is still empty
    (m = -inf): an empty row then gives exp(-inf - 0) = 0, never exp(-inf + inf) = NaN.
    +inf stays +inf and makes the row NaN (the NaN policy). A NaN becomes the default
    NaN (+nan): NumPy's row max passes the input's NaN on for some row lengths and returns
    +nan for others, so without this a NaN row's bits would depend on how its max was
    taken. Same shape and dtype as m.
    """
    shift = np.where(np.isneginf(m), np.zeros((), m.dtype), m)
    nan = np.isnan(shift)
    if nan.any():
        shift[nan] = np.nan
    return shift


def rescale(m_old: np.ndarray, m_new: np.ndarray) -> np.ndarray:
    """alpha = exp(m_old - m_new): the factor that moves (l, o), kept relative to m_old,
    to the new max m_new >= m_old.

    Exactly 1 where the max did not change (so re-absorbing nothing changes nothing, bit
    for bit); 0 for an empty old row (m_old = -inf), also when m_new is still -inf.
    """
    return np.exp(m_old - row_shift(m_new))
