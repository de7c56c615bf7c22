"""Compatibility: this module moved to :mod:`flashmath.softmax.safety`; import from there."""

from flashmath.softmax.safety import (
    SafetyReport,
    analyze_softmax_safety,
    overflow_closed_form,
    overflow_threshold,
    underflow_closed_form,
    underflow_threshold,
)

__all__ = [
    "SafetyReport",
    "analyze_softmax_safety",
    "overflow_closed_form",
    "overflow_threshold",
    "underflow_closed_form",
    "underflow_threshold",
]
