"""Conformance testing for your own softmax and attention kernels: the adversarial
batteries, the float64 oracle and FlashAttention's accuracy rule (2x the naive same-dtype
error for outputs, 3x for gradients, with a floor of an ulp and the NaN policy). The
public face of :mod:`flashmath.conformance`; ``flashmath check`` is its command::

    from flashmath.testing import assert_attention_close, attention_battery, run_case

See :mod:`flashmath.conformance.judge` for the rule, :mod:`flashmath.conformance.kernels`
for how a kernel declares what it supports, :mod:`flashmath.conformance.run` for examples.
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
