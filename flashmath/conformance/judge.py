"""The one accuracy rule and the NaN policy: how an answer is judged against the oracle.

The accuracy rule (after FlashAttention's tests; docs/conventions.md)
--------------------------------------------------------------------
For inputs of a given dtype, three answers are compared (see
:mod:`flashmath.conformance.oracle`): the float64 **oracle**, the naive same-dtype
**baseline**, and the **impl**'s answer. Errors are max absolute differences against the
oracle over the elements where the oracle is finite. The impl passes when
``max_error <= limit * reference_error`` with ``limit`` :data:`OUT_LIMIT` (2) for the
forward output and :data:`GRAD_LIMIT` (3) for gradients, where

    reference_error = max(baseline_error, floor)   if the baseline is finite there,
    reference_error = floor                        if the baseline overflowed or is NaN,
    floor = FLOOR_ULPS * (eps(dtype) * max|oracle| + noise),

``noise`` being what the float64 oracle itself may be off by (``eps(float64) * kappa * T``,
see the oracle module), and ``ratio = max_error / reference_error``. ``FLOOR_ULPS`` is 1: an
error within 2 ulps of the dtype (relative to the largest finite magnitude of the oracle)
always passes, however lucky the baseline was -- a correctly rounded result is off by half
an ulp. The floor is needed twice: where the baseline is exact (error 0, so 2x of it would
demand bit-exactness) and where the baseline broke -- a baseline that overflowed never
loosens the rule, it *tightens* it to the floor. For float64 inputs the baseline is the
oracle's own algorithm (its error is 0): there the floor is the whole rule.

NaN policy (docs/conventions.md): where the oracle is finite the impl must be finite; where
it is NaN (a row with NaN or +inf input) the impl must be NaN; rows with nothing to attend
to (all -inf, fully masked: the oracle's lse is -inf) must be exactly zero, and so must
their query gradients. A breach fails the case whatever the error.

Owns: the limits and the floor, :func:`judge` (one quantity), :func:`judge_case` (every
quantity of one case), :class:`Judged` and :class:`CheckResult` (the row a case becomes).
May import: dtypes, text, softmax, attention, conformance.cases, conformance.oracle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from flashmath import dtypes as _dt
from flashmath.conformance.cases import Case
from flashmath.conformance.oracle import Answer, expected
from flashmath.text import number

__all__ = [
    "ERROR_SPEC",
    "FLOOR_ULPS",
    "GRAD_LIMIT",
    "OUT_LIMIT",
    "QUANTITIES",
    "VALUE_SPEC",
    "CheckResult",
    "Judged",
    "Verdict",
    "dead_rows",
    "judge",
    "judge_case",
    "not_judged",
    "result_of",
]

#: The accuracy rule's limits: forward output, gradients (FlashAttention's 2x and 3x).
OUT_LIMIT = 2.0
GRAD_LIMIT = 3.0
#: The floor, in ulps (see the module docstring).
FLOOR_ULPS = 1.0
#: The quantities of an attention case, in the order they are judged and reported.
QUANTITIES = ("out", "dq", "dk", "dv")

Verdict = Literal["PASS", "FAIL", "SKIP", "ERROR"]


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one case; what ``flashmath check`` tabulates.

    verdict: "PASS", "FAIL" (accuracy rule or NaN policy broken), "ERROR" (the impl raised or
      returned the wrong shape) or "SKIP" (an option or dtype the impl does not support;
      ``message`` says which).
    max_error / baseline_error: max |impl - oracle| and max |baseline - oracle| over the
      elements where the oracle is finite (baseline_error is inf or nan when the baseline
      overflowed); for gradients, of the quantity with the worst ratio (``quantity``).
    ratio: max_error / max(baseline_error, floor) (just floor when the baseline broke).
    limit: the ratio allowed (2 forward, 3 gradients). floor: see the module docstring.
    nan_policy_ok: no NaN/inf where the oracle is finite, NaN where it is NaN, zeros in
      fully masked rows. None when the impl did not run.
    worst: the worst element, e.g. "out[0, 1, 3, 7]". message: one paragraph for a human.
    """

    case: str
    dtype: str
    verdict: Verdict
    max_error: float | None = None
    baseline_error: float | None = None
    ratio: float | None = None
    nan_policy_ok: bool | None = None
    message: str = ""
    limit: float | None = None
    floor: float | None = None
    quantity: str | None = None
    worst: str | None = None
    requires: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """True when the verdict is PASS."""
        return self.verdict == "PASS"

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON (floats may be inf/nan: encode them as your writer does)."""
        return asdict(self) | {"requires": list(self.requires)}


@dataclass(frozen=True)
class Judged:
    """The judgement of one quantity (out, dq, dk or dv) of one case.

    label: the quantity. ok: the rule and the policy both hold. policy_ok: the NaN policy
    holds. max_error, baseline_error, floor, ratio, limit: as in :class:`CheckResult`.
    worst: the element named in ``text`` (None for an empty output). text: one sentence.
    """

    label: str
    ok: bool
    policy_ok: bool
    max_error: float
    baseline_error: float
    floor: float
    ratio: float
    limit: float
    worst: str | None
    text: str


#: How messages write an error or a ratio, and a value (digits enough to tell float32
#: neighbours apart), through :func:`flashmath.text.number`.
ERROR_SPEC, VALUE_SPEC = ".6g", ".9g"


def judge(label: str, got: np.ndarray, oracle: np.ndarray, base: np.ndarray, *,
          dtype: str, limit: float, noise: float, dead: np.ndarray | None) -> Judged:
    """Apply the NaN policy and the accuracy rule to one quantity.

    got, oracle, base: arrays of one shape (any float dtype; compared in float64).
    dtype: the inputs' dtype name (its eps sets the floor). limit: :data:`OUT_LIMIT` or
    :data:`GRAD_LIMIT`. noise: the oracle's own error for this quantity. dead: a boolean
    mask broadcastable to the shape, True on rows that must be exactly zero (None: none).
    """
    g = got.astype(np.float64)
    o = oracle.astype(np.float64)
    b = base.astype(np.float64)
    finite = np.isfinite(o)
    # --- NaN policy: finite where the oracle is, NaN where it is NaN, zeros in dead rows.
    bad = (finite & ~np.isfinite(g)) | (np.isnan(o) & ~np.isnan(g))
    bad |= np.isinf(o) & (g != o)
    if dead is not None:
        bad |= np.broadcast_to(dead, o.shape) & (g != 0)
    # --- accuracy against the oracle, over the elements where the oracle is finite.
    both = finite & np.isfinite(g)
    err = np.where(both, np.abs(g - o), 0.0)
    max_error = float(err.max()) if err.size else 0.0
    base_bad = finite & ~np.isfinite(b)
    if base_bad.any():
        baseline_error = math.nan if np.isnan(b[base_bad]).any() else math.inf
    else:
        baseline_error = float(np.where(finite, np.abs(b - o), 0.0).max()) if b.size else 0.0
    scale = float(np.abs(o[finite]).max()) if finite.any() else 0.0
    floor = FLOOR_ULPS * (float(_dt.finfo(dtype).eps) * scale + noise)
    reference = floor if not math.isfinite(baseline_error) else max(baseline_error, floor)
    if reference > 0:
        ratio = max_error / reference
    else:
        ratio = 0.0 if max_error == 0 else math.inf
    e_max, e_base, e_floor, e_ratio = (number(x, ERROR_SPEC) for x in
                                       (max_error, baseline_error, floor, ratio))
    baseline_text = (f"the naive {dtype} baseline's max error is {e_base}"
                     if math.isfinite(baseline_error) else
                     f"the naive {dtype} baseline broke ({e_base}: it overflowed or produced "
                     f"NaN), so the floor {e_floor} stands in for it")
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        where = f"{label}{list(idx)}"
        if dead is not None and np.broadcast_to(dead, o.shape)[idx]:
            why = "a row with nothing to attend to must be exactly zero"
        elif np.isnan(o[idx]):
            why = "the input row holds NaN or +inf, so this row must be NaN"
        else:
            why = "NaN/inf where the oracle is finite"
        text = (f"NaN policy broken at {where}: the impl gives {number(g[idx], VALUE_SPEC)} "
                f"where the float64 oracle says {number(o[idx], VALUE_SPEC)} ({why}); "
                f"{int(bad.sum())} element(s) break it. Max error elsewhere {e_max}, "
                f"{baseline_text}, ratio {e_ratio}.")
        return Judged(label, False, False, max_error, baseline_error, floor, ratio, limit,
                      where, text)
    worst: str | None = None
    at = "the output is empty"
    if err.size:
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(err)), err.shape))
        worst = f"{label}{list(idx)}"
        at = (f"at {worst} the impl gives {number(g[idx], VALUE_SPEC)} where the float64 "
              f"oracle says {number(o[idx], VALUE_SPEC)}")
    ok = ratio <= limit
    text = (f"{label}: {'meets' if ok else 'breaks'} the accuracy rule: max error {e_max} "
            f"({at}); {baseline_text}; ratio {e_ratio} {'<=' if ok else '>'} {limit:g}.")
    return Judged(label, ok, True, max_error, baseline_error, floor, ratio, limit, worst, text)


def dead_rows(case: Case, oracle: Answer) -> np.ndarray:
    """Rows with nothing to attend to, which the policy wants exactly zero: a boolean mask
    broadcastable to the output (softmax: every entry -inf or ``where``-masked along the
    axis; attention: the oracle's lse is -inf)."""
    if case.kind == "softmax":
        x = case.inputs["x"].astype(np.float64)
        axis = case.options.get("axis", -1)
        keep = ~np.isneginf(x)
        if "where" in case.options:
            keep &= np.asarray(case.options["where"], dtype=bool)
        return ~np.any(keep, axis=axis, keepdims=True)
    assert oracle.lse is not None
    return np.isneginf(oracle.lse)[..., None]


def judge_case(case: Case, answers: Mapping[str, np.ndarray]) -> list[Judged]:
    """Judge an impl's answers to ``case``: ``{"out": ...}``, plus ``"dq"``, ``"dk"``,
    ``"dv"`` for attention gradients (all three or none), NumPy arrays of the oracle's
    shapes. Returns one :class:`Judged` per quantity, in :data:`QUANTITIES` order. The
    oracle is computed (once per case) by :func:`flashmath.conformance.oracle.expected`.
    Raises ValueError naming the quantity when a shape differs from the oracle's."""
    grads = "dq" in answers
    exp = expected(case, grads)
    want = {"out": (exp.oracle.out, exp.baseline.out)}
    if grads:
        assert exp.oracle.grads is not None and exp.baseline.grads is not None
        want |= dict(zip(QUANTITIES[1:], zip(exp.oracle.grads, exp.baseline.grads,
                                               strict=True), strict=True))
    if set(answers) != set(want):
        raise ValueError(f"answers: expected {sorted(want)}, got {sorted(answers)}")
    for label, (oracle, _) in want.items():
        if answers[label].shape != oracle.shape:
            raise ValueError(f"{label} has shape {answers[label].shape}, "
                             f"expected {oracle.shape}")
    dead = dead_rows(case, exp.oracle)
    return [judge(label, answers[label], oracle, base, dtype=case.dtype,
                  noise=exp.noise[label], limit=OUT_LIMIT if label == "out" else GRAD_LIMIT,
                  dead=dead if label in ("out", "dq") else None)
            for label, (oracle, base) in want.items()]


def result_of(case: Case, judged: Sequence[Judged]) -> CheckResult:
    """One row from the per-quantity judgements: PASS when every one is ok; the row reports
    the first policy breach, else the quantity with the worst ratio (failures first)."""
    breach = [j for j in judged if not j.policy_ok]
    worst = breach[0] if breach else max(judged, key=lambda j: (not j.ok, j.ratio))
    ok = all(j.ok for j in judged)
    return CheckResult(
        case=case.name, dtype=case.dtype, verdict="PASS" if ok else "FAIL",
        max_error=worst.max_error, baseline_error=worst.baseline_error, ratio=worst.ratio,
        nan_policy_ok=not breach, message=_prefix(case) + worst.text, limit=worst.limit,
        floor=worst.floor, quantity=worst.label, worst=worst.worst,
        requires=tuple(sorted(case.requires)))


def not_judged(case: Case, verdict: Literal["SKIP", "ERROR"], message: str) -> CheckResult:
    """The row of a case the impl did not run (SKIP) or could not answer (ERROR)."""
    return CheckResult(case=case.name, dtype=case.dtype, verdict=verdict,
                       message=_prefix(case) + message, requires=tuple(sorted(case.requires)))


def _prefix(case: Case) -> str:
    return f"{case.kind} case {case.name!r} [{case.dtype}]: "
