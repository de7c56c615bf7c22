"""The textbook formulas in the input dtype, kept to be compared against (``fm.naive``).

The softmax family lives in :mod:`flashmath.softmax.naive`, the attention in
:mod:`flashmath.attention.naive`; this module gathers them under one name.
"""

from flashmath.attention.naive import attention
from flashmath.softmax.naive import cross_entropy, log_softmax, logsumexp, softmax

__all__ = ["attention", "cross_entropy", "log_softmax", "logsumexp", "softmax"]
