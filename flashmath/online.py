"""Compatibility: this module moved to :mod:`flashmath.softmax.online`; import from there."""

from flashmath.softmax.online import (
    SoftmaxState,
    merge,
    merge_outputs,
    softmax_online,
    softmax_online_chunked,
)

__all__ = [
    "SoftmaxState",
    "merge",
    "merge_outputs",
    "softmax_online",
    "softmax_online_chunked",
]
