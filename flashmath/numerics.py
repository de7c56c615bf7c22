"""Compatibility: this module moved to :mod:`flashmath.softmax.stable`; import from there."""

from flashmath.softmax.stable import (
    cross_entropy,
    log_softmax,
    logsumexp,
    softmax,
)

__all__ = [
    "cross_entropy",
    "log_softmax",
    "logsumexp",
    "softmax",
]
