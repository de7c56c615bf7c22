"""Conformance: judging any softmax or attention kernel against the float64 oracle.

Owns the adversarial batteries (:mod:`.cases`), the oracle and the naive same-dtype
baseline (:mod:`.oracle`), the one accuracy rule -- FlashAttention's 2x / 3x limits with
their floor and the NaN policy of docs/conventions.md (:mod:`.judge`) --, kernel
declarations, the NumPy/torch boundary and the built-in adapters including torch's SDPA
(:mod:`.kernels`), and running a kernel over a case, a battery or one input, with the lab's
per-quantity view of the rule (:mod:`.run`). Inside, imports point down:
cases <- oracle <- judge; cases <- kernels; all <- run.

May import: flashmath.dtypes, flashmath.text, flashmath.softmax, flashmath.attention (and
torch, lazily, at the torch boundary); never measure, triton, distributed, lab or cli.
:mod:`flashmath.testing` is its public face; ``flashmath check`` its command.
"""

from flashmath.conformance.cases import (
    ATTENTION_OPTIONS,
    BATTERY_DTYPES,
    SEED_001,
    SOFTMAX_OPTIONS,
    Case,
    Kind,
    attention_battery,
    softmax_battery,
)
from flashmath.conformance.judge import FLOOR_ULPS, GRAD_LIMIT, OUT_LIMIT, CheckResult
from flashmath.conformance.kernels import (
    Kernel,
    KernelSignatureError,
    as_kernel,
    declare,
    validate_kernel,
)
from flashmath.conformance.run import (
    accuracy_rule,
    assert_attention_close,
    assert_softmax_close,
    check_attention,
    check_softmax,
    compare_attention,
    compare_softmax,
    run_case,
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
    "accuracy_rule",
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
