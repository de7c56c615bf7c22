"""Conformance: the adversarial batteries, the one accuracy rule and the runner that
judges any softmax or attention kernel against the float64 oracle.

Owns: cases and batteries, the judge (FlashAttention's 2x / 3x rule with its floor and
NaN policy), kernel declarations and adapters, and running a kernel over a battery.
May import: dtypes, softmax, attention. ``flashmath.testing`` re-exports it.
"""

from flashmath.conformance.run import (
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
