"""Compatibility: this module moved to :mod:`flashmath.measure.iomodel`; import from there."""

from flashmath.measure.iomodel import *  # noqa: F403
from flashmath.measure.iomodel import __all__  # noqa: F401
