"""PLACEHOLDER: replaced by its owner (work in progress)."""

def merge(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise NotImplementedError("merge")

def merge_outputs(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise NotImplementedError("merge_outputs")

def softmax_online(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise NotImplementedError("softmax_online")

def softmax_online_chunked(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise NotImplementedError("softmax_online_chunked")

class SoftmaxState: ...


# --- The shared online-softmax rule (used by SoftmaxState and the tiled attention loops) ---
import numpy as _np  # noqa: E402


def row_shift(m: _np.ndarray) -> _np.ndarray:
    """The value subtracted from a row's scores before exp: the running max where it is
    finite, 0 where the row is still empty (m = -inf), so empty rows give exp(-inf) = 0
    and never NaN. (+inf stays +inf and makes the row NaN, as DESIGN.md asks.)"""
    return _np.where(_np.isneginf(m), _np.zeros((), m.dtype), m)


def rescale(m_old: _np.ndarray, m_new: _np.ndarray) -> _np.ndarray:
    """alpha = exp(m_old - m_new): the factor that brings (l, o) kept relative to m_old
    to the new max. An empty old row (m_old = -inf) gives 0, also when m_new = -inf."""
    return _np.exp(m_old - row_shift(m_new))
