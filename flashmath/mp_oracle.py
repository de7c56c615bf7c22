"""Compatibility: this module moved to :mod:`flashmath.softmax.mp_oracle`; import from there."""

from flashmath.softmax.mp_oracle import *  # noqa: F403
from flashmath.softmax.mp_oracle import __all__  # noqa: F401
