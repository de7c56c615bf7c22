"""Conformance testing for your own softmax and attention kernels (the public face of
:mod:`flashmath.conformance`; ``flashmath check`` is its command)::

    from flashmath.testing import assert_attention_close, attention_battery, run_case
"""

from flashmath.conformance import (
    ATTENTION_OPTIONS,
    BATTERY_DTYPES,
    FLOOR_ULPS,
    GRAD_LIMIT,
    OUT_LIMIT,
    SEED_001,
    SOFTMAX_OPTIONS,
    Case,
    CheckResult,
    Kernel,
    KernelSignatureError,
    Kind,
    as_kernel,
    assert_attention_close,
    assert_softmax_close,
    attention_battery,
    check_attention,
    check_softmax,
    compare_attention,
    compare_softmax,
    declare,
    run_case,
    softmax_battery,
    validate_kernel,
)

__all__ = [
    "ATTENTION_OPTIONS",
    "BATTERY_DTYPES",
    "FLOOR_ULPS",
    "GRAD_LIMIT",
    "OUT_LIMIT",
    "SEED_001",
    "SOFTMAX_OPTIONS",
    "Case",
    "CheckResult",
    "Kernel",
    "KernelSignatureError",
    "Kind",
    "as_kernel",
    "assert_attention_close",
    "assert_softmax_close",
    "attention_battery",
    "check_attention",
    "check_softmax",
    "compare_attention",
    "compare_softmax",
    "declare",
    "run_case",
    "softmax_battery",
    "validate_kernel",
]
